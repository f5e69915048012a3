"""The TPS supplement's ablation reducers (Table 1a: matching; Table 1b: fusing) as pure ops.

Each one replaces one step of the squeeze (``ops.squeeze``, tps-reference.md Sec. 1) and keeps the
rest: cosine similarity of raw tokens with the ``+ 1e-6`` norm rule, ties to the lowest index.

1:1 matching (Table 1a), split form::

    match_one_to_one(reserved (B, Nr, C), pruned (B, Np, C)) -> (B, Nr, C)

The matching runs from the reserved side: each reserved token ``j`` takes the one pruned token
``g(j) = argmax_i c[i, j]`` nearest to it and ``y_j = (e xr_j + exp(c_gj) xp_g(j)) / (e + exp(c_gj))``.
A pruned token may be taken by several reserved tokens or by none (then it is lost), unlike the
N:1 squeeze where every pruned token joins exactly one host.

Average fusing (Table 1b), split form: the squeeze's N:1 matching (``h(i) = argmax_j c[i, j]``)
with equal weights instead of similarity weights::

    average_fuse(reserved, pruned) -> (B, Nr, C),  y_j = (xr_j + sum_{h(i)=j} xp_i) / (1 + m_j)

where ``m_j`` counts the pruned tokens hosted by ``j``. Both are convex combinations; a reserved
token that receives nothing is returned bit for bit; ``Np == 0`` returns ``reserved`` itself.

Training forms (fixed length, for learned scorers; ``keep`` and ``pruned_now`` are hard 0/1
masks (B, n, 1) that may carry straight-through gradients)::

    match_one_to_one_masked(x (B, n, C), keep, pruned_now) -> (B, n, C)
    average_fuse_masked(x (B, n, C), keep, pruned_now) -> (B, n, C)

With the same decisions their ``keep == 1`` rows equal the split forms' outputs; every other row
is returned unchanged. Gradients reach ``x`` and ``pruned_now`` (through the fusing weights).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._validate import check_masked_inputs, check_token_pair
from .squeeze import SELF_WEIGHT, compute_dtype, cosine

__all__ = [
    "average_fuse",
    "average_fuse_assign",
    "average_fuse_masked",
    "match_one_to_one",
    "match_one_to_one_assign",
    "match_one_to_one_masked",
]


def _argmax_finite(cos: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Lowest-index maximum over the last dim, NaN ranked below every number; ``allowed`` (bool,
    broadcastable) masks candidates out. (..., N) -> (...,) int64."""
    bad = cos.isnan() if allowed is None else cos.isnan() | ~allowed
    return cos.masked_fill(bad, float("-inf")).argmax(dim=-1)


def _offsets(index: Tensor, rows: int) -> Tensor:
    """(B, M) per-image row ids -> (B * M,) ids into the flattened (B * rows) rows."""
    return (index + torch.arange(index.shape[0], device=index.device).unsqueeze(-1) * rows).reshape(-1)


def _split_form(op: str, reserved: Tensor, pruned: Tensor, fuse: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A split form on a checked (B, Nr, C), (B, Np, C) pair: ``fuse(xr, xp)`` -> (B, Nr, C) run in
    the compute dtype and cast back; ``reserved`` itself when ``Np == 0``."""
    check_token_pair(op, reserved, pruned)
    if pruned.shape[1] == 0:
        return reserved
    work = compute_dtype(reserved.dtype)
    return fuse(reserved.to(work), pruned.to(work)).to(reserved.dtype)


# --------------------------------------------------------------------------- 1:1 matching


def match_one_to_one_assign(reserved: Tensor, pruned: Tensor) -> Tensor:
    """(B, Nr, C), (B, Np, C) -> (B, Np) int64: for each pruned token, the lowest-index reserved
    token that took it under 1:1 matching, or -1 when none did (it is lost)."""
    check_token_pair("match_one_to_one_assign", reserved, pruned)
    B, Nr, _ = reserved.shape
    Np = pruned.shape[1]
    if Np == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=reserved.device)
    work = compute_dtype(reserved.dtype)
    taken = _argmax_finite(cosine(reserved.to(work), pruned.to(work)))  # (B, Nr): pruned index per reserved
    order = torch.arange(Nr, device=reserved.device).expand(B, Nr)
    first = torch.full((B, Np), Nr, dtype=torch.int64, device=reserved.device)
    first = first.scatter_reduce(1, taken, order, reduce="amin")  # (B, Np): lowest taker, Nr if none
    return torch.where(first < Nr, first, torch.full_like(first, -1))


def match_one_to_one(reserved: Tensor, pruned: Tensor) -> Tensor:
    """Table 1a's 1:1 matching: every reserved token fuses its nearest pruned token.

    (B, Nr, C), (B, Np, C) -> (B, Nr, C); see the module docstring. Differentiable w.r.t. both.
    """
    return _split_form("match_one_to_one", reserved, pruned, _match_one_to_one)


def _match_one_to_one(xr: Tensor, xp: Tensor) -> Tensor:
    """``match_one_to_one`` in the compute dtype."""
    cos = cosine(xr, xp)  # (B, Nr, Np): row j a reserved token, column i a pruned one
    taken = _argmax_finite(cos)  # (B, Nr)
    w = cos.gather(-1, taken.unsqueeze(-1)).exp()  # (B, Nr, 1), in [exp(-1), e]
    w = torch.nan_to_num(w, nan=0.0)  # a NaN token takes nothing
    partner = xp.gather(1, taken.unsqueeze(-1).expand(-1, -1, xp.shape[2]))  # (B, Nr, C)
    return (SELF_WEIGHT * xr + w * partner) / (SELF_WEIGHT + w)


def match_one_to_one_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """Training form of 1:1 matching: (B, n, C), (B, n, 1), (B, n, 1) -> (B, n, C).

    Each ``keep == 1`` token ``j`` takes the ``pruned_now == 1`` token ``g(j)`` most similar to it
    (lowest index on ties) with weight ``w_j = exp(c_j,g(j)) * pruned_now_g(j)``:
    ``y_j = x_j + keep_j * w_j (x_g(j) - x_j) / (e + w_j)``. An image with nothing pruned now,
    and every row with ``keep == 0``, is returned unchanged.
    """
    check_masked_inputs("match_one_to_one_masked", x, keep, pruned_now)
    out_dtype = x.dtype
    work = compute_dtype(out_dtype)
    xw, keep_w, pruned_w = x.to(work), keep.to(work), pruned_now.to(work)
    cos = cosine(xw, xw)  # (B, n, n): row j a possible taker, column i a candidate
    candidate = pruned_now.transpose(1, 2) > 0.5  # (B, 1, n)
    taken = _argmax_finite(cos, candidate)  # (B, n); 0 where there is no candidate (then weight 0)
    m = pruned_w.gather(1, taken.unsqueeze(-1))  # (B, n, 1): 1 if the taken token is pruned now
    c = torch.nan_to_num(cos.gather(-1, taken.unsqueeze(-1)), nan=0.0)
    w = c.exp() * m  # finite: no -inf enters the autograd graph
    partner = xw.gather(1, taken.unsqueeze(-1).expand(-1, -1, xw.shape[2]))  # (B, n, C)
    # written as an update so a row receiving nothing (w = 0 or keep = 0) stays bit-exact
    return (xw + keep_w * (w * (partner - xw) / (SELF_WEIGHT + w))).to(out_dtype)


# --------------------------------------------------------------------------- average fusing


def average_fuse_assign(reserved: Tensor, pruned: Tensor) -> Tensor:
    """(B, Nr, C), (B, Np, C) -> (B, Np) int64: each pruned token's host (the squeeze's N:1 rule)."""
    check_token_pair("average_fuse_assign", reserved, pruned)
    work = compute_dtype(reserved.dtype)
    return _argmax_finite(cosine(pruned.to(work), reserved.to(work)))


def average_fuse(reserved: Tensor, pruned: Tensor) -> Tensor:
    """Table 1b's average fusing: N:1 matching, every group member weighted equally.

    (B, Nr, C), (B, Np, C) -> (B, Nr, C); see the module docstring. Differentiable w.r.t. both.
    """
    return _split_form("average_fuse", reserved, pruned, _average_fuse)


def _average_fuse(xr: Tensor, xp: Tensor) -> Tensor:
    """``average_fuse`` in the compute dtype."""
    B, Nr, C = xr.shape
    Np = xp.shape[1]
    host = _argmax_finite(cosine(xp, xr))  # (B, Np)
    flat = _offsets(host, Nr)  # (B * Np,)
    total = xr.reshape(B * Nr, C).index_add(0, flat, xp.reshape(B * Np, C))
    count = xr.new_zeros(B * Nr, 1).index_add(0, flat, xr.new_ones(B * Np, 1))
    fused = (total / (1.0 + count)).reshape(B, Nr, C)
    # rows hosting nothing take `xr` itself (x / 1 is x, but keep the rule explicit and exact)
    return torch.where(count.reshape(B, Nr, 1) > 0, fused, xr)


def average_fuse_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """Training form of average fusing: (B, n, C), (B, n, 1), (B, n, 1) -> (B, n, C).

    Every token picks its host among the *other* ``keep == 1`` tokens (lowest index on ties); a
    ``pruned_now`` token adds weight ``pruned_now_i`` (1) to its host's group:
    ``y_j = x_j + sum_{h(i)=j} m_i (x_i - x_j) / (1 + sum_{h(i)=j} m_i)``. Rows receiving nothing
    are returned unchanged; the gradient reaches ``pruned_now`` through ``m``.
    """
    check_masked_inputs("average_fuse_masked", x, keep, pruned_now)
    out_dtype = x.dtype
    work = compute_dtype(out_dtype)
    xw = x.to(work)
    B, n, C = xw.shape
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    hostable = (keep.transpose(1, 2) > 0.5) & ~eye  # (B, n, n): column j may host row i
    host = _argmax_finite(cosine(xw, xw), hostable)  # (B, n); 0 when no candidate (then m = 0)
    m = pruned_now.to(work) * hostable.any(dim=-1, keepdim=True)  # (B, n, 1)
    flat = _offsets(host, n)  # (B * n,)
    x_host = xw.gather(1, host.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    delta = xw.new_zeros(B * n, C).index_add(0, flat, (m * (xw - x_host)).reshape(B * n, C))
    den = xw.new_ones(B * n, 1).index_add(0, flat, m.reshape(B * n, 1))
    return (xw + (delta / den).reshape(B, n, C)).to(out_dtype)
