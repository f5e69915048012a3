"""The split-form TPS squeeze (tps-reference Sec. 1) as two Triton launches; forward only.

``squeeze_triton(reserved, pruned)`` computes exactly what ``squeeze_reference`` computes:

    c[i, j] = <xp_i / (|xp_i| + 1e-6), xr_j / (|xr_j| + 1e-6)>     (NaN ranks below every number)
    h(i)    = argmax_j c[i, j]                 (lowest j on ties)
    y_j     = (e * xr_j + sum_{i: h(i)=j} exp(c[i, j]) xp_i) / (e + sum_{i: h(i)=j} exp(c[i, j]))
    y_j     = xr_j, bit for bit, when no pruned token picked j

and ``squeeze_tokens_triton(x, kept_idx, pruned_idx, P)`` the same with the reserved and pruned
rows read from the token stream through their indices (``P + idx``) and the P leading rows
copied through, so a reduction site is a fill and two launches with no gather, no concatenation
and nothing of size (B, Nr, C) besides the output; the result is deterministic. The kernels
(``_squeeze_kernels.py``; grids, work and measured tilings in docs/kernels.md): the host search
writes one packed key per pruned token (``_triton_keys.py``), then one merge writes the output,
the fuse kernel or, when 128 < Np < Nr, the update kernel.

Precision: every sum is in fp32. The similarity is a tensor-core product with fp32
accumulation: exact products for bf16 / fp16 inputs, ``input_precision="tf32x3"`` for fp32
inputs (three TF32 products, relative error ~2^-22). Squared norms of rows above ~1.8e19
overflow fp32; their cosines are NaN and rank last (the reference rescales instead). The merge
multiplies the 0/1 match matrix (exact in bf16) by w * xp split into three bf16 parts, so it is
fp32-accurate for every input dtype.

The custom ops' autograd recomputes with the reference. ``enable_triton_kernels``
(``ops/_kernels.py``) installs ``CUDA_KERNELS`` as the CUDA kernels of
``torch.ops.tokenreduce.squeeze`` and ``squeeze_tokens``; there they launch through
``torch.library.wrap_triton``, so under ``torch.compile`` (torch >= 2.6) Inductor launches them
from the compiled graph, with no Python of the operator on that path. The kernels also run on
CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import functools
import math

import torch

from ._triton import HAVE_TRITON, KEY_INDEX_MAX, KEY_LOWEST, check_runnable, device_guard, interpreting, launcher
from ._validate import (
    check_dtype,
    check_index_pair,
    check_num_prefix,
    check_same_device,
    check_same_dtype,
    check_size_match,
    check_tensor,
)

if HAVE_TRITON:
    import triton

    # The raw kernels and their tilings, re-exported for benchmarks/squeeze_kernels.py and gpu.py.
    from ._squeeze_kernels import FUSE_CONFIGS as _FUSE_CONFIGS  # noqa: F401
    from ._squeeze_kernels import HOSTS_CONFIGS as _HOSTS_CONFIGS  # noqa: F401
    from ._squeeze_kernels import HOSTS_SMALL_CONFIGS as _HOSTS_SMALL_CONFIGS  # noqa: F401
    from ._squeeze_kernels import UPDATE_CONFIGS as _UPDATE_CONFIGS  # noqa: F401
    from ._squeeze_kernels import _squeeze_fuse_kernel, _squeeze_hosts_kernel, _squeeze_update_kernel  # noqa: F401
    from ._squeeze_kernels import fuse_tuned as _fuse_tuned
    from ._squeeze_kernels import hosts_small as _hosts_small
    from ._squeeze_kernels import hosts_tuned as _hosts_tuned
    from ._squeeze_kernels import update_tuned as _update_tuned

__all__ = ["CUDA_KERNELS", "squeeze_tokens_triton", "squeeze_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS = 1e-6
_ONE_BLOCK_P = 128  # up to this many pruned tokens per image are one block (read once per program)


def _block_p(Np: int) -> int:
    """The pruned block: all of them (a power of two, >= 16 for ``tl.dot``) or 64-token blocks."""
    return max(16, triton.next_power_of_2(Np)) if Np <= _ONE_BLOCK_P else 64


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 0 elsewhere (the interpreter), where the
    host search keeps its default tiling."""
    if device.type != "cuda":
        return 0
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def _small_grid(B: int | torch.SymInt, Nr: int, Np: int, block_p: int, device: torch.device) -> bool:
    """Whether the host search's default tiling would launch fewer programs than ``device`` has
    SMs (batch 1 to ~40 at DeiT-S's sites on an H200): then its finer tiling runs instead. Batch 1
    at DeiT-S's first site, fp32, on an H200: 10.7 against 17.7 us (docs/kernels.md). Traced with
    a symbolic batch size, the comparison is a guard: a batch across the threshold recompiles."""
    programs = B * triton.cdiv(Nr, _HOSTS_CONFIGS[0][0]) * triton.cdiv(Np, block_p)
    return programs < _sm_count(device)


def _precision(dtype: torch.dtype) -> str:
    """fp32: three TF32 products (bf16 hi + lo halves were faster but ~2^-16 off: docs/kernels.md).
    16-bit operands ignore the setting (their products are exact in the fp32 accumulator)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_stream(op: str, name: str, x: object, layout: str) -> None:
    check_tensor(op, name, x, 3, layout)
    check_dtype(op, name, x, _SUPPORTED_DTYPES)


def squeeze_triton(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """TPS squeeze: reserved (B, Nr, C), pruned (B, Np, C) -> a new contiguous (B, Nr, C).

    Same float dtype (fp32 / bf16 / fp16) and device for both; any strides. Reserved rows that
    host no pruned token are copied bit for bit (so Np == 0 returns a copy of ``reserved``; the
    result never aliases an input, as custom ops require).
    """
    return _squeeze_keys(reserved, pruned)[0]


def _squeeze_with_hosts(reserved: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``squeeze_triton`` plus the host index of every pruned token, (B, Np) int32 (for tests)."""
    y, keys = _squeeze_keys(reserved, pruned)
    return y, _hosts_of(keys)


def _squeeze_keys(reserved, pruned, traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    op = "squeeze_triton"
    _check_stream(op, "reserved", reserved, "(B, Nr, C)")
    _check_stream(op, "pruned", pruned, "(B, Np, C)")
    check_same_dtype(op, "reserved", reserved, "pruned", pruned)
    check_same_device(op, "reserved", reserved, "pruned", pruned)
    check_size_match(op, "batch size", "reserved", reserved.shape[0], "pruned", pruned.shape[0])
    check_size_match(op, "channels", "reserved", reserved.shape[2], "pruned", pruned.shape[2])
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    if B == 0 or Nr == 0 or C == 0 or Np == 0:
        return reserved.clone(memory_format=torch.contiguous_format), _no_keys(B, Np, reserved.device)
    check_runnable(reserved, op, "squeeze_reference")
    return _launch(reserved, pruned, None, None, 0, Nr, Np, traceable)


def squeeze_tokens_triton(
    x: torch.Tensor, kept_idx: torch.Tensor, pruned_idx: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """``squeeze_tokens`` (see ``ops.squeeze``): x (B, P + n, C), kept_idx (B, k), pruned_idx
    (B, n - k) int64 into ``x[:, P:]`` -> a new (B, P + k, C), pass-through rows included."""
    return _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix)[0]


def _squeeze_tokens_with_hosts(x, kept_idx, pruned_idx, num_prefix):
    """``squeeze_tokens_triton`` plus the host index of every pruned token, (B, Np) int32."""
    y, keys = _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix)
    return y, _hosts_of(keys)


def _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix, traceable=False):
    op = "squeeze_tokens_triton"
    _check_stream(op, "x", x, "(B, P + n, C)")
    check_index_pair(op, x, kept_idx, pruned_idx)
    check_same_device(op, "x", x, "kept_idx", kept_idx)
    check_same_device(op, "x", x, "pruned_idx", pruned_idx)
    check_num_prefix(op, num_prefix, x)
    B, _, C = x.shape
    Nr, Np = kept_idx.shape[1], pruned_idx.shape[1]
    if B == 0 or C == 0 or num_prefix + Nr == 0:
        y = torch.empty((B, num_prefix + Nr, C), device=x.device, dtype=x.dtype)
        return y, _no_keys(B, Np, x.device)
    check_runnable(x, op, "squeeze_tokens_reference")
    return _launch(x, x, kept_idx, pruned_idx, num_prefix, Nr, Np, traceable)


def _realized(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an explicit view of itself, for a kernel argument in a traced graph.

    Inductor fixes the strides of a user Triton kernel's tensor arguments, and an argument that
    is still an unmaterialised computation (the residual sum before a site) it copies, once per
    argument: DeiT-S eTPS wrote that sum four times per site (r and p of both launches).
    ``as_strided`` makes Inductor materialise it once, in place.
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
    B, _, C = r_src.shape
    dtype, dev = r_src.dtype, r_src.device
    block_p = _block_p(Np)
    small = _small_grid(B, Nr, Np, block_p, dev)
    hosts_kernel = _hosts_small if small else _hosts_tuned
    hosts, hosts_opts = launcher(hosts_kernel, traceable)
    merge, merge_opts = launcher(_update_tuned if update else _fuse_tuned, traceable)
    if hosts is not hosts_kernel:  # traced into a graph
        r_src = _realized(r_src)
        p_src = r_src if same else _realized(p_src)
    keys = torch.full((B, Np), KEY_LOWEST, device=dev, dtype=torch.int64)
    y = torch.empty((B, P + Nr, C), device=dev, dtype=dtype)
    has_idx = ridx is not None
    if not has_idx:  # unused pointers and strides
        ridx = pidx = keys
    idx_strides = (*ridx.stride(), *pidx.stride()) if has_idx else (0, 0, 0, 0)
    strides = (*r_src.stride()[:2], *p_src.stride()[:2], *idx_strides)
    # DOT_F32: the interpreter multiplies bf16 tiles as their raw uint16 storage, so there every
    # dot operand is upcast (bf16 x bf16 products are exact in fp32: the same arithmetic).
    common = dict(HAS_IDX=has_idx, DOT_F32=interpreting())
    args = (r_src, p_src, ridx, pidx, keys)
    with device_guard(dev):
        if Np > 0 and Nr > 0:
            # The small-grid tiling brings its own pruned block; the default one takes _block_p's.
            tiling = {} if small else {"BLOCK_P": block_p}
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(Nr, meta["BLOCK_R"]),
                triton.cdiv(Np, meta["BLOCK_P"] if small else block_p),
                B,
            )
            hosts[grid](
                *args, Nr, Np, C, P, *strides, EPS=_EPS, PRECISION=_precision(dtype), **common, **tiling, **hosts_opts
            )
        rows = P + Nr
        if update:
            grid = lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), B)  # noqa: E731
            merge[grid](
                *args, y, Nr, Np, C, P, *strides, *y.stride()[:2], E=math.e, BLOCK_P=block_p, **common, **merge_opts
            )
        else:
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(C, meta["BLOCK_C"]),
                triton.cdiv(rows, meta["BLOCK_R"] * meta["ROW_TILES"]),
                B,
            )
            merge[grid](
                *args,
                y,
                *(Nr, Np, C, P),
                *strides,
                *y.stride()[:2],
                E=math.e,
                BLOCK_P=block_p,
                ONE_P=block_p >= Np,
                **common,
                **merge_opts,
            )
    return y, keys


def _no_keys(B: int, Np: int, device: torch.device) -> torch.Tensor:
    """Keys of the degenerate cases (nothing to compare): every host reads as 0 (cosine 0)."""
    return torch.full((B, Np), KEY_INDEX_MAX, device=device, dtype=torch.int64)


def _hosts_of(keys: torch.Tensor) -> torch.Tensor:
    """The host index (B, Np) int32 held in packed keys (the low half, see ``_triton_keys.py``)."""
    return (KEY_INDEX_MAX - (keys & KEY_INDEX_MAX)).to(torch.int32)


def _cuda_kernel(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    # fp64 (or mixed dtypes, which ops.squeeze rejects before dispatch) stay on the reference.
    if reserved.dtype not in _SUPPORTED_DTYPES or pruned.dtype != reserved.dtype:
        from .squeeze import squeeze_reference

        return squeeze_reference(reserved, pruned)
    return _squeeze_keys(reserved, pruned, traceable=True)[0]


def _cuda_tokens_kernel(
    x: torch.Tensor, kept_idx: torch.Tensor, pruned_idx: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    if x.dtype not in _SUPPORTED_DTYPES:
        from .squeeze import squeeze_tokens_reference

        return squeeze_tokens_reference(x, kept_idx, pruned_idx, num_prefix)
    return _squeeze_tokens_keys(x, kept_idx, pruned_idx, num_prefix, traceable=True)[0]


# What ``enable_triton_kernels`` registers for CUDA (``ops/_kernels.py``).
CUDA_KERNELS = {"squeeze": _cuda_kernel, "squeeze_tokens": _cuda_tokens_kernel}
