"""Fused device kernels behind tokenreduce's operators, and how the operators are defined.

Each operator (``tokenreduce::squeeze``, ``squeeze_tokens``, ``split_order``) has a reference
implementation that serves every device; a fused kernel for one device type is added from its
own module without touching the operator's::

    from tokenreduce.ops import register_device_kernels

    register_device_kernels("cuda", squeeze=my_squeeze, split_order=my_split_order)

The Triton kernels of ``ops/squeeze_triton.py`` and ``ops/select_triton.py`` are registered this
way for CUDA, at import by default (``TOKENREDUCE_TRITON=0`` opts out), and switched at run time
with ``enable_triton_kernels(False)`` / ``enable_triton_kernels(True)``.

With ``torch.library.triton_op`` (torch >= 2.6 with triton installed) the operators are triton
ops: ``torch.compile`` traces into them, so a kernel that launches through
``torch.library.wrap_triton`` is called from the compiled graph's own wrapper, and the
operator's Python is not on the compiled path. Without it they are opaque custom ops with fake
implementations.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

__all__ = [
    "OPERATORS",
    "define_op",
    "device_kernel",
    "enable_by_default",
    "enable_triton_kernels",
    "register_device_kernels",
    "triton_kernels_enabled",
]

logger = logging.getLogger(__name__)

OPERATORS = ("squeeze", "squeeze_tokens", "split_order")
_DEVICE_KERNELS: dict[str, dict[str, Callable]] = {}
_TRITON_DEVICE = "cuda"
# triton_op needs torch >= 2.6 (with wrap_triton) and triton itself.
TRITON_OP = (
    hasattr(torch.library, "triton_op")
    and hasattr(torch.library, "wrap_triton")
    and importlib.util.find_spec("triton") is not None
)


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
        raise ValueError(f"register_device_kernels: unknown operator(s) {unknown}; known: {list(OPERATORS)}")
    _DEVICE_KERNELS.setdefault(device_type, {}).update(kernels)


def _triton_kernels() -> dict[str, Callable]:
    """Operator name -> the Triton kernel that serves it on CUDA (imports triton)."""
    from . import select_triton, squeeze_triton

    return {**squeeze_triton.CUDA_KERNELS, **select_triton.CUDA_KERNELS}


def enable_triton_kernels(enabled: bool = True) -> None:
    """Serve ``tokenreduce::squeeze``, ``squeeze_tokens`` and ``split_order`` on CUDA with the
    fused Triton kernels (``True``), or with the references, as on every other device (``False``).

    Idempotent. ``False`` removes only the Triton kernels (a kernel registered by
    ``register_device_kernels`` stays). Graphs that ``torch.compile`` already traced keep the
    kernels they traced: switch before compiling (or call ``torch._dynamo.reset()``). Without
    CUDA the registry still changes, and no tensor reaches it. Raises ``TokenReduceError`` for
    ``True`` when triton is not installed.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enable_triton_kernels: `enabled` must be a bool, got {type(enabled).__name__}")
    if not enabled:
        registered = _DEVICE_KERNELS.get(_TRITON_DEVICE, {})
        if registered and importlib.util.find_spec("triton") is not None:
            for name, kernel in _triton_kernels().items():
                if registered.get(name) is kernel:
                    del registered[name]
        return
    if importlib.util.find_spec("triton") is None:
        from ..errors import TokenReduceError

        raise TokenReduceError(
            "enable_triton_kernels: triton is not installed; install it "
            "(`pip install triton`) or keep the reference kernels"
        )
    register_device_kernels(_TRITON_DEVICE, **_triton_kernels())
    logger.debug("tokenreduce: the Triton kernels serve %s on CUDA", ", ".join(OPERATORS))


def triton_kernels_enabled() -> bool:
    """True when the Triton kernels serve every operator on CUDA (see ``enable_triton_kernels``)."""
    registered = _DEVICE_KERNELS.get(_TRITON_DEVICE, {})
    if not registered or importlib.util.find_spec("triton") is None:
        return False
    return all(registered.get(name) is kernel for name, kernel in _triton_kernels().items())


def enable_by_default() -> None:
    """The import-time default: the Triton kernels where triton and a CUDA device both exist
    (a CPU-only process does not import triton)."""
    if importlib.util.find_spec("triton") is not None and torch.cuda.is_available():
        enable_triton_kernels(True)
    else:
        logger.debug("tokenreduce: no triton or no CUDA device; the reference kernels serve every device")


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
