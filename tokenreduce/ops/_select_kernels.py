"""The Triton kernel of ``tokenreduce::split_order`` (launched by ``select_triton.py``).

Imported only where triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_keys import LOWEST, pack_key

__all__ = ["_split_order_kernel"]


@triton.jit
def _split_order_kernel(s_ptr, out_ptr, n, k, stride_sb, stride_sn, stride_ob, BLOCK_N: tl.constexpr):
    """Grid (B,).  One program per image: its n scores (as float32) in registers, the k-th
    largest order key by a bitonic ``tl.sort``, then prefix counts.  Writes the image's row
    of ``order``: the kept indices ascending in slots 0..k-1, then the pruned ones ascending."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_N)
    valid = i < n
    s = tl.load(s_ptr + b * stride_sb + i * stride_sn, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, pack_key(s, i), LOWEST)  # distinct per row; padding ranks below NaN
    ranked = tl.sort(key, descending=True)
    kth = tl.max(tl.where(i == k - 1, ranked, LOWEST), axis=0)
    keep = key >= kth  # exactly k per row
    rank = tl.cumsum(keep.to(tl.int32), axis=0)  # kept tokens at or before i
    slot = tl.where(keep, rank - 1, k + i - rank)
    tl.store(out_ptr + b * stride_ob + slot, i.to(tl.int64), mask=valid)
