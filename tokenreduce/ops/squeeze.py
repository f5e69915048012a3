"""TPS token squeezing (tps-reference.md, Sec. 1): pruned tokens are fused into their hosts.

Split form (inference, eTPS in training)::

    squeeze(reserved (B, Nr, C), pruned (B, Np, C)) -> (B, Nr, C)

Each pruned token ``i`` picks the reserved token ``h(i)`` of highest cosine similarity (ties go
to the lowest index) and every reserved token ``j`` becomes the convex combination::

    y_j = (e * xr_j + sum_{i: h(i)=j} exp(c_ij) * xp_i) / (e + sum_{i: h(i)=j} exp(c_ij))

A reserved token that hosts nothing is returned bit for bit; ``Np == 0`` returns ``reserved``.
A NaN similarity (a token holding NaN or inf) ranks below every number, so NaN stays in its
image; the normalisation does not overflow for large tokens (``unit_rows``). The backward is
twice differentiable (double backward keeps every second-order term).

``squeeze`` dispatches to the custom operator ``torch.ops.tokenreduce.squeeze`` (``squeeze_op``),
which carries an autograd formula. ``squeeze_reference`` serves every device that has no fused
kernel; a fused one is registered with ``register_device_kernels`` (see ``ops/_kernels.py``:
under ``torch.compile`` a Triton kernel is then launched from the compiled graph itself). The
backward stays the reference's, so a forward kernel must match it numerically.

Indexed form (what a reduction site calls): the gathers and the prefix pass-through are part of
the operator ``torch.ops.tokenreduce.squeeze_tokens``, so a fused kernel reads the kept and pruned
rows straight from the token stream and writes the site's whole output in one go::

    squeeze_tokens(x (B, P + n, C), kept_idx (B, k), pruned_idx (B, n - k), num_prefix=P)
        -> (B, P + k, C) = cat([x[:, :P], squeeze(x[:, P:][kept_idx], x[:, P:][pruned_idx])])

Training form (dTPS, fixed length, straight-through masks)::

    squeeze_masked(x (B, n, C), keep (B, n, 1), pruned_now (B, n, 1)) -> (B, n, C)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._kernels import define_op, device_kernel, register_device_kernels
from ._validate import (
    autocast_off,
    check_float,
    check_index_pair,
    check_masked_inputs,
    check_num_prefix,
    check_tensor,
    check_token_pair,
)
from .select import gather_tokens

__all__ = [
    "SqueezeAssignment",
    "register_device_kernels",
    "squeeze",
    "squeeze_assign",
    "squeeze_masked",
    "squeeze_op",
    "squeeze_reference",
    "squeeze_tokens",
    "squeeze_tokens_op",
    "squeeze_tokens_reference",
]

# The host joins its own group with self-similarity 1, i.e. weight exp(1) (the authors' math.e).
SELF_WEIGHT = math.e
# Added to the norm, not clamped, so a zero token normalises to zero (cosine 0 with everything).
NORM_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32/fp64 compute in place; half types upcast so exp and the weighted sums stay accurate."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def unit_rows(x: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, C): ``x / (|x| + 1e-6)`` per row, without overflow.

    Each row is divided by its largest magnitude m first, and the rule rewritten exactly as
    ``(x / m) / (|x / m| + 1e-6 / m)``: the squared norm of a float32 row above ~1.8e19 would
    overflow to inf (and every cosine of it read 0). A zero row stays zero; a row holding inf or
    NaN becomes NaN.
    """
    m = x.abs().amax(dim=-1, keepdim=True)  # (B, N, 1)
    m = torch.where(m > 0, m, torch.ones_like(m))  # zero rows: divide by 1 (NaN rows stay NaN)
    xs = x / m
    return xs / (xs.norm(dim=-1, keepdim=True) + NORM_EPS / m)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B, Na, C), (B, Nb, C) -> (B, Na, Nb) cosine similarity with the ``+ 1e-6`` norm rule."""
    return unit_rows(a) @ unit_rows(b).transpose(-1, -2)


def _match(reserved: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    """Hosts and their similarity: ``(host (B, Np) int64, exp(c_i,host) (B, Np, 1))``.

    A NaN similarity (a token holding NaN or inf) ranks below every number, so a finite token
    never picks a NaN host; a token whose similarities are all NaN joins host 0 with weight 0.
    """
    cos = cosine(pruned, reserved)  # (B, Np, Nr)
    cos = cos.masked_fill(cos.isnan(), float("-inf"))
    # torch.argmax returns the first maximum: the lowest-index tie rule of the spec.
    host = cos.argmax(dim=-1)  # (B, Np)
    weight = cos.gather(-1, host.unsqueeze(-1)).exp()  # (B, Np, 1), in (exp(-1), e]; 0 when NaN
    return host, weight


def _flat_index(host: Tensor, n_hosts: int) -> Tensor:
    """(B, Np) per-image host ids -> (B * Np,) ids into the flattened (B * n_hosts) rows."""
    offset = torch.arange(host.shape[0], device=host.device).unsqueeze(-1) * n_hosts
    return (host + offset).reshape(-1)


def squeeze_reference(reserved: Tensor, pruned: Tensor) -> Tensor:
    """Plain batched squeeze: (B, Nr, C), (B, Np, C) -> (B, Nr, C). No validation.

    The default kernel of ``tokenreduce::squeeze`` and the function its backward differentiates.
    Computes in the input dtype for fp32/fp64 and in float32 for half types. Returns a new
    tensor (never an alias of ``reserved``), so it is valid as a custom-op kernel.
    """
    # Autocast stays enabled inside a custom op's kernel: it would run the similarity matmul in
    # bf16 and then fail to add bf16 rows into the float32 accumulators. The dtype policy here is
    # explicit instead.
    with autocast_off(reserved.device):
        return _squeeze_reference(reserved, pruned)


def _squeeze_reference(reserved: Tensor, pruned: Tensor) -> Tensor:
    out_dtype = reserved.dtype
    work = compute_dtype(out_dtype)
    xr, xp = reserved.to(work), pruned.to(work)
    B, Nr, C = xr.shape
    Np = xp.shape[1]

    host, weight = _match(xr, xp)
    flat = _flat_index(host, Nr)  # (B * Np,)
    # Numerator and denominator of y_j, accumulated per host over the flattened batch.
    num = (xr * SELF_WEIGHT).reshape(B * Nr, C).index_add(0, flat, (weight * xp).reshape(B * Np, C))
    den = xr.new_full((B * Nr, 1), SELF_WEIGHT).index_add(0, flat, weight.reshape(B * Np, 1))
    count = xr.new_zeros(B * Nr, 1).index_add(0, flat, xr.new_ones(B * Np, 1))
    fused = (num / den).reshape(B, Nr, C)
    # Rows hosting nothing take `xr` itself: e * x / e is not always x in floating point.
    out = torch.where(count.reshape(B, Nr, 1) > 0, fused, xr)
    return out.to(out_dtype)


class SqueezeAssignment(NamedTuple):
    """Who goes where, and with which weight (the convex coefficients of Sec. 1).

    host:        (B, Np) int64, the reserved token each pruned token joins.
    weight:      (B, Np), coefficient of pruned token i in y_{host(i)}.
    self_weight: (B, Nr), coefficient of reserved token j in y_j (1 when it hosts nothing).
    For every j, ``self_weight[j] + sum_{i: host(i)=j} weight[i] == 1``.
    """

    host: Tensor
    weight: Tensor
    self_weight: Tensor


def squeeze_assign(reserved: Tensor, pruned: Tensor) -> SqueezeAssignment:
    """The matching and normalised weights ``squeeze`` uses: (B, Nr, C), (B, Np, C) -> see
    ``SqueezeAssignment``. For inspection and tests; ``squeeze`` does not call it."""
    check_token_pair("squeeze_assign", reserved, pruned)
    work = compute_dtype(reserved.dtype)
    xr, xp = reserved.to(work), pruned.to(work)
    B, Nr, _ = xr.shape
    host, w = _match(xr, xp)
    flat = _flat_index(host, Nr)  # (B * Np,)
    den = xr.new_full((B * Nr, 1), SELF_WEIGHT).index_add(0, flat, w.reshape(-1, 1))
    den = den.reshape(B, Nr)  # (B, Nr)
    weight = w.squeeze(-1) / den.gather(1, host)  # (B, Np)
    return SqueezeAssignment(host, weight, SELF_WEIGHT / den)


def _squeeze_impl(reserved: Tensor, pruned: Tensor) -> Tensor:
    """``tokenreduce::squeeze``: (B, Nr, C), (B, Np, C) -> (B, Nr, C)."""
    kernel = device_kernel(reserved.device.type, "squeeze")
    return squeeze_reference(reserved, pruned) if kernel is None else kernel(reserved, pruned)


def _squeeze_fake(reserved: Tensor, pruned: Tensor) -> Tensor:
    return torch.empty_like(reserved)


squeeze_op = define_op("tokenreduce::squeeze", _squeeze_impl, _squeeze_fake)


def _setup_context(ctx, inputs, output) -> None:
    reserved, pruned = inputs
    ctx.save_for_backward(reserved, pruned)


def _reference_grads(
    reference, inputs: tuple[Tensor, ...], needs: tuple[bool, ...], grad: Tensor, *static
) -> list[Tensor | None]:
    """The vector-Jacobian product of ``reference(*inputs, *static)`` with ``grad``: one entry per
    input (None where not needed).

    The host choice is piecewise constant in the inputs, so differentiating the reference with
    the hosts it picks is the exact gradient almost everywhere. Recomputing the forward here
    (instead of saving the cosine matrix) keeps the saved state at the inputs. Under
    ``backward(create_graph=True)`` (grad mode is then on) the recomputation runs on the inputs
    themselves and keeps its graph, so double backward gets every second-order term.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xs = [t if create_graph else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        out = reference(*xs, *static)
        wanted = [t for t, need in zip(xs, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True, create_graph=create_graph))
    return [next(grads) if need else None for need in needs]


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    grad_r, grad_p = _reference_grads(squeeze_reference, ctx.saved_tensors, ctx.needs_input_grad, grad)
    return grad_r, grad_p


squeeze_op.register_autograd(_backward, setup_context=_setup_context)


def squeeze(reserved: Tensor, pruned: Tensor) -> Tensor:
    """Fuse ``pruned`` (B, Np, C) into ``reserved`` (B, Nr, C); returns (B, Nr, C).

    See the module docstring for the math. Identity case: ``Np == 0`` returns ``reserved``
    itself (no copy). Differentiable w.r.t. both inputs. Under ``torch.compile`` the operator's
    device kernel is traced into the graph (a triton op; torch 2.5: one opaque node).
    """
    check_token_pair("squeeze", reserved, pruned)
    if pruned.shape[1] == 0:
        return reserved
    return torch.ops.tokenreduce.squeeze(reserved, pruned)


def squeeze_tokens_reference(x: Tensor, kept_idx: Tensor, pruned_idx: Tensor, num_prefix: int) -> Tensor:
    """Plain indexed squeeze: (B, P + n, C), (B, k), (B, n - k), P -> (B, P + k, C). No validation.

    The default kernel of ``tokenreduce::squeeze_tokens`` and what its backward differentiates.
    """
    patches = x[:, num_prefix:]
    reserved = squeeze_reference(gather_tokens(patches, kept_idx), gather_tokens(patches, pruned_idx))
    return torch.cat([x[:, :num_prefix], reserved], dim=1)


def _squeeze_tokens_impl(x: Tensor, kept_idx: Tensor, pruned_idx: Tensor, num_prefix: int) -> Tensor:
    """``tokenreduce::squeeze_tokens``: (B, P + n, C), (B, k), (B, n - k), P -> (B, P + k, C)."""
    kernel = device_kernel(x.device.type, "squeeze_tokens")
    if kernel is None:
        return squeeze_tokens_reference(x, kept_idx, pruned_idx, num_prefix)
    return kernel(x, kept_idx, pruned_idx, num_prefix)


def _squeeze_tokens_fake(x: Tensor, kept_idx: Tensor, pruned_idx: Tensor, num_prefix: int) -> Tensor:
    return x.new_empty((x.shape[0], num_prefix + kept_idx.shape[1], x.shape[2]))


squeeze_tokens_op = define_op("tokenreduce::squeeze_tokens", _squeeze_tokens_impl, _squeeze_tokens_fake)


def _tokens_setup_context(ctx, inputs, output) -> None:
    x, kept_idx, pruned_idx, num_prefix = inputs
    ctx.save_for_backward(x, kept_idx, pruned_idx)
    ctx.num_prefix = num_prefix


def _tokens_backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
    x, kept_idx, pruned_idx = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    (grad_x,) = _reference_grads(squeeze_tokens_reference, (x,), (True,), grad, kept_idx, pruned_idx, ctx.num_prefix)
    return grad_x, None, None, None


squeeze_tokens_op.register_autograd(_tokens_backward, setup_context=_tokens_setup_context)


def squeeze_tokens(x: Tensor, kept_idx: Tensor, pruned_idx: Tensor, num_prefix: int = 0) -> Tensor:
    """Squeeze the stream's pruned patch tokens into its kept ones: (B, P + n, C) -> (B, P + k, C).

    ``kept_idx`` (B, k) and ``pruned_idx`` (B, n - k) index the patch tokens ``x[:, P:]`` (int64;
    they need not be sorted, and together usually partition ``0..n-1``). The first ``num_prefix``
    tokens are copied through; row ``P + j`` is ``squeeze``'s row ``j`` for the reserved tokens
    ``x[:, P:][kept_idx]`` and the pruned ones ``x[:, P:][pruned_idx]``. Differentiable w.r.t.
    ``x``. Under ``torch.compile`` the graph launches the fused Triton kernels on CUDA itself (a
    triton op; torch 2.5: one opaque node).
    """
    op = "squeeze_tokens"
    check_tensor(op, "x", x, 3, "(B, P + n, C)")
    check_float(op, "x", x)
    check_index_pair(op, x, kept_idx, pruned_idx)
    check_num_prefix(op, num_prefix, x)
    return torch.ops.tokenreduce.squeeze_tokens(x, kept_idx, pruned_idx, num_prefix)


def _training_hosts(xw: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's host in the training form: (B, n, C), (B, n, 1) ->
    ``(host (B, n) int64, cos(x_i, x_host) (B, n, 1), has_host (B, n, 1) bool)``.

    Candidates are the *other* tokens with ``keep == 1`` (a boolean mask, so no gradient reaches
    ``keep`` here); ties go to the lowest index. A token with no candidate gets host 0 and
    ``has_host`` False. The similarity is gathered from the finite cosine matrix, so no -inf
    ever enters the autograd graph.
    """
    n = xw.shape[1]
    cos = cosine(xw, xw)  # (B, n, n): row i a token, column j a candidate host
    eye = torch.eye(n, dtype=torch.bool, device=xw.device)
    hostable = (keep.transpose(1, 2) > 0.5) & ~eye  # (B, n, n)
    host = cos.masked_fill(~hostable, float("-inf")).argmax(dim=-1)  # (B, n)
    return host, cos.gather(-1, host.unsqueeze(-1)), hostable.any(dim=-1, keepdim=True)


def squeeze_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """Training form of the squeeze: (B, n, C), (B, n, 1), (B, n, 1) -> (B, n, C).

    ``keep`` and ``pruned_now`` are hard 0/1 float masks (disjoint, as dTPS builds them) that may
    carry straight-through gradients. The authors' training branch, with our tie rule: every token
    ``i`` picks its host ``h(i)``, the most cosine-similar *other* token with ``keep == 1`` (ties
    to the lowest index; ``keep`` enters only as this boolean mask, so it gets no gradient here);
    its fusing weight is ``w_i = exp(m_i * c_i) * m_i`` with ``m_i = pruned_now_i`` and
    ``c_i = cos(x_i, x_h(i))``; and every row becomes::

        y_j = (e * x_j + sum_{i: h(i)=j} w_i x_i) / (e + sum_{i: h(i)=j} w_i)

    Only ``pruned_now == 1`` tokens have a nonzero weight, so rows with ``keep == 1`` equal
    ``squeeze``'s output for the same decisions and every other row is returned unchanged (bit
    for bit; also when nothing is pruned now). The gradient reaches ``pruned_now`` through the
    weights of *every* token with a host, including kept and earlier-dropped ones (value 0,
    derivative ``dw/dm = 1`` at ``m = 0``), as in the authors' code; ``x`` gets it through the
    similarities and the fusion. Static shapes throughout (no boolean indexing): one graph.
    """
    check_masked_inputs("squeeze_masked", x, keep, pruned_now)
    B, n, C = x.shape

    out_dtype = x.dtype
    work = compute_dtype(out_dtype)
    xw = x.to(work)
    host, c, has_host = _training_hosts(xw, keep)
    # A token without a host contributes nothing, with no gradient either (m = 0 by the mask).
    m = pruned_now.to(work) * has_host  # (B, n, 1)
    weight = torch.exp(m * c) * m  # (B, n, 1): the authors' exp(c * m) * m
    flat = _flat_index(host, n)  # (B * n,)
    x_host = xw.gather(1, host.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    # y_j = x_j + sum_i w_i (x_i - x_j) / (e + sum_i w_i) is the fusion above rewritten so that a
    # row receiving nothing gets an update of exactly 0 (x stays bit-exact) while the gradient
    # into every w_i, hence into pruned_now, still flows.
    delta = xw.new_zeros(B * n, C).index_add(0, flat, (weight * (xw - x_host)).reshape(B * n, C))
    den = xw.new_full((B * n, 1), SELF_WEIGHT).index_add(0, flat, weight.reshape(B * n, 1))
    return (xw + (delta / den).reshape(B, n, C)).to(out_dtype)
