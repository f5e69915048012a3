"""Position-indexed tensors follow the tokens: index a rotary table, a relative position bias or a
positional attention term by the kept tokens' original positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .state import TokenState

__all__ = ["follow_positions"]


def _extended(table: Tensor, axes: tuple[int, ...], fill: float | None) -> Tensor:
    """``table`` with one more row on every token axis for a token a reducer appended (EViT's
    fused token): the mean over that axis, or ``fill`` everywhere."""
    for a in axes:
        row = (
            table.mean(dim=a, keepdim=True)
            if fill is None
            else table.new_full(table.shape[:a] + (1,) + table.shape[a + 1 :], fill)
        )
        table = torch.cat([table, row], dim=a)
    return table


def follow_positions(
    table: Tensor,
    state: TokenState,
    axes: tuple[int, ...],
    rank: int,
    num_prefix: int,
    with_prefix: bool,
    appended: bool,
    fill: float | None = None,
) -> Tensor:
    """``table`` indexed by the current tokens' original positions on its token ``axes``.

    Args:
        table: an image-independent tensor broadcast against a rank-``rank`` image operand
            (right-aligned): a rotary table (n, d), a bias (1, H, N, N), ...
        state: the stage's token state; ``state.pos`` (B, k) the kept tokens' original patch
            positions (``n_ref`` for an appended token).
        axes: the token axes, counted in the image operand's rank (one for q/k, two for logits).
        num_prefix: P, the prefix tokens ahead of the patches.
        with_prefix: the token axes hold P + n_ref rows (prefix rows first, always kept), else n_ref.
        appended: the reducer appends tokens; their rows are the mean row (and column) of the table
            (a bias), or ``fill`` (a rotary factor: 1 for cos, 0 for sin, so they are not rotated).

    Returns:
        (B, ..., k', ...) of rank ``rank``: row j of a token axis is the table's row of the j-th
        current token (a squeezed host keeps its own position). A bias (token axes the last two)
        has unit stride on its last axis and rows padded to 16 elements, as fused attention
        kernels take an ``attn_mask``. Returns ``table`` itself when no token was removed (keep 1,
        or the fixed-length training form).
    """
    pos = state.pos  # (B, k)
    if pos.shape[1] == state.n_ref and not appended:
        return table
    table = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape))  # right-aligned to `rank`
    B = pos.shape[0]
    if with_prefix:
        prefix = torch.arange(num_prefix, device=pos.device).expand(B, num_prefix)
        pos = torch.cat([prefix, pos + num_prefix], dim=1)  # (B, P + k)
    if appended:
        table = _extended(table, axes, fill)
    m = len(axes)
    moved = table.movedim(axes, tuple(range(1, m + 1)))  # (1 or B, L, [L,] rest...)
    batch = torch.arange(B, device=pos.device) if moved.shape[0] == B and B > 1 else pos.new_zeros(B)
    if m == 1:
        out = moved[batch[:, None], pos]  # (B, k, rest...)
    else:
        out = moved[batch[:, None, None], pos[:, :, None], pos[:, None, :]]  # (B, k, k, rest...)
    out = out.movedim(tuple(range(1, m + 1)), axes)
    if axes == (rank - 2, rank - 1):  # an attention bias: laid out as fused attention kernels take it
        out = _aligned_rows(out)
    return out


def _aligned_rows(bias: Tensor, multiple: int = 16) -> Tensor:
    """``bias`` (..., k, k) with unit stride on its last axis and a row stride that is a multiple
    of ``multiple`` elements (a view of a zero-padded copy). sdpa's fused kernels need this of an
    ``attn_mask``; given the gathered bias's (B, k, k, H) storage they fall back to the math path."""
    k = bias.shape[-1]
    pad = -k % multiple
    bias = bias.contiguous()  # F.pad keeps its input's layout
    return F.pad(bias, (0, pad))[..., :k] if pad else bias
