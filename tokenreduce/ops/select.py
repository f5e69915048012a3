"""Choosing tokens: split indices by score, and gather tokens by index.

``topk_split`` keeps both halves in ascending index order (the original raster order), so
spatial models can scatter kept tokens back to their grid positions and later ops see tokens
in the same relative order as the unreduced model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_float, check_index, check_size_match, check_tensor

__all__ = ["gather_tokens", "topk_split"]


def topk_split(scores: Tensor, k: int | torch.SymInt) -> tuple[Tensor, Tensor]:
    """Split token indices by score: (B, n), k -> (kept (B, k), pruned (B, n - k)), int64.

    ``kept`` holds the ``k`` highest-scoring tokens, ``pruned`` the rest; both ascending. Equal
    scores are ranked by index (lower first), so the split is deterministic. ``k == n`` is the
    identity case: ``kept`` is ``0..n-1`` and ``pruned`` is empty.
    """
    op = "topk_split"
    check_tensor(op, "scores", scores, 2, "(B, n)")
    check_float(op, "scores", scores)
    n = scores.shape[1]
    # SymInt too: under torch.compile with dynamic shapes k is often computed from n.
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"{op}: `k` must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{op}: `k` must satisfy 1 <= k <= n = {n} (scores of shape "
                         f"{tuple(scores.shape)}), got k = {k}")
    # A stable descending sort (not topk, whose tie order is unspecified) makes ties go to
    # the lower index; n is a few hundred, so the O(n log n) sort is negligible.
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (B, n)
    kept = order[:, :k].sort(dim=-1).values  # (B, k)
    pruned = order[:, k:].sort(dim=-1).values  # (B, n - k)
    return kept, pruned


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
