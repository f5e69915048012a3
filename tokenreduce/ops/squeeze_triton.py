"""Fused Triton forward kernel for the split-form TPS squeeze (tps-reference Sec. 1).

``squeeze_triton(reserved, pruned)`` computes exactly what ``squeeze_reference`` computes:

    c[i, j] = <xp_i / (|xp_i| + 1e-6), xr_j / (|xr_j| + 1e-6)>
    h(i)    = argmax_j c[i, j]                 (lowest j on ties)
    y_j     = (e * xr_j + sum_{i: h(i)=j} exp(c[i, j]) xp_i) / (e + sum_{i: h(i)=j} exp(c[i, j]))
    y_j     = xr_j, bit for bit, when no pruned token picked j

in two launches, without atomics (so the result is deterministic) and without materialising
anything of size (B, Nr, C) besides the output:

    _squeeze_hosts_kernel   grid (cdiv(Np, BLOCK_P), B)
        one program per block of pruned rows: norms of its rows, then for each tile of reserved
        rows the dot products (``tl.dot``, fp32 accumulation) and their norms, keeping a running
        max / argmax.  Writes host (B, Np) int32 and weight exp(c_max) (B, Np) fp32.
    _squeeze_fuse_kernel    grid (cdiv(Nr, BLOCK_R), cdiv(C, BLOCK_C), B)
        one program per (tile of reserved rows, tile of channels): builds the weight matrix
        W[j, i] = [h(i) == j] exp(c_max_i) of shape (BLOCK_R, BLOCK_P) in registers and gets
        num = W @ xp with ``tl.dot``, den = W.sum(1); writes
        y = where(den > 0, (e * xr + num) / (e + den), xr) in the input dtype.

All sums are in fp32.  Precision of the two matrix products:
  * fp32 inputs: ``input_precision="tf32x3"`` (three TF32 tensor-core products; close to fp32).
  * bf16 / fp16 inputs: similarity is an exact-product dot with fp32 accumulation; in the fuse,
    W (fp32) is split into hi + lo halves of the input dtype, so its rounding error is ~2^-16.

Forward only: the custom op's autograd recomputes with the reference.  ``register_cuda_kernel``
installs this as the CUDA implementation of ``torch.ops.tokenreduce.squeeze``.  Triton is
imported at module import only when it is installed; nothing here fails without it.

The kernels also run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the unit tests check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

__all__ = ["squeeze_triton", "register_cuda_kernel", "triton_available"]

logger = logging.getLogger(__name__)

try:  # pragma: no cover - exercised by whichever install runs the tests
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    _HAVE_TRITON = False

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS = 1e-6
_REGISTERED = False


def triton_available() -> bool:
    """True when triton is importable (the kernels can be built)."""
    return _HAVE_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


if _HAVE_TRITON:

    @triton.jit
    def _squeeze_hosts_kernel(
        r_ptr, p_ptr, host_ptr, w_ptr,
        Nr, Np, C,
        s_rb, s_rn, s_rc,
        s_pb, s_pn, s_pc,
        EPS: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        r_base = r_ptr + b * s_rb
        p_base = p_ptr + b * s_pb

        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        mask_p = offs_p < Np
        arange_c = tl.arange(0, BLOCK_C)
        arange_r = tl.arange(0, BLOCK_R)

        # |xp_i| over the full channel range, fp32.
        ssq_p = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + arange_c
            xp = tl.load(
                p_base + offs_p[:, None] * s_pn + offs_c[None, :] * s_pc,
                mask=mask_p[:, None] & (offs_c < C)[None, :], other=0.0,
            ).to(tl.float32)  # (BLOCK_P, BLOCK_C)
            ssq_p += tl.sum(xp * xp, axis=1)
        inv_p = 1.0 / (tl.sqrt(ssq_p) + EPS)

        best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_P], dtype=tl.int32)
        for r0 in range(0, Nr, BLOCK_R):
            offs_r = r0 + arange_r
            mask_r = offs_r < Nr
            dots = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
            ssq_r = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                mask_c = offs_c < C
                xp = tl.load(
                    p_base + offs_p[:, None] * s_pn + offs_c[None, :] * s_pc,
                    mask=mask_p[:, None] & mask_c[None, :], other=0.0,
                )  # (BLOCK_P, BLOCK_C), input dtype
                xr_t = tl.load(
                    r_base + offs_r[None, :] * s_rn + offs_c[:, None] * s_rc,
                    mask=mask_c[:, None] & mask_r[None, :], other=0.0,
                )  # (BLOCK_C, BLOCK_R), input dtype: reserved tile, transposed
                xr_f = xr_t.to(tl.float32)
                if DOT_F32:
                    dots = tl.dot(xp.to(tl.float32), xr_f, dots, input_precision=PRECISION)
                else:
                    dots = tl.dot(xp, xr_t, dots, input_precision=PRECISION)
                ssq_r += tl.sum(xr_f * xr_f, axis=0)
            inv_r = 1.0 / (tl.sqrt(ssq_r) + EPS)
            cos = dots * inv_p[:, None] * inv_r[None, :]  # (BLOCK_P, BLOCK_R)
            cos = tl.where(mask_r[None, :], cos, float("-inf"))
            tile_max = tl.max(cos, axis=1)
            tile_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + r0
            # Strict '>' keeps the earlier tile on ties: lowest index wins overall.
            better = tile_max > best
            best = tl.where(better, tile_max, best)
            best_idx = tl.where(better, tile_arg, best_idx)

        out_offs = b * Np + offs_p
        tl.store(host_ptr + out_offs, best_idx, mask=mask_p)
        tl.store(w_ptr + out_offs, tl.exp(best), mask=mask_p)

    @triton.jit
    def _squeeze_fuse_kernel(
        r_ptr, p_ptr, host_ptr, w_ptr, y_ptr,
        Nr, Np, C,
        s_rb, s_rn, s_rc,
        s_pb, s_pn, s_pc,
        s_yb, s_yn, s_yc,
        E: tl.constexpr,
        SPLIT_W: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)

        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_r = offs_r < Nr
        mask_c = offs_c < C
        arange_p = tl.arange(0, BLOCK_P)

        num = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        den = tl.zeros([BLOCK_R], dtype=tl.float32)
        for p0 in range(0, Np, BLOCK_P):
            offs_p = p0 + arange_p
            mask_p = offs_p < Np
            host = tl.load(host_ptr + b * Np + offs_p, mask=mask_p, other=-1)
            w = tl.load(w_ptr + b * Np + offs_p, mask=mask_p, other=0.0)
            # W[j, i] = exp(c_i) if pruned token i chose reserved token j: (BLOCK_R, BLOCK_P)
            wmat = tl.where(offs_r[:, None] == host[None, :], w[None, :], 0.0)
            den += tl.sum(wmat, axis=1)
            xp = tl.load(
                p_ptr + b * s_pb + offs_p[:, None] * s_pn + offs_c[None, :] * s_pc,
                mask=mask_p[:, None] & mask_c[None, :], other=0.0,
            )  # (BLOCK_P, BLOCK_C), input dtype
            if SPLIT_W:
                # 16-bit inputs: W = hi + lo, both exactly representable in xp's dtype.
                w_hi = wmat.to(xp.dtype)
                w_lo = (wmat - w_hi.to(tl.float32)).to(xp.dtype)
                if DOT_F32:
                    xp_f = xp.to(tl.float32)
                    num = tl.dot(w_hi.to(tl.float32), xp_f, num, input_precision=PRECISION)
                    num = tl.dot(w_lo.to(tl.float32), xp_f, num, input_precision=PRECISION)
                else:
                    num = tl.dot(w_hi, xp, num)
                    num = tl.dot(w_lo, xp, num)
            else:
                num = tl.dot(wmat, xp, num, input_precision=PRECISION)

        xr = tl.load(
            r_ptr + b * s_rb + offs_r[:, None] * s_rn + offs_c[None, :] * s_rc,
            mask=mask_r[:, None] & mask_c[None, :], other=0.0,
        )  # (BLOCK_R, BLOCK_C), input dtype
        y = (E * xr.to(tl.float32) + num) / (E + den[:, None])
        # Unmatched reserved rows: the input, untouched (no fp32 round trip).
        out = tl.where((den > 0.0)[:, None], y.to(xr.dtype), xr)
        tl.store(
            y_ptr + b * s_yb + offs_r[:, None] * s_yn + offs_c[None, :] * s_yc,
            out, mask=mask_r[:, None] & mask_c[None, :],
        )


def _block(n: int, cap: int) -> int:
    """Power of two >= n, clamped to [16, cap] (16 is tl.dot's smallest tile edge)."""
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _validate(reserved: torch.Tensor, pruned: torch.Tensor) -> None:
    for name, t in (("reserved", reserved), ("pruned", pruned)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"squeeze_triton: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"squeeze_triton: {name} must have shape (B, N, C); got {tuple(t.shape)}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"squeeze_triton: {name}.dtype must be float32, bfloat16 or float16; got {t.dtype}"
            )
    if reserved.dtype != pruned.dtype:
        raise TypeError(
            "squeeze_triton: reserved and pruned must have the same dtype; "
            f"got {reserved.dtype} and {pruned.dtype}"
        )
    if reserved.device != pruned.device:
        raise ValueError(
            "squeeze_triton: reserved and pruned must be on the same device; "
            f"got {reserved.device} and {pruned.device}"
        )
    if reserved.shape[0] != pruned.shape[0] or reserved.shape[2] != pruned.shape[2]:
        raise ValueError(
            "squeeze_triton: reserved (B, Nr, C) and pruned (B, Np, C) must agree in B and C; "
            f"got {tuple(reserved.shape)} and {tuple(pruned.shape)}"
        )


def _check_runnable(t: torch.Tensor) -> None:
    if not _HAVE_TRITON:
        raise RuntimeError("squeeze_triton: triton is not installed; use squeeze_reference")
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"squeeze_triton: tensors must be on a CUDA device, got {t.device} "
            "(CPU tensors run only under the Triton interpreter, TRITON_INTERPRET=1)"
        )


def _precision(dtype: torch.dtype) -> str:
    # fp32: three TF32 products (~fp32 accuracy on tensor cores).  16-bit operands ignore the
    # setting (their products are exact in the fp32 accumulator); "tf32" is Triton's default.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter multiplies bf16 tiles as their raw uint16 storage; upcast there only.
    # bf16 x bf16 products are exact in fp32, so the arithmetic is the same as on the GPU.
    return dtype == torch.bfloat16 and _interpreting()


def _squeeze_hosts(reserved: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host index h(i) (B, Np) int32 and weight exp(c[i, h(i)]) (B, Np) fp32.  Needs Nr >= 1."""
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    host = torch.empty((B, Np), device=reserved.device, dtype=torch.int32)
    weight = torch.empty((B, Np), device=reserved.device, dtype=torch.float32)
    if B == 0 or Np == 0:
        return host, weight
    block_p = _block(Np, 32)
    block_r = _block(Nr, 64)
    block_c = _block(C, 64)
    grid = (triton.cdiv(Np, block_p), B)
    _squeeze_hosts_kernel[grid](
        reserved, pruned, host, weight,
        Nr, Np, C,
        *reserved.stride(), *pruned.stride(),
        EPS=_EPS, PRECISION=_precision(reserved.dtype), DOT_F32=_dot_f32(reserved.dtype),
        BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4, enable_fp_fusion=True,  # explicit: triton 3.9 warns when unset
    )
    return host, weight


def squeeze_triton(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """TPS squeeze (tps-reference Sec. 1) as two Triton kernels; forward only.

    reserved (B, Nr, C), pruned (B, Np, C), same float dtype (fp32 / bf16 / fp16) and device.
    Returns a new contiguous (B, Nr, C) tensor in the input dtype; reserved rows that host no
    pruned token are copied bit for bit (so Np == 0 returns a copy of ``reserved``; the result
    never aliases an input, as custom ops require).  Any strides are accepted.
    """
    return _squeeze_with_hosts(reserved, pruned)[0]


def _squeeze_with_hosts(reserved: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``squeeze_triton`` plus the host index of every pruned token, (B, Np) int32 (for tests)."""
    _validate(reserved, pruned)
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    if B == 0 or Nr == 0 or C == 0 or Np == 0:
        host = torch.zeros((B, Np), device=reserved.device, dtype=torch.int32)
        return reserved.clone(memory_format=torch.contiguous_format), host
    _check_runnable(reserved)
    # Triton launches on the current device; make it the inputs' one.
    guard = torch.cuda.device(reserved.device) if reserved.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _launch(reserved, pruned)


def _launch(reserved: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    host, weight = _squeeze_hosts(reserved, pruned)
    y = torch.empty((B, Nr, C), device=reserved.device, dtype=reserved.dtype)
    block_r = _block(Nr, 64)
    block_p = _block(Np, 64)
    block_c = _block(C, 64)
    grid = (triton.cdiv(Nr, block_r), triton.cdiv(C, block_c), B)
    _squeeze_fuse_kernel[grid](
        reserved, pruned, host, weight, y,
        Nr, Np, C,
        *reserved.stride(), *pruned.stride(), *y.stride(),
        E=math.e, SPLIT_W=reserved.dtype != torch.float32,
        PRECISION=_precision(reserved.dtype), DOT_F32=_dot_f32(reserved.dtype),
        BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=4, enable_fp_fusion=True,  # explicit: triton 3.9 warns when unset
    )
    return y, host


def register_cuda_kernel() -> bool:
    """Install ``squeeze_triton`` as the CUDA kernel of ``torch.ops.tokenreduce.squeeze``.

    Returns True when registered (now or by an earlier call), False when triton or CUDA is
    missing (CPU-only installs: nothing happens, the reference keeps serving every device).
    Imports ``tokenreduce.ops.squeeze`` lazily, so call it after that module has defined the op.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    if not _HAVE_TRITON:
        logger.debug("tokenreduce: triton not installed; squeeze stays on the reference kernel")
        return False
    if not torch.cuda.is_available():
        logger.debug("tokenreduce: no CUDA device; squeeze stays on the reference kernel")
        return False
    import tokenreduce.ops.squeeze  # noqa: F401  (defines the custom op)

    torch.library.register_kernel("tokenreduce::squeeze", "cuda", _cuda_kernel)
    _REGISTERED = True
    logger.debug("tokenreduce: registered the Triton squeeze as the CUDA kernel")
    return True


def _cuda_kernel(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    # fp64 (or mixed dtypes, which ops.squeeze rejects before dispatch) stay on the reference.
    if reserved.dtype not in _SUPPORTED_DTYPES or pruned.dtype != reserved.dtype:
        from tokenreduce.ops.squeeze import squeeze_reference

        return squeeze_reference(reserved, pruned)
    return squeeze_triton(reserved, pruned)
