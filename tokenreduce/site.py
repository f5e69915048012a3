"""The module a reduction site inserts into the graph: a thin shell over ``ops``.

It holds the scorer's parameters (dTPS's score head) and static configuration; the token math is
in :mod:`tokenreduce.ops`. Token counts are computed from the runtime shape (static for a given
input size, so ``torch.compile`` specialises once).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import ops
from .methods import INDEXED_REDUCERS, MASKED_REDUCERS, REDUCERS, SCORERS, Method
from .plan import Site, keep_count

__all__ = ["TokenState", "AttnInputs", "ReductionSite", "keep_mask"]


class TokenState(NamedTuple):
    """What flows between the sites of one stage.

    pos:   (B, n) int64, the original patch index of each current patch token (``n_ref`` marks a
           token a reducer appended, such as EViT's fused token).
    keep:  (B, n, 1) hard 0/1 keep mask of the training form (learned scorers in train mode),
           else None: then every current token is alive.
    n_ref: patch tokens of the unreduced stream of this stage.
    """

    pos: Tensor
    keep: Tensor | None
    n_ref: int


class AttnInputs(NamedTuple):
    """The block attention's query and key (B, H, N, d), its scale, or its probabilities
    (B, H, N, N) when the model computes them explicitly."""

    q: Tensor | None
    k: Tensor | None
    scale: float | None
    probs: Tensor | None


class ReductionSite(nn.Module):
    """``forward(x (B, P + n, C), state | None, q, k, probs) -> (x' (B, P + k', C), state')``.

    Eval mode, and train mode for non-learned scorers: keep the top ``k`` patch tokens in raster
    order and reduce the rest into them (k' = k plus any appended token). Train mode with a learned
    scorer: fixed length; straight-through Gumbel keep mask, training-form reducer (k' = n).
    Prefix tokens pass through untouched.
    """

    def __init__(self, site: Site, method: Method, dim: int) -> None:
        super().__init__()
        self.num_prefix = site.num_prefix
        self.ratio = site.ratio
        self.counts = method.counts
        self.reducer = method.reducer
        self.extra = site.extra
        self.scorer = SCORERS[method.scorer](dim, site.num_prefix)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:.4g}, counts={self.counts}, reducer={self.reducer}, num_prefix={self.num_prefix}"

    def forward(
        self,
        x: Tensor,
        state: TokenState | None,
        q: Tensor | None = None,
        k: Tensor | None = None,
        scale: float | None = None,
        probs: Tensor | None = None,
    ) -> tuple[Tensor, TokenState]:
        P = self.num_prefix
        prefix, patches = x[:, :P], x[:, P:]
        B, n, _ = patches.shape
        if state is None:
            pos = torch.arange(n, device=x.device).expand(B, n)
            state = TokenState(pos=pos, keep=None, n_ref=n)
        seen = x if self.scorer.sees_prefix else patches  # what the scorer reads
        if self.training and self.scorer.learned:
            return self._masked(seen, prefix, patches, state)
        keep = keep_count(self.counts, self.ratio, n, state.n_ref)
        if keep == n:  # identity case: keep everything, bit for bit
            return x, state
        scores = self.scorer(seen, state.keep, AttnInputs(q, k, scale, probs))  # (B, n)
        kept_idx, pruned_idx = ops.topk_split(scores, keep)  # (B, k), (B, n - k), raster order
        indexed = INDEXED_REDUCERS.get(self.reducer)
        if indexed is not None:  # the reducer gathers for itself (a fused kernel)
            out = indexed(x, P, kept_idx, pruned_idx, scores)  # (B, P + k + extra, C)
        else:
            kept = ops.gather_tokens(patches, kept_idx)
            pruned = ops.gather_tokens(patches, pruned_idx)
            out = REDUCERS[self.reducer](kept, pruned, scores.gather(1, pruned_idx))  # (B, k + extra, C)
            out = torch.cat([prefix, out], dim=1)
        pos = state.pos.gather(1, kept_idx)
        if self.extra:
            pos = torch.cat([pos, pos.new_full((B, self.extra), state.n_ref)], dim=1)
        return out, TokenState(pos=pos, keep=None, n_ref=state.n_ref)

    def _masked(self, seen: Tensor, prefix: Tensor, patches: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        prev = state.keep if state.keep is not None else patches.new_ones(patches.shape[0], patches.shape[1], 1)
        log_probs = self.scorer.log_probs(seen, state.keep)  # (B, n, 2)
        keep = ops.gumbel_keep(log_probs) * prev  # cumulative: a dropped token never returns
        pruned_now = (1.0 - keep) * prev
        patches = MASKED_REDUCERS[self.reducer](patches, keep, pruned_now)
        return torch.cat([prefix, patches], dim=1), TokenState(pos=state.pos, keep=keep, n_ref=state.n_ref)


def keep_mask(state: TokenState) -> Tensor:
    """(B, n_ref) 0/1 mask over the stage's original patch positions: which tokens are alive.

    Training form: the straight-through keep mask itself (carries gradients). Otherwise built
    from the kept positions (appended tokens, marked ``n_ref``, are left out).
    """
    if state.keep is not None:
        return state.keep[..., 0]
    B = state.pos.shape[0]
    mask = state.pos.new_zeros((B, state.n_ref + 1), dtype=torch.float32)
    return mask.scatter(1, state.pos, 1.0)[:, : state.n_ref]
