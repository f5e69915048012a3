"""``tokenreduce::split_order`` as one Triton kernel: a site's whole token split in one launch.

``split_order(scores (B, n), k) -> order (B, n) int64``: the k highest-scoring indices ascending,
then the others ascending; equal scores rank by index, lower first, and NaN below every number
(``split_order_reference``). The reference takes nine to ten launches (top-k, threshold, tie
counts, two counting GEMMs, the scatter, ...); this kernel (``_select_kernels.py``) is one
program per image:

    key_i  = pack_key(score_i, i)             order key, distinct per row (``_triton_keys.py``)
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

import torch

from ._triton import HAVE_TRITON, check_runnable, device_guard, launcher
from ._validate import check_dtype, check_tensor

if HAVE_TRITON:
    import triton

    from ._select_kernels import _split_order_kernel

__all__ = ["CUDA_KERNELS", "MAX_N", "split_order_triton"]

MAX_N = 8192  # one row in one program's registers
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def split_order_triton(scores: torch.Tensor, k: int, traceable: bool = False) -> torch.Tensor:
    """``split_order`` of (B, n) float32 / bfloat16 / float16 ``scores`` (any strides, n <=
    ``MAX_N``, 1 <= k <= n) in one launch; returns a new (B, n) int64 tensor."""
    op = "split_order_triton"
    check_tensor(op, "scores", scores, 2, "(B, n)")
    check_dtype(op, "scores", scores, _SUPPORTED_DTYPES)
    B, n = scores.shape
    if not 1 <= n <= MAX_N or not 1 <= k <= n:
        raise ValueError(f"{op}: needs 1 <= k <= n <= {MAX_N}; got n = {n}, k = {k}")
    check_runnable(scores, op, "split_order_reference")
    order = torch.empty((B, n), device=scores.device, dtype=torch.int64)
    if B == 0:
        return order
    kernel, opts = launcher(_split_order_kernel, traceable)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8
    with device_guard(scores.device):
        kernel[(B,)](scores, order, n, k, *scores.stride(), order.stride(0), BLOCK_N=block, num_warps=warps, **opts)
    return order


def _cuda_kernel(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dtype not in _SUPPORTED_DTYPES or scores.shape[1] > MAX_N:
        from .select import split_order_reference

        return split_order_reference(scores, k)
    return split_order_triton(scores, k, traceable=True)


# What ``enable_triton_kernels`` registers for CUDA (``ops/_kernels.py``).
CUDA_KERNELS = {"split_order": _cuda_kernel}
