"""The Triton kernels of the split-form TPS squeeze (launched by ``squeeze_triton.py``).

Three kernels; a launch is the host search, then one merge (see ``docs/kernels.md`` for the
grids, the work per program and the measured tilings):

    _squeeze_hosts_kernel    each pruned token's best host, as one packed int64 key per token
    _squeeze_fuse_kernel     every output row from the keys (work Nr x Np)
    _squeeze_update_kernel   the merge when 128 < Np < Nr: copy every row, rewrite the hosts
                             (work Np x Np)

Argument names follow the Triton tutorials: ``<tensor>_ptr`` and ``stride_<tensor><dim>``, with
r the reserved rows, p the pruned rows, ri / pi their index tensors (indexed form), y the output;
b the batch dim, n the token dim (channels are read at unit stride). Reserved and pruned rows are
rows of ``r_ptr`` / ``p_ptr`` (plain form), or rows ``P + ri[b]`` / ``P + pi[b]`` of one stream
with the P leading rows copied through (``HAS_IDX``).

Imported only where triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import interpreting
from ._triton_keys import key_index, key_value, pack_key

__all__ = [
    "FUSE_CONFIGS",
    "HOSTS_CONFIGS",
    "HOSTS_SMALL_CONFIGS",
    "UPDATE_CONFIGS",
    "_squeeze_fuse_kernel",
    "_squeeze_hosts_kernel",
    "_squeeze_update_kernel",
    "fuse_tuned",
    "hosts_small",
    "hosts_tuned",
    "update_tuned",
]


@triton.jit
def _rows(idx_ptr, stride_ib, stride_in, b, offs, mask, P, HAS_IDX: tl.constexpr):
    """Row numbers in the source tensor of logical rows ``offs``: ``P + idx[b, offs]`` when
    indexed, else ``offs`` itself."""
    if HAS_IDX:
        return tl.load(idx_ptr + b * stride_ib + offs * stride_in, mask=mask, other=0) + P
    else:
        return offs.to(tl.int64)


@triton.jit
def _squeeze_hosts_kernel(
    r_ptr,
    p_ptr,
    ridx_ptr,
    pidx_ptr,
    key_ptr,
    Nr,
    Np,
    C,
    P,
    stride_rb,
    stride_rn,
    stride_pb,
    stride_pn,
    stride_rib,
    stride_rin,
    stride_pib,
    stride_pin,
    EPS: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_IDX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(Nr, BLOCK_R), cdiv(Np, BLOCK_P), B).  One program per (tile of reserved rows,
    block of pruned rows): their cosines, and each pruned row's best host in the tile.
    Writes ``atomic_max`` of ``pack_key(cosine, host)`` into the pruned rows' keys."""
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r_base = r_ptr + b * stride_rb
    p_base = p_ptr + b * stride_pb
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    mask_p = offs_p < Np
    rows_p = _rows(pidx_ptr, stride_pib, stride_pin, b, offs_p, mask_p, P, HAS_IDX)
    r0 = pid_r * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    mask_r = offs_r < Nr
    rows_r = _rows(ridx_ptr, stride_rib, stride_rin, b, offs_r, mask_r, P, HAS_IDX)

    # One pass over the channels: dot products (BLOCK_P, BLOCK_R) and both sets of squared norms, fp32.
    dots = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    ssq_p = tl.zeros([BLOCK_P], dtype=tl.float32)
    ssq_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        xp = tl.load(
            p_base + rows_p[:, None] * stride_pn + offs_c[None, :], mask=mask_p[:, None] & mask_c[None, :], other=0.0
        )  # (BLOCK_P, BLOCK_C), input dtype
        xr_t = tl.load(
            r_base + rows_r[None, :] * stride_rn + offs_c[:, None], mask=mask_c[:, None] & mask_r[None, :], other=0.0
        )  # (BLOCK_C, BLOCK_R), transposed
        xp_f = xp.to(tl.float32)
        xr_f = xr_t.to(tl.float32)
        if DOT_F32:
            dots = tl.dot(xp_f, xr_f, dots, input_precision=PRECISION)
        else:
            dots = tl.dot(xp, xr_t, dots, input_precision=PRECISION)
        ssq_p += tl.sum(xp_f * xp_f, axis=1)
        ssq_r += tl.sum(xr_f * xr_f, axis=0)
    # fp32 squared norms overflow above ~1.8e19 (the reference rescales; see docs/kernels.md): the
    # cosine is then NaN, which the rule below ranks last.
    eps_p = EPS
    eps_r = EPS
    inv_p = 1.0 / (tl.sqrt(ssq_p) + eps_p)
    inv_r = 1.0 / (tl.sqrt(ssq_r) + eps_r)
    cos = dots * inv_p[:, None] * inv_r[None, :]  # (BLOCK_P, BLOCK_R)
    # NaN (a row holding inf or NaN) ranks below every number; padding columns never win.
    cos = tl.where(mask_r[None, :] & (cos == cos), cos, float("-inf"))
    tile_max = tl.max(cos, axis=1)
    tile_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + r0
    tl.atomic_max(key_ptr + b * Np + offs_p, pack_key(tile_max, tile_arg), mask=mask_p)


@triton.jit
def _block_hosts(key_ptr, b, p0, Np, BLOCK_P: tl.constexpr):
    """Pruned tokens p0 .. p0 + BLOCK_P: host (BLOCK_P,) int32 (-1 past Np, matching no row)
    and weight exp(cosine) (BLOCK_P,) fp32, from their keys."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask_p = offs_p < Np
    key = tl.load(key_ptr + b * Np + offs_p, mask=mask_p, other=0)
    return tl.where(mask_p, key_index(key), -1), tl.exp(key_value(key))


@triton.jit
def _out_rows(ridx_ptr, stride_rib, stride_rin, b, row0, Nr, P, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr):
    """Output rows row0 .. row0 + BLOCK_R (P pass-through rows, then the Nr reserved ones):
    (row, in range, reserved index (negative on pass-through rows), is reserved, source row)."""
    offs_o = row0 + tl.arange(0, BLOCK_R)
    mask_o = offs_o < P + Nr
    offs_j = offs_o - P
    is_res = mask_o & (offs_j >= 0)
    rows_o = tl.where(is_res, _rows(ridx_ptr, stride_rib, stride_rin, b, offs_j, is_res, P, HAS_IDX), offs_o)
    return offs_o, mask_o, offs_j, is_res, rows_o


@triton.jit
def _pruned_tile(
    src_p, key_ptr, b, p0, offs_c, mask_c, Np, P, HAS_IDX: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr
):
    """Pruned tokens p0 .. p0 + BLOCK_P: ``_block_hosts``'s host and weight, and w * xp over
    the channel tile (fp32 products) as three bfloat16 parts hi + mid + lo (8 + 8 + 8
    significant bits: the fp32 value). ``src_p`` is where the pruned rows are read:
    ``(p_ptr, pidx_ptr, stride_pb, stride_pn, stride_pib, stride_pin)``."""
    p_ptr, pidx_ptr, stride_pb, stride_pn, stride_pib, stride_pin = src_p
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask_p = offs_p < Np
    rows_p = _rows(pidx_ptr, stride_pib, stride_pin, b, offs_p, mask_p, P, HAS_IDX)
    host, w = _block_hosts(key_ptr, b, p0, Np, BLOCK_P)
    xp = tl.load(
        p_ptr + b * stride_pb + rows_p[:, None] * stride_pn + offs_c[None, :],
        mask=mask_p[:, None] & mask_c[None, :],
        other=0.0,
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
    r_ptr,
    p_ptr,
    ridx_ptr,
    pidx_ptr,
    key_ptr,
    y_ptr,
    Nr,
    Np,
    C,
    P,
    stride_rb,
    stride_rn,
    stride_pb,
    stride_pn,
    stride_rib,
    stride_rin,
    stride_pib,
    stride_pin,
    stride_yb,
    stride_yn,
    E: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_IDX: tl.constexpr,
    ONE_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROW_TILES: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), cdiv(P + Nr, ROW_TILES * BLOCK_R), B).  One program per (channel
    tile, group of ROW_TILES output-row tiles): every pruned token merged into its host's row.
    Writes those output rows: (e xr + num) / (e + den), or xr itself where nothing joined."""
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    src_p = (p_ptr, pidx_ptr, stride_pb, stride_pn, stride_pib, stride_pin)  # the pruned rows (``_pruned_tile``)
    if ONE_P:  # every pruned token in one block: read it once, merge it into every row tile
        host, w, hi, mid, lo = _pruned_tile(src_p, key_ptr, b, 0, offs_c, mask_c, Np, P, HAS_IDX, DOT_F32, BLOCK_P)
    row0 = pid_g * ROW_TILES * BLOCK_R
    tiles = tl.minimum(ROW_TILES, tl.cdiv(P + Nr - row0, BLOCK_R))
    for t in range(0, tiles):
        offs_o, mask_o, offs_j, is_res, rows_o = _out_rows(
            ridx_ptr, stride_rib, stride_rin, b, row0 + t * BLOCK_R, Nr, P, HAS_IDX, BLOCK_R
        )
        num = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        den = tl.zeros([BLOCK_R], dtype=tl.float32)
        if ONE_P:
            num, den = _merge_tile(num, den, offs_j, is_res, host, w, hi, mid, lo)
        else:
            for p0 in range(0, Np, BLOCK_P):
                host_b, w_b, hi_b, mid_b, lo_b = _pruned_tile(
                    src_p, key_ptr, b, p0, offs_c, mask_c, Np, P, HAS_IDX, DOT_F32, BLOCK_P
                )
                num, den = _merge_tile(num, den, offs_j, is_res, host_b, w_b, hi_b, mid_b, lo_b)
        mask = mask_o[:, None] & mask_c[None, :]
        xr = tl.load(r_ptr + b * stride_rb + rows_o[:, None] * stride_rn + offs_c[None, :], mask=mask, other=0.0)
        y = (E * xr.to(tl.float32) + num) / (E + den[:, None])
        # Unmatched reserved rows and pass-through rows: the input, untouched (no fp32 round trip).
        out = tl.where((den > 0.0)[:, None], y.to(xr.dtype), xr)
        tl.store(y_ptr + b * stride_yb + offs_o[:, None] * stride_yn + offs_c[None, :], out, mask=mask)


@triton.jit
def _squeeze_update_kernel(
    r_ptr,
    p_ptr,
    ridx_ptr,
    pidx_ptr,
    key_ptr,
    y_ptr,
    Nr,
    Np,
    C,
    P,
    stride_rb,
    stride_rn,
    stride_pb,
    stride_pn,
    stride_rib,
    stride_rin,
    stride_pib,
    stride_pin,
    stride_yb,
    stride_yn,
    E: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_IDX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), B).  One program per (channel tile, image): copies every output
    row, then recomputes each pruned token's host row from the token's whole group.
    Writes all P + Nr output rows (tokens of one group write the same values to one row)."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    src_p = (p_ptr, pidx_ptr, stride_pb, stride_pn, stride_pib, stride_pin)  # the pruned rows (``_pruned_tile``)
    # 1. Every output row copied from its source: P pass-through rows, then the Nr reserved.
    for row0 in range(0, P + Nr, BLOCK_R):
        offs_o, mask_o, _, _, rows_o = _out_rows(ridx_ptr, stride_rib, stride_rin, b, row0, Nr, P, HAS_IDX, BLOCK_R)
        mask = mask_o[:, None] & mask_c[None, :]
        xr = tl.load(r_ptr + b * stride_rb + rows_o[:, None] * stride_rn + offs_c[None, :], mask=mask, other=0.0)
        tl.store(y_ptr + b * stride_yb + offs_o[:, None] * stride_yn + offs_c[None, :], xr, mask=mask)
    tl.debug_barrier()  # the host rows below overwrite copies that other threads stored
    # 2. The host row of each pruned token, from its whole group: pruned tokens i and i' are
    # in one group when they share a host, so num_i = S @ (w * xp), den_i = S @ w for the
    # 0/1 matrix S[i, i'] = [host_i == host_i'].
    for p0 in range(0, Np, BLOCK_P):
        host, _ = _block_hosts(key_ptr, b, p0, Np, BLOCK_P)  # the rows to rewrite
        valid = host >= 0
        num = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        den = tl.zeros([BLOCK_P], dtype=tl.float32)
        for q0 in range(0, Np, BLOCK_P):
            host_q, w_q, hi_q, mid_q, lo_q = _pruned_tile(
                src_p, key_ptr, b, q0, offs_c, mask_c, Np, P, HAS_IDX, DOT_F32, BLOCK_P
            )
            num, den = _merge_tile(num, den, host, valid, host_q, w_q, hi_q, mid_q, lo_q)
        rows_h = _rows(ridx_ptr, stride_rib, stride_rin, b, host, valid, P, HAS_IDX)
        mask = valid[:, None] & mask_c[None, :]
        xr = tl.load(r_ptr + b * stride_rb + rows_h[:, None] * stride_rn + offs_c[None, :], mask=mask, other=0.0)
        y = (E * xr.to(tl.float32) + num) / (E + den[:, None])
        tl.store(y_ptr + b * stride_yb + (P + host)[:, None] * stride_yn + offs_c[None, :], y.to(xr.dtype), mask=mask)


def _configs(shapes: list[tuple], names: tuple[str, ...]) -> list:
    """Autotuning candidates (block sizes, then warps and stages); one fixed config when
    interpreting (each interpreted launch is slow, and timing it means nothing)."""
    if interpreting():
        shapes = shapes[:1]
    return [
        triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages) for *blocks, warps, stages in shapes
    ]


# The first entry of each list is the untuned default (the interpreter's only config). Why these
# and what they measured: docs/kernels.md. BLOCK_P is not tuned (``squeeze_triton._block_p``).
HOSTS_CONFIGS = [(64, 16, 4, 4)]  # (BLOCK_R, BLOCK_C, warps, stages): one, Inductor autotunes it too
# Grids that would have fewer programs than the GPU has SMs (small batches): 16-row pruned blocks
# and 32-row reserved tiles, so one image's search spreads over 3x to 7x as many programs.
HOSTS_SMALL_CONFIGS = [(16, 32, 16, 4, 4)]  # (BLOCK_P, BLOCK_R, BLOCK_C, warps, stages)
FUSE_CONFIGS = [(32, 64, 1, 4, 2), (32, 32, 1, 4, 2), (16, 64, 1, 4, 2), (32, 128, 1, 4, 2)]  # + ROW_TILES
UPDATE_CONFIGS = [(32, 64, 4, 2), (32, 128, 8, 2)]  # (BLOCK_R, BLOCK_C, warps, stages)
# Tuned per problem size and dtype (Triton adds the tensor dtypes to the key). With more than
# one config, every timed host search must start from the empty keys (restore_value).
hosts_tuned = triton.autotune(
    _configs(HOSTS_CONFIGS, ("BLOCK_R", "BLOCK_C")), key=["Nr", "Np", "C", "HAS_IDX"], restore_value=["key_ptr"]
)(_squeeze_hosts_kernel)
hosts_small = triton.autotune(
    _configs(HOSTS_SMALL_CONFIGS, ("BLOCK_P", "BLOCK_R", "BLOCK_C")),
    key=["Nr", "Np", "C", "HAS_IDX"],
    restore_value=["key_ptr"],
)(_squeeze_hosts_kernel)
fuse_tuned = triton.autotune(
    _configs(FUSE_CONFIGS, ("BLOCK_R", "BLOCK_C", "ROW_TILES")), key=["Nr", "Np", "C", "P", "HAS_IDX"]
)(_squeeze_fuse_kernel)
update_tuned = triton.autotune(_configs(UPDATE_CONFIGS, ("BLOCK_R", "BLOCK_C")), key=["Nr", "Np", "C", "P", "HAS_IDX"])(
    _squeeze_update_kernel
)
