"""TPS token squeezing (tps-reference.md, Sec. 1): pruned tokens are fused into their hosts.

Split form (inference, eTPS in training)::

    squeeze(reserved (B, Nr, C), pruned (B, Np, C)) -> (B, Nr, C)

Each pruned token ``i`` picks the reserved token ``h(i)`` of highest cosine similarity (ties go
to the lowest index) and every reserved token ``j`` becomes the convex combination::

    y_j = (e * xr_j + sum_{i: h(i)=j} exp(c_ij) * xp_i) / (e + sum_{i: h(i)=j} exp(c_ij))

A reserved token that hosts nothing is returned bit for bit; ``Np == 0`` returns ``reserved``.

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
import os
from typing import NamedTuple

import torch
from torch import Tensor

from ._kernels import define_op, device_kernel, register_device_kernels
from ._validate import check_float, check_index, check_shape, check_size_match, check_tensor, check_token_pair
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


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B, Na, C), (B, Nb, C) -> (B, Na, Nb) cosine similarity with the ``+ 1e-6`` norm rule."""
    a = a / (a.norm(dim=-1, keepdim=True) + NORM_EPS)
    b = b / (b.norm(dim=-1, keepdim=True) + NORM_EPS)
    return a @ b.transpose(-1, -2)


def _match(reserved: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    """Hosts and their similarity: ``(host (B, Np) int64, exp(c_i,host) (B, Np, 1))``."""
    cos = cosine(pruned, reserved)  # (B, Np, Nr)
    # torch.argmax returns the first maximum: the lowest-index tie rule of the spec.
    host = cos.argmax(dim=-1)  # (B, Np)
    weight = cos.gather(-1, host.unsqueeze(-1)).exp()  # (B, Np, 1), in (exp(-1), e]
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
    with torch.autocast(reserved.device.type, enabled=False):
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


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    # The host choice is piecewise constant in the inputs, so differentiating the reference with
    # the hosts it picks is the exact gradient almost everywhere. Recomputing the forward here
    # (instead of saving the cosine matrix) keeps the saved state at the two inputs.
    reserved, pruned = ctx.saved_tensors
    need_r, need_p = ctx.needs_input_grad
    with torch.enable_grad():
        xr = reserved.detach().requires_grad_(need_r)
        xp = pruned.detach().requires_grad_(need_p)
        out = squeeze_reference(xr, xp)
        wanted = [t for t, need in ((xr, need_r), (xp, need_p)) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    grad_r = next(grads) if need_r else None
    grad_p = next(grads) if need_p else None
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
    if INLINE_UNDER_COMPILE and torch.compiler.is_compiling():
        # Inductor sees the plain ops and fuses them with their neighbours (see set_squeeze_impl).
        return squeeze_reference(reserved, pruned)
    return torch.ops.tokenreduce.squeeze(reserved, pruned)


# How `squeeze` runs under torch.compile: False keeps the operator (traced into its device kernel,
# e.g. the Triton launches on CUDA; the reference elsewhere); True inlines the reference so
# Inductor can fuse it, which differs from False only where a device kernel is registered.
# Eager always uses the operator. Default from TOKENREDUCE_SQUEEZE=op|inline.
INLINE_UNDER_COMPILE = os.environ.get("TOKENREDUCE_SQUEEZE", "op") == "inline"


def set_squeeze_impl(impl: str) -> None:
    """Choose how ``squeeze`` compiles: ``"op"`` (the operator and its device kernel) or
    ``"inline"`` (the reference's plain ops, fused by Inductor). Call before ``torch.compile``."""
    global INLINE_UNDER_COMPILE
    if impl not in ("op", "inline"):
        raise ValueError(f"set_squeeze_impl: impl must be 'op' or 'inline', got {impl!r}")
    INLINE_UNDER_COMPILE = impl == "inline"


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
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = squeeze_tokens_reference(xg, kept_idx, pruned_idx, ctx.num_prefix)
        (grad_x,) = torch.autograd.grad(out, (xg,), grad)
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
    check_tensor(op, "kept_idx", kept_idx, 2, "(B, k)")
    check_tensor(op, "pruned_idx", pruned_idx, 2, "(B, n - k)")
    check_index(op, "kept_idx", kept_idx)
    check_index(op, "pruned_idx", pruned_idx)
    check_size_match(op, "batch size", "x", x.shape[0], "kept_idx", kept_idx.shape[0])
    check_size_match(op, "batch size", "x", x.shape[0], "pruned_idx", pruned_idx.shape[0])
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= x.shape[1]:
        raise ValueError(f"{op}: `num_prefix` must be an int in [0, {x.shape[1]}] (x of shape "
                         f"{tuple(x.shape)}), got {num_prefix!r}")
    if INLINE_UNDER_COMPILE and torch.compiler.is_compiling():
        return squeeze_tokens_reference(x, kept_idx, pruned_idx, num_prefix)
    return torch.ops.tokenreduce.squeeze_tokens(x, kept_idx, pruned_idx, num_prefix)


def squeeze_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    """Training form of the squeeze: (B, n, C), (B, n, 1), (B, n, 1) -> (B, n, C).

    ``keep`` and ``pruned_now`` are hard 0/1 float masks (disjoint, as dTPS builds them) that may
    carry straight-through gradients. Hosts are restricted to ``keep == 1`` tokens (same cosine
    and lowest-index tie rule as ``squeeze``); only ``pruned_now == 1`` tokens contribute. Rows
    with ``keep == 1`` get the fused value, which equals ``squeeze``'s output for the same
    decisions; every other row is returned unchanged. Static shapes throughout (no boolean
    indexing), so it compiles to one graph. Gradients reach ``x``, ``keep`` (through the mixing
    ``x + keep * update``) and ``pruned_now`` (it multiplies each token's weight).
    """
    op = "squeeze_masked"
    check_tensor(op, "x", x, 3, "(B, n, C)")
    check_tensor(op, "keep", keep, 3, "(B, n, 1)")
    check_tensor(op, "pruned_now", pruned_now, 3, "(B, n, 1)")
    for name, t in (("x", x), ("keep", keep), ("pruned_now", pruned_now)):
        check_float(op, name, t)
    B, n, C = x.shape
    check_shape(op, "keep", keep, (B, n, 1), "(B, n, 1)")
    check_shape(op, "pruned_now", pruned_now, (B, n, 1), "(B, n, 1)")

    out_dtype = x.dtype
    work = compute_dtype(out_dtype)
    xw, keep_w, pruned_w = x.to(work), keep.to(work), pruned_now.to(work)

    cos = cosine(xw, xw)  # (B, n, n): row i a token to squeeze, column j a candidate host
    hostable = keep.transpose(1, 2) > 0.5  # (B, 1, n)
    # Masking happens only for the argmax; the weight gathers the finite cosine, so no -inf
    # ever enters the autograd graph (an image with no kept token falls back to host 0, whose
    # row is then left unchanged because its keep is 0).
    host = cos.masked_fill(~hostable, float("-inf")).argmax(dim=-1)  # (B, n)
    weight = cos.gather(-1, host.unsqueeze(-1)).exp() * pruned_w  # (B, n, 1); 0 unless pruned now
    flat = _flat_index(host, n)  # (B * n,)
    x_host = xw.gather(1, host.unsqueeze(-1).expand(-1, -1, C))  # (B, n, C)
    # y_j = x_j + sum_i w_i (x_i - x_j) / (e + sum_i w_i) is Sec. 1's fusion rewritten so that a
    # row receiving nothing gets an update of exactly 0 (x stays bit-exact) while the gradient
    # into every w_i, hence into pruned_now, still flows.
    delta = xw.new_zeros(B * n, C).index_add(0, flat, (weight * (xw - x_host)).reshape(B * n, C))
    den = xw.new_full((B * n, 1), SELF_WEIGHT).index_add(0, flat, weight.reshape(B * n, 1))
    update = (delta / den).reshape(B, n, C)
    return (xw + keep_w * update).to(out_dtype)
