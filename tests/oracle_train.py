"""Plain float64 reference for dTPS's training-form squeeze (the authors' training branch). Tests only.

finetune-reference.md states the authors' formula: cosine similarity of all tokens; candidate
hosts are the *other* tokens with keep = 1 (a boolean mask: no gradient through it); each token's
best host; match mask ``m[i, j] = [j == h(i)] * pruned_now_i``; fusing weights
``exp(c[i, j] * m[i, j]) * m[i, j]`` and their normaliser ``e + sum``, applied to every row::

    y_j = x_j * e / den_j + sum_i (w_ij / den_j) x_i,    den_j = e + sum_i w_ij

Written for one image as literally as that reads (Python loops over tokens and channels' sums, no
matrix tricks), so that ``torch.autograd`` on it gives the authors' gradient w.r.t. ``x``, ``keep``
and ``pruned_now``. Our tie rule replaces their ``== max`` mask (which can give a token two
hosts): a running argmax with a strict ``>``, so ties go to the lowest index. A token with no
candidate host joins nothing. Shares no code with ``tokenreduce``.
"""

import math

import torch
from torch import Tensor

EPS = 1e-6


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """(C,), (C,) -> (): <a, b> / ((|a| + eps) (|b| + eps))."""
    return (a * b).sum() / ((a.norm() + EPS) * (b.norm() + EPS))


def _host(x: Tensor, keep: Tensor, i: int) -> int | None:
    """Lowest-index most similar token j != i with keep_j = 1, or None. Decided on values only."""
    best, host = None, None
    for j in range(x.shape[0]):
        if j == i or not bool(keep[j, 0].detach() > 0.5):
            continue
        c = float(_cos(x[i].detach(), x[j].detach()))
        if best is None or c > best:
            best, host = c, j
    return host


def oracle_squeeze_masked_one(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """(n, C), (n, 1), (n, 1) -> (n, C) for one image, in float64, differentiable."""
    x, pruned_now = x.double(), pruned_now.double()
    n = x.shape[0]
    hosts = [_host(x, keep, i) for i in range(n)]
    out = []
    for j in range(n):
        den = torch.tensor(math.e, dtype=torch.float64)
        weights = []  # (w_ij, i) for the tokens whose host is j; m[i, j] = 0 (no term) for the rest
        for i in range(n):
            if hosts[i] != j:
                continue
            m = pruned_now[i, 0]  # the match mask m[i, j] = 1 * pruned_now_i
            w = torch.exp(_cos(x[i], x[j]) * m) * m
            weights.append((w, i))
            den = den + w
        y = x[j] * (math.e / den)
        for w, i in weights:
            y = y + (w / den) * x[i]
        out.append(y)
    return torch.stack(out)


def oracle_squeeze_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """Batched: (B, n, C), (B, n, 1), (B, n, 1) -> (B, n, C) float64, one image at a time."""
    return torch.stack([oracle_squeeze_masked_one(x[b], keep[b], pruned_now[b]) for b in range(x.shape[0])])


def oracle_hosts(x: Tensor, keep: Tensor) -> list[list[int | None]]:
    """(B, n, C), (B, n, 1) -> per image, each token's host (None without a candidate)."""
    return [[_host(x[b].detach().double(), keep[b].detach(), i) for i in range(x.shape[1])] for b in range(x.shape[0])]
