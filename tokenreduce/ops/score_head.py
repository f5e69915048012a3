"""DynamicViT's learned keep/drop predictor, used by dTPS (tps-reference.md, Sec. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._kernels import define_op, device_kernel
from ._validate import check_float, check_shape, check_tensor

__all__ = ["ScoreHead", "gumbel_keep", "score_head_keep_reference"]


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
            raise ValueError(f"ScoreHead: `dim` must be an even int >= 4 (it is split into "
                             f"halves and quarters), got {dim!r}")
        self.dim = dim
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.classify = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
        )

    def _check(self, op: str, x: Tensor, num_prefix: int) -> None:
        check_tensor(op, "x", x, 3, "(B, P + n, C)")
        N, C = x.shape[1:]
        if C != self.dim:
            raise ValueError(f"{op}: `x` must have {self.dim} channels (the head's dim), "
                             f"got shape {tuple(x.shape)}")
        if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix < N:
            raise ValueError(f"{op}: `num_prefix` must be an int in [0, {N}) (x of shape "
                             f"{tuple(x.shape)}), got {num_prefix!r}")

    def keep_log_prob(self, x: Tensor, num_prefix: int = 0) -> Tensor:
        """``forward(x, None, num_prefix)[..., 0]``, the keep log-probability (B, n), as one
        operator, ``tokenreduce::score_head_keep``, where a device kernel serves it (two Triton
        launches on CUDA instead of ~10); elsewhere the module itself. fp32 from the operator;
        its GEMM operands are in autocast's dtype when autocast is on, else in x's."""
        self._check("ScoreHead.keep_log_prob", x, num_prefix)
        if torch.compiler.is_compiling() or device_kernel(x.device.type, "score_head_keep") is None:
            return self(x, None, num_prefix)[..., 0]
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        norm, first = self.embed[0], self.embed[1]
        lin2, lin3, lin4 = self.classify[0], self.classify[2], self.classify[4]
        return score_head_keep_op(
            x, norm.weight, norm.bias, first.weight, first.bias, lin2.weight, lin2.bias,
            lin3.weight, lin3.bias, lin4.weight, lin4.bias, num_prefix, norm.eps, dtype,
        )

    def forward(self, x: Tensor, prev_keep: Tensor | None = None, num_prefix: int = 0) -> Tensor:
        op = "ScoreHead"
        self._check(op, x, num_prefix)
        B, N, C = x.shape
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


def score_head_keep_reference(
    x: Tensor, ln_w: Tensor, ln_b: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, num_prefix: int, eps: float, dtype: torch.dtype,
) -> Tensor:
    """``ScoreHead``'s keep log-probability (B, n) fp32 of ``x`` (B, P + n, C) from its
    parameters, with autocast's casts spelled out: the norm in fp32, every Linear's operands and
    output in ``dtype``, the log-softmax in fp32."""
    half = x.shape[-1] // 2

    def linear(t: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.linear(t, w.to(dtype), None if b is None else b.to(dtype))

    with torch.autocast(x.device.type, enabled=False):
        u = F.layer_norm(x.float(), (x.shape[-1],), ln_w.float(), ln_b.float(), eps).to(dtype)
        h = F.gelu(linear(u, w1, b1))[:, num_prefix:]  # (B, n, C)
        glob = h[..., half:].mean(dim=1, keepdim=True)  # (B, 1, C/2)
        z = F.gelu(linear(h[..., :half], w2[:, :half]) + linear(glob, w2[:, half:], b2))
        z = F.gelu(linear(z, w3, b3))
        return F.log_softmax(linear(z, w4, b4).float(), dim=-1)[..., 0]  # (B, n)


def _score_head_keep_impl(
    x: Tensor, ln_w: Tensor, ln_b: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, num_prefix: int, eps: float, dtype: torch.dtype,
) -> Tensor:
    """``tokenreduce::score_head_keep``: (B, P + n, C) and the head's parameters -> (B, n) fp32."""
    kernel = device_kernel(x.device.type, "score_head_keep")
    fn = score_head_keep_reference if kernel is None else kernel
    return fn(x, ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4, num_prefix, eps, dtype)


def _score_head_keep_fake(x, ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4, num_prefix, eps, dtype) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1] - num_prefix), dtype=torch.float32)


score_head_keep_op = define_op("tokenreduce::score_head_keep", _score_head_keep_impl, _score_head_keep_fake)


def _keep_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:11])
    ctx.num_prefix, ctx.eps, ctx.dtype = inputs[11:]


def _keep_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    # The kernels are forward only: recompute with the reference and differentiate that.
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:11]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(want) for t, want in zip(saved, need)]
        out = score_head_keep_reference(*inputs, ctx.num_prefix, ctx.eps, ctx.dtype)
        wanted = [t for t, want in zip(inputs, need) if want]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return (*(next(grads) if want else None for want in need), None, None, None)


score_head_keep_op.register_autograd(_keep_backward, setup_context=_keep_setup_context)


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
        raise ValueError(f"{op}: `log_probs` must have 2 channels (keep, drop) (B, n, 2), "
                         f"got shape {tuple(log_probs.shape)}")
    return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., :1]  # (B, n, 1)
