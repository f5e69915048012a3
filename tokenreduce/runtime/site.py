"""The module a reduction site inserts into the graph: a thin shell over ``ops``.

It holds the scorer's parameters (dTPS's score head) and static configuration; the token math is
in :mod:`tokenreduce.ops`. Token counts are computed from the runtime shape (static for a given
input size, so ``torch.compile`` specialises once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import TokenReduceError
from ..plan import keep_count
from .state import AttnInputs, TokenState

if TYPE_CHECKING:  # methods imports runtime.state: no import cycle at run time
    from ..methods import Method
    from ..plan import Site

__all__ = ["ReductionSite"]


class ReductionSite(nn.Module):
    """``forward(x (B, P + n, C), state | None, q, k, scale, probs) -> (x' (B, P + k', C), state')``.

    Eval mode, and train mode for non-learned scorers: keep the top ``k`` patch tokens in raster
    order and reduce the rest into them (k' = k plus any appended token). Train mode with a learned
    scorer: fixed length; straight-through Gumbel keep mask, training-form reducer (k' = n).
    Prefix tokens pass through untouched. ``ratio`` may be changed after construction (see
    :func:`tokenreduce.set_keep_ratio`); ``track_hosts`` makes the state record which token each
    original patch lives in (``aux`` outputs).
    """

    def __init__(self, site: Site, method: Method, dim: int) -> None:
        super().__init__()
        self.num_prefix = site.num_prefix
        self.ratio = site.ratio
        self.counts = method.counts
        self.reducer = method.reducer
        self.track_hosts = False
        self.scorer = method.scorer(dim, site.num_prefix)

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio:.4g}, counts={self.counts}, reducer={self.reducer.name}, num_prefix={self.num_prefix}"
        )

    def forward(
        self,
        x: Tensor,
        state: TokenState | None,
        q: Tensor | None = None,
        k: Tensor | None = None,
        scale: float | None = None,
        probs: Tensor | None = None,
    ) -> tuple[Tensor, TokenState]:
        if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            raise TokenReduceError(
                "torch.jit.trace cannot record a reduction site (its token counts are Python ints taken from "
                "the input's shape); use torch.export.export, torch.compile or tokenreduce.export instead"
            )
        P = self.num_prefix
        prefix, patches = x[:, :P], x[:, P:]
        B, n, _ = patches.shape
        if state is None:
            pos = torch.arange(n, device=x.device).expand(B, n)
            owner = pos if self.track_hosts else None
            state = TokenState(pos=pos, keep=None, n_ref=n, owner=owner)
        seen = x if self.scorer.sees_prefix else patches  # what the scorer reads
        if self.training and self.scorer.learned:
            return self._masked(seen, prefix, patches, state)
        keep = keep_count(self.counts, self.ratio, n, state.n_ref)
        if keep == n:  # identity case: keep everything, bit for bit
            return x, state
        scores = self.scorer(seen, state.keep, AttnInputs(q, k, scale, probs))  # (B, n)
        kept_idx, pruned_idx = ops.topk_split(scores, keep)  # (B, k), (B, n - k), raster order
        red = self.reducer
        if red.indexed is not None:  # the reducer gathers for itself (a fused kernel)
            out = red.indexed(x, P, kept_idx, pruned_idx, scores)  # (B, P + k + extra, C)
        else:
            kept = ops.gather_tokens(patches, kept_idx)
            pruned = ops.gather_tokens(patches, pruned_idx)
            out = red.plain(kept, pruned, scores.gather(1, pruned_idx))  # (B, k + extra, C)
            out = torch.cat([prefix, out], dim=1)
        pos = state.pos.gather(1, kept_idx)
        if red.extra_tokens:
            pos = torch.cat([pos, pos.new_full((B, red.extra_tokens), state.n_ref)], dim=1)
        owner = self._owner(state, patches, kept_idx, pruned_idx) if state.owner is not None else None
        return out, TokenState(pos=pos, keep=None, n_ref=state.n_ref, owner=owner)

    def _owner(self, state: TokenState, patches: Tensor, kept_idx: Tensor, pruned_idx: Tensor) -> Tensor:
        """(B, n_ref): the new index of the token each original patch lives in, -1 if none."""
        B, k = kept_idx.shape
        # new index of every current token: kept j -> j; pruned i -> its host, or -1 (dropped)
        new_index = kept_idx.new_full((B, patches.shape[1] + 1), -1)  # one spare slot for owner -1
        new_index = new_index.scatter(1, kept_idx, torch.arange(k, device=kept_idx.device).expand(B, k))
        if self.reducer.assign is not None and pruned_idx.shape[1]:
            host = self.reducer.assign(ops.gather_tokens(patches, kept_idx), ops.gather_tokens(patches, pruned_idx))
            new_index = new_index.scatter(1, pruned_idx, host)
        old = state.owner.masked_fill(state.owner < 0, patches.shape[1])  # -1 reads the spare slot
        return new_index.gather(1, old)

    def _masked(self, seen: Tensor, prefix: Tensor, patches: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        prev = state.keep if state.keep is not None else patches.new_ones(patches.shape[0], patches.shape[1], 1)
        log_probs = self.scorer.log_probs(seen, state.keep)  # (B, n, 2)
        keep = ops.gumbel_keep(log_probs) * prev  # cumulative: a dropped token never returns
        pruned_now = (1.0 - keep) * prev
        patches = self.reducer.masked(patches, keep, pruned_now)
        # training form: tokens stay in place; an original patch is alive in itself or nowhere
        owner = None
        if state.owner is not None:
            owner = torch.where(keep[..., 0] > 0.5, state.pos, torch.full_like(state.pos, -1))
        return torch.cat([prefix, patches], dim=1), TokenState(pos=state.pos, keep=keep, n_ref=state.n_ref, owner=owner)
