"""Between a reduced token stream and the H x W grid its spatial operators need."""

from __future__ import annotations

from torch import Tensor

from .. import ops
from .state import TokenState

__all__ = ["to_grid_tokens", "from_grid_tokens"]


def to_grid_tokens(tokens: Tensor, state: TokenState) -> Tensor:
    """Tokens (B, k, C) about to be laid on the stage's H x W grid -> (B, H * W, C).

    Eval: the kept tokens scattered into a zero grid at their original positions (``Pad(X, M)``).
    Training form: full length, multiplied by the keep mask (``X * M``). Nothing removed yet:
    returned as is.
    """
    if state.keep is not None:
        return tokens * state.keep.to(tokens.dtype)
    if tokens.shape[1] == state.n_ref:
        return tokens
    return ops.scatter_to_grid(tokens, state.pos, state.n_ref)


def from_grid_tokens(tokens: Tensor, state: TokenState) -> Tensor:
    """Tokens computed on the full grid (B, H * W, C) -> the kept ones (B, k, C), in stream order,
    so queries stay reduced. Training form and nothing removed: returned as is."""
    if state.keep is not None or state.pos.shape[1] == state.n_ref:
        return tokens
    return ops.gather_tokens(tokens, state.pos)
