"""Argument checks shared by the ops.

Every check reads only ``type``, ``.dim()``, ``.shape`` and ``.dtype``: no data, no device sync,
so the checks cost nothing at run time and ``torch.compile`` traces through them (a failed check
is a plain ``raise`` that is never part of the graph). Messages follow one pattern:
``"<op>: `<argument>` <rule>, got <what was passed>"``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "check_dtype",
    "check_float",
    "check_index",
    "check_index_pair",
    "check_masked_inputs",
    "check_num_prefix",
    "check_same_device",
    "check_same_dtype",
    "check_shape",
    "check_size_match",
    "check_tensor",
    "check_token_pair",
]


def check_tensor(op: str, name: str, x: object, ndim: int, layout: str) -> None:
    """``x`` must be a tensor of rank ``ndim``; ``layout`` names the dims, e.g. ``"(B, Np, C)"``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dims {layout}, got shape {tuple(x.shape)}")


def check_float(op: str, name: str, x: Tensor) -> None:
    """``x`` must hold floating-point values (token features, scores and masks all do)."""
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{op}: `{name}` must be a floating-point tensor, got dtype {x.dtype}; convert it with `.float()`"
        )


def check_dtype(op: str, name: str, x: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """``x`` must have one of the ``allowed`` dtypes (a kernel's: the reference serves the rest)."""
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(
            f"{op}: `{name}` must have dtype {names}, got {x.dtype}; other dtypes are served by the reference"
        )


def check_same_device(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Tensors read by one kernel must live on one device."""
    if a.device != b.device:
        raise ValueError(f"{op}: `{name_a}` and `{name_b}` must be on the same device, got {a.device} and {b.device}")


def check_index(op: str, name: str, x: Tensor) -> None:
    """``x`` must be an int64 index tensor (what ``torch.gather`` requires)."""
    if x.dtype != torch.int64:
        raise TypeError(f"{op}: `{name}` must be an int64 index tensor, got dtype {x.dtype}")


def check_same_dtype(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two feature tensors combined into one output must share a dtype."""
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: `{name_a}` and `{name_b}` must have the same dtype, got {a.dtype} and {b.dtype}")


def check_size_match(op: str, what: str, name_a: str, size_a: int, name_b: str, size_b: int) -> None:
    """One dimension (``what``: "batch size", "channels", ...) must agree between two arguments."""
    if size_a != size_b:
        raise ValueError(f"{op}: `{name_a}` and `{name_b}` must have the same {what}, got {size_a} and {size_b}")


def check_shape(op: str, name: str, x: Tensor, expected: tuple[int, ...], layout: str) -> None:
    """``x`` must have exactly the shape ``expected`` (``layout`` names the dims)."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_token_pair(op: str, reserved: Tensor, pruned: Tensor) -> None:
    """The (reserved (B, Nr, C), pruned (B, Np, C)) pair every reducer takes; Nr >= 1."""
    check_tensor(op, "reserved", reserved, 3, "(B, Nr, C)")
    check_tensor(op, "pruned", pruned, 3, "(B, Np, C)")
    check_float(op, "reserved", reserved)
    check_float(op, "pruned", pruned)
    check_same_dtype(op, "reserved", reserved, "pruned", pruned)
    check_size_match(op, "batch size", "reserved", reserved.shape[0], "pruned", pruned.shape[0])
    check_size_match(op, "channels", "reserved", reserved.shape[2], "pruned", pruned.shape[2])
    if reserved.shape[1] == 0:
        raise ValueError(
            f"{op}: `reserved` must hold at least one token (Nr >= 1), got shape "
            f"{tuple(reserved.shape)}; there would be no host for the pruned tokens"
        )


def check_masked_inputs(op: str, x: Tensor, keep: Tensor, pruned_now: Tensor) -> None:
    """The (x (B, n, C), keep (B, n, 1), pruned_now (B, n, 1)) float triple every training form
    (``*_masked``) takes."""
    check_tensor(op, "x", x, 3, "(B, n, C)")
    check_tensor(op, "keep", keep, 3, "(B, n, 1)")
    check_tensor(op, "pruned_now", pruned_now, 3, "(B, n, 1)")
    for name, t in (("x", x), ("keep", keep), ("pruned_now", pruned_now)):
        check_float(op, name, t)
    B, n, _ = x.shape
    check_shape(op, "keep", keep, (B, n, 1), "(B, n, 1)")
    check_shape(op, "pruned_now", pruned_now, (B, n, 1), "(B, n, 1)")


def check_index_pair(op: str, x: Tensor, kept_idx: Tensor, pruned_idx: Tensor) -> None:
    """The (kept_idx (B, k), pruned_idx (B, n - k)) int64 indices into the patch tokens of the
    stream ``x`` (B, P + n, C) that the indexed squeeze takes."""
    for name, idx, layout in (("kept_idx", kept_idx, "(B, k)"), ("pruned_idx", pruned_idx, "(B, n - k)")):
        check_tensor(op, name, idx, 2, layout)
        check_index(op, name, idx)
        check_size_match(op, "batch size", "x", x.shape[0], name, idx.shape[0])


def check_num_prefix(op: str, num_prefix: object, x: Tensor) -> None:
    """``num_prefix`` must be an int in [0, N] for the stream ``x`` (B, N, C)."""
    n = x.shape[1]
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= n:
        raise ValueError(
            f"{op}: `num_prefix` must be an int in [0, {n}] (x of shape {tuple(x.shape)}), got {num_prefix!r}"
        )


def autocast_off(device: torch.device):
    """``torch.autocast(device.type, enabled=False)``, or nothing on the meta device (shapes
    only), which has no autocast backend."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
