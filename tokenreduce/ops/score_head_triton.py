"""``tokenreduce::score_head_keep`` as two Triton kernels: a dTPS site's whole score head.

``score_head_keep(x (B, P + n, C), <the head's parameters>, P, eps, dtype) -> (B, n) fp32`` is
the keep log-probability of every patch token (``ScoreHead``'s channel 0, see ``score_head``).
Unfused, the head is ~10 launches per site (norm, four GEMMs, three GELUs, the global mean,
the softmax) and writes its (B, n, C) activations twice; here it is two:

    _head_embed_kernel     grid (cdiv(n, BLOCK_M), B)
        per tile of patch rows: the LayerNorm (fp32 statistics, two passes over the channels),
        h = GELU(norm(x) @ W1^T + b1) one BLOCK_N column tile at a time (``tl.dot``, fp32
        accumulation, operands in ``dtype``); writes the local half of h (B, n, C/2) and the
        tile's column sums of the global half (B, T, C/2), fp32.
    _head_classify_kernel  grid (cdiv(n, BLOCK_M), B)
        per tile of patch rows: the image's global feature (the T partial sums over n, in a
        fixed order: deterministic) through the global half of W2 (a per-image bias), then
        z = GELU(h_local @ W2a^T + bias) column tile by column tile, each tile multiplied
        straight into GELU(z @ W3^T + b3)'s accumulator (B, BLOCK_M, C/4 padded), and the
        two logits and their log-softmax.

Rounding follows the unfused head under autocast: operands and the activations it stores (h,
the global mean, z, the last GELU) are rounded to ``dtype``; sums and the norm are fp32. fp32
operands multiply as three TF32 products (``tf32x3``, relative error ~2^-22).

Forward only: the operator's autograd recomputes with the reference. Like ``squeeze_triton``,
the kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .squeeze_triton import _HAVE_TRITON, _check_runnable, _interpreting, _launcher, _precision, _realized

__all__ = ["register_cuda_kernel", "score_head_keep_triton"]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REGISTERED = False

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu(v):
        """Exact (erf) GELU, ``nn.GELU()``'s default, in fp32."""
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))

    @triton.jit
    def _operand(v, DT: tl.constexpr, DOT_F32: tl.constexpr):
        """``v`` rounded to the operand dtype ``DT`` (a dot operand); fp32 again under the
        interpreter, which multiplies 16-bit tiles as their raw storage."""
        v = v.to(DT)
        if DOT_F32:
            v = v.to(tl.float32)
        return v

    @triton.jit
    def _rounded(v, DT: tl.constexpr):
        """fp32 ``v`` rounded to ``DT`` as the unfused head stores it, back in fp32."""
        return v.to(tl.float32).to(DT).to(tl.float32)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _head_embed_kernel(
        x_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, h_ptr, g_ptr,
        n, P, C, HALF, eps,
        x_b, x_n, h_b, h_n, g_b, g_t,
        DT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < n
        x_rows = x_ptr + b * x_b + (P + rows.to(tl.int64))[:, None] * x_n
        ks = tl.arange(0, BLOCK_K)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            m = live[:, None] & (k0 + ks < C)[None, :]
            total += tl.sum(tl.load(x_rows + (k0 + ks)[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
        mean = total / C
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            m = live[:, None] & (k0 + ks < C)[None, :]
            v = tl.load(x_rows + (k0 + ks)[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mean[:, None], 0.0)
            sq += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(sq / C + eps)
        cs = tl.arange(0, BLOCK_N)
        for n0 in range(0, C, BLOCK_N):
            cols = n0 + cs
            cmask = cols < C
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, C, BLOCK_K):
                kk = k0 + ks
                kmask = kk < C
                m = live[:, None] & kmask[None, :]
                v = tl.load(x_rows + kk[None, :], mask=m, other=0.0).to(tl.float32)
                lw = tl.load(lnw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                u = (v - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
                w = tl.load(w1_ptr + cols[None, :] * C + kk[:, None],
                            mask=cmask[None, :] & kmask[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) of W1^T
                acc = tl.dot(_operand(tl.where(m, u, 0.0), DT, DOT_F32), _operand(w, DT, DOT_F32), acc,
                             input_precision=PRECISION)
            bias = _rounded(tl.load(b1_ptr + cols, mask=cmask, other=0.0), DT)
            hv = _gelu(acc + bias[None, :]).to(DT)  # h as the unfused head stores it
            local = cols < HALF
            tl.store(h_ptr + b * h_b + rows.to(tl.int64)[:, None] * h_n + cols[None, :], hv,
                     mask=live[:, None] & local[None, :])
            part = tl.sum(tl.where(live[:, None], hv.to(tl.float32), 0.0), axis=0)  # (BLOCK_N,)
            tl.store(g_ptr + b * g_b + t * g_t + (cols - HALF), part, mask=cmask & (cols >= HALF))

    @triton.jit
    def _head_classify_kernel(
        h_ptr, g_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, out_ptr,
        n, T, C, HALF, QUART,
        h_b, h_n, g_b, g_t, o_b,
        DT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < n
        h_rows = h_ptr + b * h_b + rows.to(tl.int64)[:, None] * h_n
        ks = tl.arange(0, BLOCK_K)
        cs = tl.arange(0, BLOCK_N)
        qs = tl.arange(0, BLOCK_Q)
        qmask = qs < QUART
        acc3 = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
        for n0 in range(0, HALF, BLOCK_N):
            cols = n0 + cs
            cmask = cols < HALF
            # this column tile of the per-image bias: mean(global half of h) @ W2[:, HALF:]^T + b2
            gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, HALF, BLOCK_K):
                kk = k0 + ks
                kmask = kk < HALF
                glob = tl.zeros((BLOCK_K,), dtype=tl.float32)
                for tt in range(0, T):
                    glob += tl.load(g_ptr + b * g_b + tt * g_t + kk, mask=kmask, other=0.0)
                glob = _rounded(glob / n, DT)
                w = _rounded(tl.load(w2_ptr + cols[None, :] * C + (HALF + kk)[:, None],
                                     mask=cmask[None, :] & kmask[:, None], other=0.0), DT)
                gb += tl.sum(glob[:, None] * w, axis=0)
            gb = _rounded(gb + _rounded(tl.load(b2_ptr + cols, mask=cmask, other=0.0), DT), DT)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, HALF, BLOCK_K):
                kk = k0 + ks
                kmask = kk < HALF
                a = tl.load(h_rows + kk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w2_ptr + cols[None, :] * C + kk[:, None],
                            mask=cmask[None, :] & kmask[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) of W2a^T
                acc = tl.dot(_operand(a, DT, DOT_F32), _operand(w, DT, DOT_F32), acc, input_precision=PRECISION)
            z = _gelu(_rounded(acc, DT) + gb[None, :])
            w3 = tl.load(w3_ptr + qs[None, :] * HALF + cols[:, None],
                         mask=qmask[None, :] & cmask[:, None], other=0.0)  # (BLOCK_N, BLOCK_Q) of W3^T
            acc3 = tl.dot(_operand(tl.where(cmask[None, :], z, 0.0), DT, DOT_F32), _operand(w3, DT, DOT_F32),
                          acc3, input_precision=PRECISION)
        b3 = _rounded(tl.load(b3_ptr + qs, mask=qmask, other=0.0), DT)
        z3 = _rounded(_gelu(acc3 + b3[None, :]), DT)  # padding: GELU(0) = 0
        w40 = _rounded(tl.load(w4_ptr + qs, mask=qmask, other=0.0), DT)
        w41 = _rounded(tl.load(w4_ptr + QUART + qs, mask=qmask, other=0.0), DT)
        # the logits as the unfused head's last Linear rounds them, then log_softmax in fp32
        keep = _rounded(tl.sum(z3 * w40[None, :], axis=1) + _rounded(tl.load(b4_ptr), DT), DT)
        drop = _rounded(tl.sum(z3 * w41[None, :], axis=1) + _rounded(tl.load(b4_ptr + 1), DT), DT)
        top = tl.maximum(keep, drop)
        lse = top + tl.log(tl.exp(keep - top) + tl.exp(drop - top))
        tl.store(out_ptr + b * o_b + rows, keep - lse, mask=live)


def _config(C: int) -> dict:
    """Both kernels' tiling for C channels: tile sizes (powers of two, >= 16 for ``tl.dot``),
    warps and pipeline stages. ``benchmarks/score_head_kernels.py`` times the alternatives."""
    k = 64 if C >= 128 else max(16, triton.next_power_of_2(C // 2))
    q = max(16, triton.next_power_of_2(C // 4))
    return dict(BLOCK_M=64, BLOCK_N=k, BLOCK_K=k, BLOCK_Q=q, EMBED_WARPS=4,
                CLASSIFY_WARPS=8 if q >= 256 else 4, STAGES=2)


def score_head_keep_triton(
    x: torch.Tensor, params: tuple[torch.Tensor, ...], num_prefix: int, eps: float,
    dtype: torch.dtype, traceable: bool = False, config: dict | None = None,
) -> torch.Tensor:
    """The head's keep log-probability (B, n) fp32 of ``x`` (B, P + n, C) in two launches.

    ``params``: (ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4) as in ``ScoreHead``; the linear
    layers' are cast to ``dtype`` (the GEMMs' operand dtype: autocast's, or x's), the norm's
    read as they are. ``config`` overrides ``_config(C)`` (benchmarks). Forward only.
    """
    op = "score_head_keep_triton"
    if x.dim() != 3 or x.dtype not in _SUPPORTED_DTYPES or dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{op}: x must be a (B, P + n, C) float32, bfloat16 or float16 tensor and dtype "
                         f"one of those; got {tuple(x.shape)} {x.dtype}, dtype {dtype}")
    B, N, C = x.shape
    if not 0 <= num_prefix < N or C < 4 or C % 2:
        raise ValueError(f"{op}: needs 0 <= num_prefix < N and an even C >= 4; got x {tuple(x.shape)}, "
                         f"num_prefix {num_prefix}")
    if len(params) != 10:
        raise ValueError(f"{op}: params must be the 10 tensors (ln_w, ln_b, w1, b1, w2, b2, w3, b3, "
                         f"w4, b4); got {len(params)}")
    _check_runnable(x, op, "score_head_keep_reference")
    ln_w, ln_b, *linear = params
    w1, b1, w2, b2, w3, b3, w4, b4 = (p.contiguous() for p in linear)  # cast in the kernels
    cfg = _config(C) if config is None else config
    n, half, quart = N - num_prefix, C // 2, C // 4
    T = triton.cdiv(n, cfg["BLOCK_M"])
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = x.device
    h = torch.empty((B, n, half), device=dev, dtype=dtype)
    g = torch.empty((B, T, half), device=dev, dtype=torch.float32)
    out = torch.empty((B, n), device=dev, dtype=torch.float32)
    if B == 0:
        return out
    embed, embed_opts = _launcher(_head_embed_kernel, traceable)
    classify, classify_opts = _launcher(_head_classify_kernel, traceable)
    if embed is not _head_embed_kernel:  # traced into a graph: materialise x once (see _realized)
        x = _realized(x)
    common = dict(DT=_TL_DTYPES[dtype], PRECISION=_precision(dtype), DOT_F32=_interpreting(), num_stages=cfg["STAGES"],
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        embed[(T, B)](
            x, ln_w.contiguous(), ln_b.contiguous(), w1, b1, h, g, n, num_prefix, C, half, float(eps),
            *x.stride()[:2], *h.stride()[:2], *g.stride()[:2],
            num_warps=cfg["EMBED_WARPS"], **common, **embed_opts,
        )
        classify[(T, B)](
            h, g, w2, b2, w3, b3, w4, b4, out, n, T, C, half, quart,
            *h.stride()[:2], *g.stride()[:2], out.stride(0),
            BLOCK_Q=cfg["BLOCK_Q"], num_warps=cfg["CLASSIFY_WARPS"], **common, **classify_opts,
        )
    return out


def _cuda_kernel(x, ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4, num_prefix, eps, dtype):
    if x.dtype not in _SUPPORTED_DTYPES or dtype not in _SUPPORTED_DTYPES:
        from .score_head import score_head_keep_reference

        return score_head_keep_reference(x, ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4, num_prefix, eps, dtype)
    return score_head_keep_triton(x, (ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4), num_prefix, eps,
                                  dtype, traceable=True)


def register_cuda_kernel() -> bool:
    """Serve ``tokenreduce::score_head_keep`` on CUDA with the Triton kernels. Returns True when
    registered (now or before), False when triton or CUDA is missing (nothing happens)."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if not _HAVE_TRITON or not torch.cuda.is_available():
        logger.debug("tokenreduce: no triton or no CUDA device; score_head_keep stays on the reference")
        return False
    from ._kernels import register_device_kernels

    register_device_kernels("cuda", score_head_keep=_cuda_kernel)
    _REGISTERED = True
    return True
