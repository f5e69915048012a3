"""The auxiliary outputs of ``apply(..., aux=True)``: ``out, aux = reduced(x)``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .state import TokenState

__all__ = ["Aux", "hosts_of", "final_keep", "make_aux"]


class Aux(NamedTuple):
    """What the losses and pictures need besides the model's own output.

    keeps:      per site, (B, n_ref) 0/1 alive mask over the stage's original patch positions
                (the straight-through Gumbel mask in dTPS/DynamicViT training: losses reach the heads).
    tokens:     (B, N_final, C) the final tokens before pooling (timm's ``forward_features``).
    token_keep: (B, N_final) 1 where a final token is alive: all ones when tokens were really
                removed; the last keep mask of the final stage (prefix rows 1) in the training form.
    hosts:      per site, (B, n_ref) int64: the original patch position of the token each original
                patch lives in after that site (itself if kept, its host if squeezed), -1 if it was
                dropped or fused into an appended token.
    """

    keeps: tuple[Tensor, ...]
    tokens: Tensor
    token_keep: Tensor
    hosts: tuple[Tensor, ...]


def hosts_of(state: TokenState) -> Tensor:
    """(B, n_ref) int64: original position of the token each original patch lives in, or -1."""
    owner = state.owner
    pos = state.pos.gather(1, owner.clamp_min(0))  # (B, n_ref)
    return pos.masked_fill(owner < 0, -1)


def final_keep(tokens: Tensor, state: TokenState | None) -> Tensor:
    """(B, N_final) alive mask of the final tokens (B, N_final, C) given the final stage's state:
    ones, except in the training form, where the patch rows take the last keep mask."""
    B, N = tokens.shape[:2]
    if state is None or state.keep is None or state.keep.shape[1] > N:
        return tokens.new_ones((B, N), dtype=torch.float32)
    keep = state.keep[..., 0].float()  # (B, n)
    return torch.cat([keep.new_ones((B, N - keep.shape[1])), keep], dim=1)


def make_aux(keeps: tuple[Tensor, ...], tokens: Tensor, token_keep: Tensor, hosts: tuple[Tensor, ...]) -> Aux:
    """Build the :class:`Aux` record (a graph node calls this)."""
    return Aux(tuple(keeps), tokens, token_keep, tuple(hosts))
