"""Between kept tokens and their H x W grid."""

from __future__ import annotations

from torch import Tensor

from ._validate import check_tensor

__all__ = ["scatter_to_grid"]


def scatter_to_grid(x: Tensor, pos: Tensor, n: int) -> Tensor:
    """Place kept tokens at their original positions of a zero grid: (B, k, C), (B, k) -> (B, n, C).

    ``pos`` holds indices in [0, n]; index ``n`` marks a token with no grid position, dropped.
    Row-major positions, so ``out.transpose(1, 2).reshape(B, C, H, W)`` is the padded image.
    """
    check_tensor("scatter_to_grid", "x", x, 3, "(B, k, C)")
    B, k, C = x.shape
    if pos.shape != (B, k):
        raise ValueError(f"scatter_to_grid: `pos` must have shape (B, k) = {(B, k)}, got {tuple(pos.shape)}")
    out = x.new_zeros(B, n + 1, C)  # one spare row catches position n
    return out.scatter(1, pos.unsqueeze(-1).expand(B, k, C), x)[:, :n]
