"""The two baseline reducers, beside ``squeeze`` (TPS): EViT's fusion and DynamicViT's drop."""

from __future__ import annotations

from torch import Tensor

from ._validate import check_float, check_size_match, check_tensor, check_token_pair

__all__ = ["drop", "fuse_one"]


def fuse_one(pruned: Tensor, weights: Tensor) -> Tensor:
    """EViT's extra token: pruned (B, Np, C), weights (B, Np) -> (B, 1, C) = sum_i w_i x_i.

    The weights are used as given (EViT passes the raw class-attention scores, not
    renormalised); they are cast to ``pruned``'s dtype. ``Np == 0`` gives a zero token.
    """
    op = "fuse_one"
    check_tensor(op, "pruned", pruned, 3, "(B, Np, C)")
    check_tensor(op, "weights", weights, 2, "(B, Np)")
    check_float(op, "pruned", pruned)
    check_float(op, "weights", weights)
    check_size_match(op, "batch size", "pruned", pruned.shape[0], "weights", weights.shape[0])
    check_size_match(op, "number of tokens", "pruned", pruned.shape[1], "weights", weights.shape[1])
    return weights.to(pruned.dtype).unsqueeze(1) @ pruned  # (B, 1, Np) @ (B, Np, C) -> (B, 1, C)


def drop(reserved: Tensor, pruned: Tensor) -> Tensor:
    """DynamicViT's reducer: (B, Nr, C), (B, Np, C) -> ``reserved`` itself; pruned are discarded.

    Takes the same arguments as ``squeeze`` so the two are interchangeable.
    """
    check_token_pair("drop", reserved, pruned)
    return reserved
