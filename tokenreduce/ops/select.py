"""Choosing tokens: split indices by score, and gather tokens by index.

``topk_split`` keeps both halves in ascending index order (the original raster order), so
spatial models can scatter kept tokens back to their grid positions and later ops see tokens
in the same relative order as the unreduced model. It is the operator
``tokenreduce::split_order`` (one fused Triton kernel on CUDA, registered by
``ops/select_triton.py``; ``split_order_reference`` elsewhere).

The ranking is total, so the split is defined for every input: higher scores first, ``-0``
equal to ``+0``, NaN below every number (``-inf`` included), equal scores (NaN among them) by
index, lower first. Each row of indices is a partition of ``0..n-1`` whatever the scores: a NaN
or inf in one image changes only that image's split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernels import define_op, device_kernel
from ._validate import autocast_off, check_float, check_index, check_size_match, check_tensor

__all__ = ["gather_tokens", "split_order_op", "split_order_reference", "topk_split"]


def topk_split(scores: Tensor, k: int | torch.SymInt) -> tuple[Tensor, Tensor]:
    """Split token indices by score: (B, n), k -> (kept (B, k), pruned (B, n - k)), int64.

    ``kept`` holds the ``k`` highest-scoring tokens, ``pruned`` the rest; both ascending. Equal
    scores are ranked by index (lower first), so the split is deterministic; NaN ranks below
    every number (see the module docstring). ``k == n`` is the identity case: ``kept`` is
    ``0..n-1`` and ``pruned`` is empty.
    """
    op = "topk_split"
    check_tensor(op, "scores", scores, 2, "(B, n)")
    check_float(op, "scores", scores)
    n = scores.shape[1]
    # SymInt too: under torch.compile with dynamic shapes k is often computed from n.
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"{op}: `k` must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(
            f"{op}: `k` must satisfy 1 <= k <= n = {n} (scores of shape {tuple(scores.shape)}), got k = {k}"
        )
    order = torch.ops.tokenreduce.split_order(scores, k)  # (B, n)
    return order[:, :k], order[:, k:]


def split_order_reference(scores: Tensor, k: int) -> Tensor:
    """(B, n) scores, k -> (B, n) int64: the ``k`` highest-scoring indices ascending, then the
    others ascending (equal scores ranked by index, lower first; NaN below -inf). No validation.

    The default kernel of ``tokenreduce::split_order``. No sort: Inductor lowers sorts to Triton
    kernels that are slow to compile, and the order itself is not needed. The k-th largest score
    is a threshold; of the tokens equal to it, the lowest-index ones fill the remaining places.
    NaN scores count as -inf for the threshold and, among the tokens at -inf, come after the
    real ones. Prefix counts then lay both halves out in raster order.
    """
    n = scores.shape[1]
    nan = scores.isnan()
    ranked = scores.masked_fill(nan, float("-inf"))  # (B, n): NaN-free, topk's order is plain
    kth = ranked.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # (B, 1)
    above = ranked > kth
    tied = ranked == kth  # (B, n); holds the NaN tokens too when kth is -inf
    room = k - above.sum(dim=1, keepdim=True)  # (B, 1): places left for tied tokens
    upper = torch.ones(n, n, device=scores.device, dtype=_count_dtype(scores.device, n)).triu()  # [j <= i]
    # Tied places: the real ties by index, then the NaN ties by index (one GEMM for both counts).
    real, nans = _count_upto(torch.cat([tied & ~nan, tied & nan]), upper).chunk(2)  # (B, n) each
    place = torch.where(nan, real[:, -1:] + nans, real)  # (B, n): rank among the tied tokens
    keep = above | (tied & (place <= room))  # (B, n), exactly k per row
    rank = _count_upto(keep, upper)  # (B, n): kept tokens at or before i
    i = torch.arange(n, device=scores.device)
    slot = torch.where(keep, rank - 1, k + i - rank)  # a permutation of 0..n-1 per row
    return torch.empty_like(slot).scatter_(1, slot, i.expand_as(slot))  # (B, n)


def _split_order_impl(scores: Tensor, k: int) -> Tensor:
    """``tokenreduce::split_order``: (B, n) float, k -> (B, n) int64."""
    kernel = device_kernel(scores.device.type, "split_order")
    return split_order_reference(scores, k) if kernel is None else kernel(scores, k)


def _split_order_fake(scores: Tensor, k: int) -> Tensor:
    return scores.new_empty(scores.shape, dtype=torch.int64)


split_order_op = define_op("tokenreduce::split_order", _split_order_impl, _split_order_fake)


def _count_dtype(device: torch.device, n: int) -> torch.dtype:
    """float16 on CUDA while every count fits its 11-bit significand (a tensor-core GEMM; fp32
    without TF32 runs on the CUDA cores, 4x slower at DeiT-S's sites), else float32."""
    return torch.float16 if device.type == "cuda" and n <= 2048 else torch.float32


def _count_upto(mask: Tensor, upper: Tensor) -> Tensor:
    """(B, n) bool, (n, n) upper-triangular ones -> (B, n) int64 inclusive prefix counts,
    ``mask[:, :i + 1].sum(1)``.

    A matmul with a triangular matrix of ones (in ``upper``'s dtype) rather than ``cumsum``:
    exact (0/1 products, fp32 accumulation, integer results that the output dtype holds: n <=
    2048 in float16, below 2^24 in float32), one GEMM on any device, and it avoids Inductor's
    scan kernels (torch 2.11 fails to generate one for an int64 cumsum in the dTPS graph).
    """
    with autocast_off(mask.device):  # bf16 would round counts above 256
        return (mask.to(upper.dtype) @ upper).long()


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Pick tokens per image: x (B, n, C), idx (B, m) int64 -> (B, m, C).

    ``out[b, i] = x[b, idx[b, i]]``; indices may repeat and need not be sorted.
    """
    op = "gather_tokens"
    check_tensor(op, "x", x, 3, "(B, n, C)")
    check_tensor(op, "idx", idx, 2, "(B, m)")
    check_index(op, "idx", idx)
    check_size_match(op, "batch size", "x", x.shape[0], "idx", idx.shape[0])
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # idx (B, m) -> (B, m, C)
