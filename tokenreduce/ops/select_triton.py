"""``tokenreduce::split_order`` as one Triton kernel: a site's whole token split in one launch.

``split_order(scores (B, n), k) -> order (B, n) int64``: the k highest-scoring indices ascending,
then the others ascending; equal scores rank by index, lower first (``split_order_reference``).
The reference takes nine to ten launches (top-k, threshold, tie counts, two counting GEMMs, the
scatter, ...), about 60 us per batch of kernel time and as many launch gaps at DeiT-S's three
sites on an H200; this kernel is one program per image:

    key_i  = (order-preserving int32 of score_i) << 32 | (2^31 - 1 - i)     distinct per row
    kth    = the k-th largest key (``tl.sort``, bitonic, in registers)
    keep_i = key_i >= kth                     exactly k per row; ties resolved by index
    slot_i = keep_i ? rank_i - 1 : k + i - rank_i,   rank_i = kept tokens at or before i
    order[slot_i] = i

Scores are compared in float32: bfloat16 / float16 convert exactly; -0 ranks as +0, as torch
compares them. float64 scores (and rows longer than ``MAX_N``) stay on the reference. Under
``torch.compile`` (torch >= 2.6) the kernel launches from the compiled graph (``wrap_triton``).
Like ``squeeze_triton``, it runs on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import logging

import torch

from ._triton import HAVE_TRITON, check_runnable, device_guard, launcher

__all__ = ["MAX_N", "register_cuda_kernel", "split_order_triton"]

logger = logging.getLogger(__name__)

MAX_N = 8192  # one row in one program's registers
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REGISTERED = False

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _split_order_kernel(s_ptr, out_ptr, n, k, s_b, s_n, o_b, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_N)
        valid = i < n
        s = tl.load(s_ptr + b * s_b + i * s_n, mask=valid, other=0.0).to(tl.float32)
        s = tl.where(s == 0.0, 0.0, s)  # -0 as +0
        bits = s.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order = float order
        key = (bits.to(tl.int64) << 32) | (2147483647 - i).to(tl.int64)
        key = tl.where(valid, key, -9223372036854775808)  # padding ranks below every score
        ranked = tl.sort(key, descending=True)
        kth = tl.max(tl.where(i == k - 1, ranked, -9223372036854775808), axis=0)
        keep = key >= kth
        rank = tl.cumsum(keep.to(tl.int32), axis=0)  # kept tokens at or before i
        slot = tl.where(keep, rank - 1, k + i - rank)
        tl.store(out_ptr + b * o_b + slot, i.to(tl.int64), mask=valid)


def split_order_triton(scores: torch.Tensor, k: int, traceable: bool = False) -> torch.Tensor:
    """``split_order`` of (B, n) float32 / bfloat16 / float16 ``scores`` (any strides, n <=
    ``MAX_N``, 1 <= k <= n) in one launch; returns a new (B, n) int64 tensor."""
    if scores.dim() != 2 or scores.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"split_order_triton: scores must be a (B, n) float32, bfloat16 or float16 "
                         f"tensor; got {tuple(scores.shape)} {scores.dtype}")
    B, n = scores.shape
    if not 1 <= n <= MAX_N or not 1 <= k <= n:
        raise ValueError(f"split_order_triton: needs 1 <= k <= n <= {MAX_N}; got n = {n}, k = {k}")
    check_runnable(scores, "split_order_triton", "split_order_reference")
    order = torch.empty((B, n), device=scores.device, dtype=torch.int64)
    if B == 0:
        return order
    kernel, opts = launcher(_split_order_kernel, traceable)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8
    with device_guard(scores.device):
        kernel[(B,)](scores, order, n, k, *scores.stride(), order.stride(0),
                     BLOCK_N=block, num_warps=warps, **opts)
    return order


def _cuda_kernel(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dtype not in _SUPPORTED_DTYPES or scores.shape[1] > MAX_N:
        from .select import split_order_reference

        return split_order_reference(scores, k)
    return split_order_triton(scores, k, traceable=True)


def register_cuda_kernel() -> bool:
    """Serve ``tokenreduce::split_order`` on CUDA with the Triton kernel. Returns True when
    registered (now or before), False when triton or CUDA is missing (nothing happens)."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if not HAVE_TRITON or not torch.cuda.is_available():
        logger.debug("tokenreduce: no triton or no CUDA device; split_order stays on the reference")
        return False
    from ._kernels import register_device_kernels

    register_device_kernels("cuda", split_order=_cuda_kernel)
    _REGISTERED = True
    return True
