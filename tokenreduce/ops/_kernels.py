"""Fused device kernels behind tokenreduce's operators, and how the operators are defined.

Each operator (``tokenreduce::squeeze``, ``squeeze_tokens``, ``split_order``) has a reference
implementation that serves every device; a fused kernel for one device type is added from its
own module without touching the operator's::

    from tokenreduce.ops import register_device_kernels

    register_device_kernels("cuda", squeeze=my_squeeze, split_order=my_split_order)

With ``torch.library.triton_op`` (torch >= 2.6 with triton installed) the operators are triton
ops: ``torch.compile`` traces into them, so a kernel that launches through
``torch.library.wrap_triton`` is called from the compiled graph's own wrapper, and the
operator's Python is not on the compiled path. Without it they are opaque custom ops with fake
implementations.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

__all__ = ["OPERATORS", "define_op", "device_kernel", "register_device_kernels"]

OPERATORS = ("squeeze", "squeeze_tokens", "split_order")
_DEVICE_KERNELS: dict[str, dict[str, Callable]] = {}
# triton_op needs torch >= 2.6 (with wrap_triton) and triton itself.
TRITON_OP = (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
             and importlib.util.find_spec("triton") is not None)


def register_device_kernels(device_type: str, **kernels: Callable) -> None:
    """Serve the named operators on ``device_type`` with these functions (keywords from
    ``OPERATORS``); operators not named keep their current kernel.

    A kernel takes its operator's arguments, returns new tensors (never an input) and handles
    every dtype (falling back to the reference where it has no kernel). Under ``torch.compile``
    it is traced with fake tensors, so it may call only torch operators and Triton kernels
    launched through ``torch.library.wrap_triton``.
    """
    unknown = sorted(set(kernels) - set(OPERATORS))
    if unknown:
        raise ValueError(f"register_device_kernels: unknown operator(s) {unknown}; "
                         f"known: {list(OPERATORS)}")
    _DEVICE_KERNELS.setdefault(device_type, {}).update(kernels)


def device_kernel(device_type: str, name: str) -> Callable | None:
    """The kernel registered for operator ``name`` on ``device_type``, or None."""
    return _DEVICE_KERNELS.get(device_type, {}).get(name)


def define_op(name: str, fn: Callable, fake: Callable):
    """``name`` ("tokenreduce::...") as a triton op when available, else a custom op whose fake
    implementation is ``fake``. ``fn`` dispatches to ``device_kernel`` or the reference."""
    if TRITON_OP:  # compile traces into fn; fn serves as its own fake implementation
        return torch.library.triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op
