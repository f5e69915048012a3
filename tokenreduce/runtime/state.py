"""What flows between the sites of one stage, and what a scorer reads of the attention."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TokenState", "AttnInputs", "keep_mask"]


class TokenState(NamedTuple):
    """The token bookkeeping of one stage, passed from site to site.

    pos:   (B, n) int64, the original patch index of each current patch token (``n_ref`` marks a
           token a reducer appended, such as EViT's fused token).
    keep:  (B, n, 1) hard 0/1 keep mask of the training form (learned scorers in train mode),
           else None: then every current token is alive.
    n_ref: patch tokens of the unreduced stream of this stage.
    owner: (B, n_ref) int64, for each original patch the index of the current token it lives in
           (itself, or the host it was squeezed into), -1 when it was dropped or fused into an
           appended token; None unless the site tracks hosts (``aux=True``).
    """

    pos: Tensor
    keep: Tensor | None
    n_ref: int
    owner: Tensor | None = None


class AttnInputs(NamedTuple):
    """The block attention's query and key (B, H, N, d), its scale, or its probabilities
    (B, H, N, N) when the model computes them explicitly. All None for a site before a block."""

    q: Tensor | None = None
    k: Tensor | None = None
    scale: float | None = None
    probs: Tensor | None = None


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
