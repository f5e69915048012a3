"""DynamicViT's learned keep/drop predictor, used by dTPS (tps-reference.md, Sec. 2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_float, check_shape, check_tensor

__all__ = ["ScoreHead", "gumbel_keep"]


class ScoreHead(nn.Module):
    """Per-token keep/drop log-probabilities from local and global features.

    ``forward(x (B, P + n, C), prev_keep (B, n, 1) | None, num_prefix=P) -> (B, n, 2)``
    log-probabilities of the last n tokens, channel 0 = keep. ``embed`` is LayerNorm ->
    Linear(C, C) -> GELU; its first C/2 channels are the local feature, the mean of the other
    C/2 over alive tokens (weighted by ``prev_keep``; all tokens when None) the global one.
    ``classify`` maps the concatenation through C -> C/2 -> C/4 -> 2 with GELUs between. The P
    leading rows (prefix tokens) go through ``embed``, which is row-wise, and are dropped right
    after: a reduction site passes its whole stream, so the norm reads a whole tensor (over the
    sliced patch rows Inductor compiled it as a looped reduction: 112 us per batch at DeiT-S's
    three sites on an H200).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4 or dim % 2:
            raise ValueError(
                f"ScoreHead: `dim` must be an even int >= 4 (it is split into halves and quarters), got {dim!r}"
            )
        self.dim = dim
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.classify = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
        )

    def forward(self, x: Tensor, prev_keep: Tensor | None = None, num_prefix: int = 0) -> Tensor:
        op = "ScoreHead"
        check_tensor(op, "x", x, 3, "(B, P + n, C)")
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"{op}: `x` must have {self.dim} channels (the head's dim), got shape {tuple(x.shape)}")
        if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix < N:
            raise ValueError(
                f"{op}: `num_prefix` must be an int in [0, {N}) (x of shape {tuple(x.shape)}), got {num_prefix!r}"
            )
        n = N - num_prefix
        h = self.embed(x)[:, num_prefix:]  # (B, n, C)
        half = C // 2
        local, feat = h[..., :half], h[..., half:]  # (B, n, C/2) each
        if prev_keep is None:
            glob = feat.mean(dim=1, keepdim=True)  # (B, 1, C/2)
        else:
            check_tensor(op, "prev_keep", prev_keep, 3, "(B, n, 1)")
            check_float(op, "prev_keep", prev_keep)
            check_shape(op, "prev_keep", prev_keep, (B, n, 1), "(B, n, 1)")
            w = prev_keep.to(h.dtype)
            # The clamp only matters when no token is alive (0 / 0); with >= 1 alive token
            # and 0/1 masks the denominator is >= 1 and the value is the plain weighted mean.
            glob = (feat * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # classify[0] of cat([local, glob]): its global half is one product per image, not per
        # token, and no (B, n, C) concatenation is written.
        first = self.classify[0]
        z = F.linear(local, first.weight[:, :half]) + F.linear(glob, first.weight[:, half:], first.bias)
        return F.log_softmax(self.classify[1:](z), dim=-1)  # (B, n, 2)


def gumbel_keep(log_probs: Tensor, tau: float = 1.0) -> Tensor:
    """Hard Gumbel-softmax keep sample: (B, n, 2) log-probs -> (B, n, 1), exactly 0 or 1.

    ``F.gumbel_softmax(log_probs, tau, hard=True)[..., :1]``: forward is the hard sample,
    backward the gradient of the soft one (straight-through). torch forms the output as
    ``y_hard - y_soft.detach() + y_soft``; with two classes the winner's soft value is >= 0.5,
    so ``1 - y_soft`` is exact (Sterbenz) and the sum rounds back to exactly 1 (and 0 stays 0).
    """
    op = "gumbel_keep"
    check_tensor(op, "log_probs", log_probs, 3, "(B, n, 2)")
    check_float(op, "log_probs", log_probs)
    if log_probs.shape[2] != 2:
        raise ValueError(
            f"{op}: `log_probs` must have 2 channels (keep, drop) (B, n, 2), got shape {tuple(log_probs.shape)}"
        )
    return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., :1]  # (B, n, 1)
