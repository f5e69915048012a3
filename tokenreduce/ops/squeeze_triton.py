"""Fused Triton forward kernels for the split-form TPS squeeze (tps-reference Sec. 1).

``squeeze_triton(reserved, pruned)`` computes exactly what ``squeeze_reference`` computes:

    c[i, j] = <xp_i / (|xp_i| + 1e-6), xr_j / (|xr_j| + 1e-6)>
    h(i)    = argmax_j c[i, j]                 (lowest j on ties)
    y_j     = (e * xr_j + sum_{i: h(i)=j} exp(c[i, j]) xp_i) / (e + sum_{i: h(i)=j} exp(c[i, j]))
    y_j     = xr_j, bit for bit, when no pruned token picked j

and ``squeeze_tokens_triton(x, kept_idx, pruned_idx, P)`` the same with the reserved and pruned
rows read from the token stream through their indices (``P + idx``) and the P leading rows
copied through, so a reduction site is a fill and two launches with no gather, no concatenation
and nothing of size (B, Nr, C) besides the output; the result is deterministic:

    _squeeze_hosts_kernel   grid (cdiv(Nr, BLOCK_R), cdiv(Np, BLOCK_P), B)
        one program per (tile of reserved rows, block of pruned rows): in one pass over the
        channels the dot products (``tl.dot``, fp32 accumulation) and both rows' norms, then the
        tile's max / argmax per pruned row, combined across tiles by ``atomic_max`` on one int64
        key per pruned token (cosine bits above, 2^31 - 1 - host below: the maximum is the
        largest cosine at the lowest host, whatever the order of the programs).
    _squeeze_fuse_kernel    grid (cdiv(C, BLOCK_C), cdiv(P + Nr, ROW_TILES * BLOCK_R), B)
        one program per (channel tile, group of ROW_TILES output-row tiles).  Up to 128 pruned
        tokens are one block (``BLOCK_P``), read once per program, with their hosts and weights
        w = exp(c_max) from the keys; more are looped over in blocks of 64.  Per row tile:
        num = M @ (w * xp) with the 0/1 match matrix M[j, i] = [h(i) == j] of shape
        (BLOCK_R, BLOCK_P) (``tl.dot``), den = sum of the chosen w; writes
        y = where(den > 0, (e * xr + num) / (e + den), xr) in the input dtype.  Work: Nr x Np.
    _squeeze_update_kernel  grid (cdiv(C, BLOCK_C), B)
        the merge instead when 128 < Np < Nr (PVT-Tiny's stage-2 site at keep 0.7, Np 235 and
        Nr 549: 242 us per batch against 520 in the fuse kernel's loop over pruned blocks).  One
        program per (channel tile, image): it copies every output row, then rewrites each
        pruned token's host row from the token's whole group, S[i, i'] = [h(i) == h(i')]:
        num_i = S @ (w * xp), den_i = S @ w, in blocks of 64 pruned tokens.  Work: Np x Np.
        Tokens of one group write the same values to the same row.

The merges' block sizes, warps and stages are autotuned per (sizes, dtype) on the first call from
short lists (``_FUSE_CONFIGS``, ``_UPDATE_CONFIGS``); the host search has one config
(``_HOSTS_CONFIGS``, see there why); BLOCK_P follows Np (``_block_p``).  The three kernels'
tilings are timed by ``benchmarks/squeeze_kernels.py``.

Precision: every sum is in fp32.  The similarity is a tensor-core product with fp32
accumulation: exact products for bf16 / fp16 inputs, ``input_precision="tf32x3"`` for fp32
inputs (three TF32 products, relative error ~2^-22).  The
merge multiplies the 0/1 match matrix (exact in bf16) by w * xp split into three bf16 parts, so
it is fp32-accurate for every input dtype.

Forward only: the custom op's autograd recomputes with the reference.  ``register_cuda_kernel``
installs them as the CUDA implementations of ``torch.ops.tokenreduce.squeeze`` and
``torch.ops.tokenreduce.squeeze_tokens``; there they launch through ``torch.library.wrap_triton``,
so under ``torch.compile`` (torch >= 2.6) Inductor launches them from the compiled graph, with no
Python of the operator on that path (it cost ~150 to 400 us of host time per site).  Triton is
imported at module import only when it is installed; nothing here fails without it.

The kernels also run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the unit tests check them on machines without a GPU.
"""

from __future__ import annotations

import logging
import math

import torch

from ._triton import HAVE_TRITON, check_runnable, device_guard, interpreting, launcher

__all__ = ["squeeze_triton", "squeeze_tokens_triton", "register_cuda_kernel", "triton_available"]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS = 1e-6
_REGISTERED = False


def triton_available() -> bool:
    """True when triton is importable (the kernels can be built)."""
    return HAVE_TRITON


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rows(idx_ptr, s_ib, s_in, b, offs, mask, P, HAS_IDX: tl.constexpr):
        """Row numbers in the source tensor of logical rows ``offs``: ``P + idx[b, offs]`` when
        indexed, else ``offs`` itself."""
        if HAS_IDX:
            return tl.load(idx_ptr + b * s_ib + offs * s_in, mask=mask, other=0) + P
        else:
            return offs.to(tl.int64)

    # A pruned token's best host is kept as one int64 key, so that the programs that each see a
    # tile of reserved rows combine with one ``atomic_max`` (order-independent: deterministic):
    #   high 32 bits: the cosine's float bits mapped to an int32 of the same order (-0 as +0)
    #   low 32 bits:  2^31 - 1 - host, so that among equal cosines the lowest host is largest.
    @triton.jit
    def _pack_host(cos, host):
        cos = tl.where(cos == 0.0, 0.0, cos)
        bits = cos.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (bits.to(tl.int64) << 32) | (2147483647 - host).to(tl.int64)

    @triton.jit
    def _unpack_host(key):
        """(host int32, exp(cosine) fp32) of a packed key."""
        host = 2147483647 - (key & 2147483647).to(tl.int32)
        bits = (key >> 32).to(tl.int32)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return host, tl.exp(bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _squeeze_hosts_kernel(
        r_ptr, p_ptr, ridx_ptr, pidx_ptr, key_ptr,
        Nr, Np, C, P,
        s_rb, s_rn,
        s_pb, s_pn,
        s_kb, s_kn, s_qb, s_qn,
        EPS: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        HAS_IDX: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        r_base = r_ptr + b * s_rb
        p_base = p_ptr + b * s_pb

        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        mask_p = offs_p < Np
        rows_p = _rows(pidx_ptr, s_qb, s_qn, b, offs_p, mask_p, P, HAS_IDX)
        r0 = pid_r * BLOCK_R
        offs_r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        mask_r = offs_r < Nr
        rows_r = _rows(ridx_ptr, s_kb, s_kn, b, offs_r, mask_r, P, HAS_IDX)
        arange_c = tl.arange(0, BLOCK_C)

        # One pass over the channels: the dot products and both sets of squared norms, fp32.
        dots = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
        ssq_p = tl.zeros([BLOCK_P], dtype=tl.float32)
        ssq_r = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + arange_c
            mask_c = offs_c < C
            xp = tl.load(
                p_base + rows_p[:, None] * s_pn + offs_c[None, :],
                mask=mask_p[:, None] & mask_c[None, :], other=0.0,
            )  # (BLOCK_P, BLOCK_C), input dtype
            xr_t = tl.load(
                r_base + rows_r[None, :] * s_rn + offs_c[:, None],
                mask=mask_c[:, None] & mask_r[None, :], other=0.0,
            )  # (BLOCK_C, BLOCK_R), input dtype: reserved tile, transposed
            xp_f = xp.to(tl.float32)
            xr_f = xr_t.to(tl.float32)
            if DOT_F32:
                dots = tl.dot(xp_f, xr_f, dots, input_precision=PRECISION)
            else:
                dots = tl.dot(xp, xr_t, dots, input_precision=PRECISION)
            ssq_p += tl.sum(xp_f * xp_f, axis=1)
            ssq_r += tl.sum(xr_f * xr_f, axis=0)
        inv_p = 1.0 / (tl.sqrt(ssq_p) + EPS)
        inv_r = 1.0 / (tl.sqrt(ssq_r) + EPS)
        cos = dots * inv_p[:, None] * inv_r[None, :]  # (BLOCK_P, BLOCK_R)
        cos = tl.where(mask_r[None, :], cos, float("-inf"))
        tile_max = tl.max(cos, axis=1)
        tile_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + r0
        tl.atomic_max(key_ptr + b * Np + offs_p, _pack_host(tile_max, tile_arg), mask=mask_p)

    @triton.jit
    def _block_hosts(key_ptr, b, p0, Np, BLOCK_P: tl.constexpr):
        """Pruned tokens p0 .. p0 + BLOCK_P: host (BLOCK_P,) int32 (-1 past Np, matching no row)
        and weight exp(cosine) (BLOCK_P,) fp32, from their keys."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < Np
        host, w = _unpack_host(tl.load(key_ptr + b * Np + offs_p, mask=mask_p, other=0))
        return tl.where(mask_p, host, -1), w

    @triton.jit
    def _out_rows(ridx_ptr, s_kb, s_kn, b, row0, Nr, P, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr):
        """Output rows row0 .. row0 + BLOCK_R (P pass-through rows, then the Nr reserved ones):
        (row, in range, reserved index (negative on pass-through rows), is reserved, source row)."""
        offs_o = row0 + tl.arange(0, BLOCK_R)
        mask_o = offs_o < P + Nr
        offs_j = offs_o - P
        is_res = mask_o & (offs_j >= 0)
        rows_o = tl.where(is_res, _rows(ridx_ptr, s_kb, s_kn, b, offs_j, is_res, P, HAS_IDX), offs_o)
        return offs_o, mask_o, offs_j, is_res, rows_o

    @triton.jit
    def _pruned_tile(p_ptr, pidx_ptr, key_ptr, b, p0, offs_c, mask_c, Np, P,
                     s_pb, s_pn, s_qb, s_qn,
                     HAS_IDX: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr):
        """Pruned tokens p0 .. p0 + BLOCK_P: ``_block_hosts``'s host and weight, and w * xp over
        the channel tile (fp32 products) as three bfloat16 parts hi + mid + lo (8 + 8 + 8
        significant bits: the fp32 value)."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < Np
        rows_p = _rows(pidx_ptr, s_qb, s_qn, b, offs_p, mask_p, P, HAS_IDX)
        host, w = _block_hosts(key_ptr, b, p0, Np, BLOCK_P)
        xp = tl.load(
            p_ptr + b * s_pb + rows_p[:, None] * s_pn + offs_c[None, :],
            mask=mask_p[:, None] & mask_c[None, :], other=0.0,
        )
        wx = w[:, None] * xp.to(tl.float32)  # (BLOCK_P, BLOCK_C)
        hi = wx.to(tl.bfloat16)
        rest = wx - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if DOT_F32:  # the interpreter: the same values, multiplied in fp32
            return host, w, hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
        return host, w, hi, mid, lo

    @triton.jit
    def _merge_tile(num, den, offs_j, is_res, host, w, hi, mid, lo):
        """num += M @ (w * xp), den += M @ w for the 0/1 match matrix M[j, i] = [host_i == j]
        (BLOCK_R, BLOCK_P).  M is exact in bf16 and so is each product with a part, so the
        three tensor-core products sum each w * xp back at fp32 precision, whatever the input
        dtype (no TF32 rounding, no rounding of the weights)."""
        chose = (offs_j[:, None] == host[None, :]) & is_res[:, None]
        den += tl.sum(tl.where(chose, w[None, :], 0.0), axis=1)
        match = chose.to(hi.dtype)
        num = tl.dot(match, lo, num)
        num = tl.dot(match, mid, num)
        return tl.dot(match, hi, num), den

    @triton.jit
    def _squeeze_fuse_kernel(
        r_ptr, p_ptr, ridx_ptr, pidx_ptr, key_ptr, y_ptr,
        Nr, Np, C, P,
        s_rb, s_rn,
        s_pb, s_pn,
        s_kb, s_kn, s_qb, s_qn,
        s_yb, s_yn,
        E: tl.constexpr,
        DOT_F32: tl.constexpr,
        HAS_IDX: tl.constexpr,
        ONE_P: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_g = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if ONE_P:  # every pruned token in one block: read it once, merge it into every row tile
            host, w, hi, mid, lo = _pruned_tile(p_ptr, pidx_ptr, key_ptr, b, 0, offs_c, mask_c, Np, P,
                                                s_pb, s_pn, s_qb, s_qn, HAS_IDX, DOT_F32, BLOCK_P)

        row0 = pid_g * ROW_TILES * BLOCK_R
        tiles = tl.minimum(ROW_TILES, tl.cdiv(P + Nr - row0, BLOCK_R))
        for t in range(0, tiles):
            offs_o, mask_o, offs_j, is_res, rows_o = _out_rows(ridx_ptr, s_kb, s_kn, b, row0 + t * BLOCK_R,
                                                               Nr, P, HAS_IDX, BLOCK_R)
            num = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            den = tl.zeros([BLOCK_R], dtype=tl.float32)
            if ONE_P:
                num, den = _merge_tile(num, den, offs_j, is_res, host, w, hi, mid, lo)
            else:
                for p0 in range(0, Np, BLOCK_P):
                    host_b, w_b, hi_b, mid_b, lo_b = _pruned_tile(
                        p_ptr, pidx_ptr, key_ptr, b, p0, offs_c, mask_c, Np, P,
                        s_pb, s_pn, s_qb, s_qn, HAS_IDX, DOT_F32, BLOCK_P)
                    num, den = _merge_tile(num, den, offs_j, is_res, host_b, w_b, hi_b, mid_b, lo_b)
            xr = tl.load(
                r_ptr + b * s_rb + rows_o[:, None] * s_rn + offs_c[None, :],
                mask=mask_o[:, None] & mask_c[None, :], other=0.0,
            )  # (BLOCK_R, BLOCK_C), input dtype
            y = (E * xr.to(tl.float32) + num) / (E + den[:, None])
            # Unmatched reserved rows and pass-through rows: the input, untouched (no fp32 round trip).
            out = tl.where((den > 0.0)[:, None], y.to(xr.dtype), xr)
            tl.store(
                y_ptr + b * s_yb + offs_o[:, None] * s_yn + offs_c[None, :],
                out, mask=mask_o[:, None] & mask_c[None, :],
            )

    @triton.jit
    def _squeeze_update_kernel(
        r_ptr, p_ptr, ridx_ptr, pidx_ptr, key_ptr, y_ptr,
        Nr, Np, C, P,
        s_rb, s_rn,
        s_pb, s_pn,
        s_kb, s_kn, s_qb, s_qn,
        s_yb, s_yn,
        E: tl.constexpr,
        DOT_F32: tl.constexpr,
        HAS_IDX: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        # 1. Every output row copied from its source: P pass-through rows, then the Nr reserved.
        for row0 in range(0, P + Nr, BLOCK_R):
            offs_o, mask_o, _, _, rows_o = _out_rows(ridx_ptr, s_kb, s_kn, b, row0, Nr, P, HAS_IDX, BLOCK_R)
            mask = mask_o[:, None] & mask_c[None, :]
            xr = tl.load(r_ptr + b * s_rb + rows_o[:, None] * s_rn + offs_c[None, :], mask=mask, other=0.0)
            tl.store(y_ptr + b * s_yb + offs_o[:, None] * s_yn + offs_c[None, :], xr, mask=mask)
        tl.debug_barrier()  # the host rows below overwrite copies that other threads stored
        # 2. The host row of each pruned token, from its whole group: pruned tokens i and i' are
        # in one group when they share a host, so num_i = S @ (w * xp), den_i = S @ w for the
        # 0/1 matrix S[i, i'] = [host_i == host_i'].  Tokens of one group write the same values.
        for p0 in range(0, Np, BLOCK_P):
            host, _ = _block_hosts(key_ptr, b, p0, Np, BLOCK_P)  # the rows to rewrite
            valid = host >= 0
            num = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            den = tl.zeros([BLOCK_P], dtype=tl.float32)
            for q0 in range(0, Np, BLOCK_P):
                host_q, w_q, hi_q, mid_q, lo_q = _pruned_tile(
                    p_ptr, pidx_ptr, key_ptr, b, q0, offs_c, mask_c, Np, P,
                    s_pb, s_pn, s_qb, s_qn, HAS_IDX, DOT_F32, BLOCK_P)
                num, den = _merge_tile(num, den, host, valid, host_q, w_q, hi_q, mid_q, lo_q)
            rows_h = _rows(ridx_ptr, s_kb, s_kn, b, host, valid, P, HAS_IDX)
            mask = valid[:, None] & mask_c[None, :]
            xr = tl.load(r_ptr + b * s_rb + rows_h[:, None] * s_rn + offs_c[None, :], mask=mask, other=0.0)
            y = (E * xr.to(tl.float32) + num) / (E + den[:, None])
            tl.store(y_ptr + b * s_yb + (P + host)[:, None] * s_yn + offs_c[None, :], y.to(xr.dtype), mask=mask)

    def _configs(shapes: list[tuple], names: tuple[str, ...]) -> list:
        """Autotuning candidates (block sizes, then warps and stages); one fixed config when
        interpreting (each interpreted launch is slow, and timing it means nothing)."""
        if interpreting():
            shapes = shapes[:1]
        return [
            triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)
            for *blocks, warps, stages in shapes
        ]

    # The first entry of each list is the untuned default (and the interpreter's only config):
    # the fastest at DeiT-S's first site (fp32, C 384) on an H200 (hosts 68 us, merge 83 us).
    # The host search has only that one: under torch.compile Inductor autotunes these kernels
    # itself, and its choice from a list of 7 made the host search 2x slower at every eTPS
    # site of DeiT-S (273 us per batch, run 10); from 3, 155 to 169 us; this one alone, 150 us
    # (runs 12 to 15, docs/benchmarks.md).  The merge keeps the configs that won at some
    # DeiT-T/S/B site shape (fp32 or bf16).
    # BLOCK_P is not tuned: one block holds every pruned token up to _ONE_BLOCK_P of them.
    _HOSTS_CONFIGS = [  # (BLOCK_R, BLOCK_C, warps, stages)
        (64, 16, 4, 4),
    ]
    _FUSE_CONFIGS = [  # (BLOCK_R, BLOCK_C, ROW_TILES, warps, stages)
        (32, 64, 1, 4, 2), (32, 32, 1, 4, 2), (16, 64, 1, 4, 2), (32, 128, 1, 4, 2),
    ]
    # The update: both won at PVT-Tiny's stage-2 site (fp32, Np 235, C 128) on an H200 (239 and
    # 240 us, against 482 us for the fuse kernel's loop over pruned blocks; squeeze_kernels.py).
    _UPDATE_CONFIGS = [  # (BLOCK_R, BLOCK_C, warps, stages)
        (32, 64, 4, 2), (32, 128, 8, 2),
    ]
    # Tuned per problem size and dtype (Triton adds the tensor dtypes to the key).
    _hosts_tuned = triton.autotune(
        _configs(_HOSTS_CONFIGS, ("BLOCK_R", "BLOCK_C")), key=["Nr", "Np", "C", "HAS_IDX"],
        # With more than one config, every timed one must start from the empty keys.
        restore_value=["key_ptr"],
    )(_squeeze_hosts_kernel)
    _fuse_tuned = triton.autotune(
        _configs(_FUSE_CONFIGS, ("BLOCK_R", "BLOCK_C", "ROW_TILES")), key=["Nr", "Np", "C", "P", "HAS_IDX"]
    )(_squeeze_fuse_kernel)
    _update_tuned = triton.autotune(
        _configs(_UPDATE_CONFIGS, ("BLOCK_R", "BLOCK_C")), key=["Nr", "Np", "C", "P", "HAS_IDX"]
    )(_squeeze_update_kernel)

_ONE_BLOCK_P = 128  # up to this many pruned tokens per image are one block (read once per program)


def _block_p(Np: int) -> int:
    """The pruned block: all of them (a power of two, >= 16 for ``tl.dot``) or 64-token blocks."""
    return max(16, triton.next_power_of_2(Np)) if Np <= _ONE_BLOCK_P else 64


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


def _precision(dtype: torch.dtype) -> str:
    # fp32: three TF32 products (relative error ~2^-22).  Measured on an H200 at DeiT-S's first
    # site, bf16 hi + lo halves (three bf16 products) took 46 us against 60 us, but their ~2^-16
    # error in the cosine moves the weights exp(c) by ~1e-5: kept out for accuracy.  16-bit
    # operands ignore the setting (their products are exact in the fp32 accumulator).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def squeeze_triton(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """TPS squeeze (tps-reference Sec. 1) as two Triton kernels; forward only.

    reserved (B, Nr, C), pruned (B, Np, C), same float dtype (fp32 / bf16 / fp16) and device.
    Returns a new contiguous (B, Nr, C) tensor in the input dtype; reserved rows that host no
    pruned token are copied bit for bit (so Np == 0 returns a copy of ``reserved``; the result
    never aliases an input, as custom ops require).  Any strides are accepted.
    """
    return _squeeze_keys(reserved, pruned)[0]


def _squeeze_with_hosts(reserved: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``squeeze_triton`` plus the host index of every pruned token, (B, Np) int32 (for tests)."""
    y, keys = _squeeze_keys(reserved, pruned)
    return y, _hosts_of(keys)


def _squeeze_keys(reserved: torch.Tensor, pruned: torch.Tensor, traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(reserved, pruned)
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    if B == 0 or Nr == 0 or C == 0 or Np == 0:
        return reserved.clone(memory_format=torch.contiguous_format), _no_keys(B, Np, reserved.device)
    check_runnable(reserved, "squeeze_triton", "squeeze_reference")
    return _launch(reserved, pruned, None, None, 0, Nr, Np, traceable)


def squeeze_tokens_triton(
    x: torch.Tensor, kept_idx: torch.Tensor, pruned_idx: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """``squeeze_tokens`` (see ``ops.squeeze``) as the same two launches, reading kept and pruned
    rows of ``x`` (B, P + n, C) through the int64 indices (B, k), (B, n - k) into ``x[:, P:]``
    and writing the (B, P + k, C) result, pass-through rows included.  Forward only."""
    return _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix)[0]


def _squeeze_tokens_with_hosts(x, kept_idx, pruned_idx, num_prefix):
    """``squeeze_tokens_triton`` plus the host index of every pruned token, (B, Np) int32."""
    y, keys = _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix)
    return y, _hosts_of(keys)


def _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix, traceable=False):
    op = "squeeze_tokens_triton"
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{op}: x must be a (B, P + n, C) float32, bfloat16 or float16 tensor; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    for name, idx in (("kept_idx", kept_idx), ("pruned_idx", pruned_idx)):
        if idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[0] != x.shape[0] or idx.device != x.device:
            raise ValueError(f"{op}: {name} must be a (B, m) int64 tensor on x's device; "
                             f"got {tuple(idx.shape)} {idx.dtype} on {idx.device}")
    if not 0 <= num_prefix <= x.shape[1]:
        raise ValueError(f"{op}: num_prefix must be in [0, {x.shape[1]}] for x of shape {tuple(x.shape)}; "
                         f"got {num_prefix}")
    B, _, C = x.shape
    Nr, Np = kept_idx.shape[1], pruned_idx.shape[1]
    if B == 0 or C == 0 or num_prefix + Nr == 0:
        y = torch.empty((B, num_prefix + Nr, C), device=x.device, dtype=x.dtype)
        return y, _no_keys(B, Np, x.device)
    check_runnable(x, "squeeze_triton", "squeeze_reference")
    return _launch(x, x, kept_idx, pruned_idx, num_prefix, Nr, Np, traceable)


def _realized(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an explicit view of itself, for a kernel argument in a traced graph.

    Inductor fixes the strides of a user Triton kernel's tensor arguments, and an argument that
    is still an unmaterialised computation (the residual sum before a site) it copies, once per
    argument: DeiT-S eTPS wrote that sum four times per site (r and p of both launches,
    250 us per batch on an H200).  ``as_strided`` makes Inductor materialise it once, in place.
    """
    return t.as_strided(t.shape, t.stride(), t.storage_offset())


def _launch(r_src, p_src, ridx, pidx, P, Nr, Np, traceable=False) -> tuple[torch.Tensor, torch.Tensor]:
    """The host search, then one merge kernel; returns (y, packed host keys (B, Np) int64).
    Plain: reserved/pruned rows are rows of ``r_src``/``p_src`` (P == 0).  Indexed: they are rows
    ``P + ridx[b]`` / ``P + pidx[b]``, and rows 0..P-1 pass through.  The merge is the fuse
    kernel, or the update kernel when 128 < Np < Nr."""
    same = p_src is r_src
    # The kernels read channels at unit stride (vector loads whatever the launcher specialises).
    if r_src.stride(-1) != 1:
        r_src = r_src.contiguous()
    if p_src.stride(-1) != 1:
        p_src = r_src if same else p_src.contiguous()
    update = _ONE_BLOCK_P < Np < Nr  # the merge whose work (Np x Np, not Nr x Np) is smaller
    hosts, hosts_opts = launcher(_hosts_tuned, traceable)
    merge, merge_opts = launcher(_update_tuned if update else _fuse_tuned, traceable)
    if hosts is not _hosts_tuned:  # traced into a graph
        r_src = _realized(r_src)
        p_src = r_src if same else _realized(p_src)
    B, _, C = r_src.shape
    dtype, dev = r_src.dtype, r_src.device
    keys = torch.full((B, Np), torch.iinfo(torch.int64).min, device=dev, dtype=torch.int64)
    y = torch.empty((B, P + Nr, C), device=dev, dtype=dtype)
    has_idx = ridx is not None
    if not has_idx:  # unused pointers and strides
        ridx = pidx = keys
    idx_strides = (*ridx.stride(), *pidx.stride()) if has_idx else (0, 0, 0, 0)
    strides = (*r_src.stride()[:2], *p_src.stride()[:2], *idx_strides)
    block_p = _block_p(Np)
    # DOT_F32: the interpreter multiplies bf16 tiles as their raw uint16 storage, so there every
    # dot operand is upcast (bf16 x bf16 products are exact in fp32: the same arithmetic).
    common = dict(HAS_IDX=has_idx, BLOCK_P=block_p, DOT_F32=interpreting())
    with device_guard(dev):
        if Np > 0 and Nr > 0:
            hosts[lambda meta: (triton.cdiv(Nr, meta["BLOCK_R"]), triton.cdiv(Np, block_p), B)](
                r_src, p_src, ridx, pidx, keys, Nr, Np, C, P, *strides,
                EPS=_EPS, PRECISION=_precision(dtype), **common, **hosts_opts,
            )
        rows = P + Nr
        if update:
            merge[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), B)](
                r_src, p_src, ridx, pidx, keys, y, Nr, Np, C, P, *strides, *y.stride()[:2],
                E=math.e, **common, **merge_opts,
            )
        else:
            merge[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), triton.cdiv(rows, meta["BLOCK_R"] * meta["ROW_TILES"]), B)](
                r_src, p_src, ridx, pidx, keys, y, Nr, Np, C, P, *strides, *y.stride()[:2],
                E=math.e, ONE_P=block_p >= Np, **common, **merge_opts,
            )
    return y, keys


def _no_keys(B: int, Np: int, device: torch.device) -> torch.Tensor:
    """Keys of the degenerate cases (nothing to compare): every host reads as 0."""
    return torch.full((B, Np), 2**31 - 1, device=device, dtype=torch.int64)


def _hosts_of(keys: torch.Tensor) -> torch.Tensor:
    """The host index (B, Np) int32 held in packed keys (the low half, see ``_pack_host``)."""
    return (2**31 - 1 - (keys & (2**31 - 1))).to(torch.int32)


def register_cuda_kernel() -> bool:
    """Install the Triton kernels as the CUDA kernels of ``tokenreduce::squeeze`` and ``squeeze_tokens``.

    Returns True when registered (now or by an earlier call), False when triton or CUDA is
    missing (CPU-only installs: nothing happens, the reference keeps serving every device).
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    if not HAVE_TRITON:
        logger.debug("tokenreduce: triton not installed; squeeze stays on the reference kernel")
        return False
    if not torch.cuda.is_available():
        logger.debug("tokenreduce: no CUDA device; squeeze stays on the reference kernel")
        return False
    from ._kernels import register_device_kernels

    register_device_kernels("cuda", squeeze=_cuda_kernel, squeeze_tokens=_cuda_tokens_kernel)
    _REGISTERED = True
    logger.debug("tokenreduce: registered the Triton squeeze as the CUDA kernel of both ops")
    return True


def _cuda_kernel(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    # fp64 (or mixed dtypes, which ops.squeeze rejects before dispatch) stay on the reference.
    if reserved.dtype not in _SUPPORTED_DTYPES or pruned.dtype != reserved.dtype:
        from tokenreduce.ops.squeeze import squeeze_reference

        return squeeze_reference(reserved, pruned)
    return _squeeze_keys(reserved, pruned, traceable=True)[0]


def _cuda_tokens_kernel(x: torch.Tensor, kept_idx: torch.Tensor, pruned_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    if x.dtype not in _SUPPORTED_DTYPES:
        from tokenreduce.ops.squeeze import squeeze_tokens_reference

        return squeeze_tokens_reference(x, kept_idx, pruned_idx, num_prefix)
    return _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix, traceable=True)[0]
