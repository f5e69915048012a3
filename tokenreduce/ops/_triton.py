"""What every Triton kernel module of ``tokenreduce.ops`` needs to launch its kernels.

Triton is optional: ``HAVE_TRITON`` says whether it imported, and nothing here fails without it.
Kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the unit tests check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["HAVE_TRITON", "KEY_INDEX_MAX", "KEY_LOWEST", "check_runnable", "device_guard", "interpreting", "launcher"]

# Order keys (``_triton_keys.py``): a float32 value's order bits above, ``KEY_INDEX_MAX - index``
# below, so that a larger key is a larger value or, between equal values, a lower index.
KEY_INDEX_MAX = 2**31 - 1
KEY_LOWEST = -(2**63)  # below every packed key: padding and "no candidate yet"

try:  # pragma: no cover - exercised by whichever install runs the tests
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False
# torch >= 2.6: kernels launched through it are visible to torch.compile (see launcher).
_WRAP_TRITON = getattr(torch.library, "wrap_triton", None) if HAVE_TRITON else None


def interpreting() -> bool:
    """True under Triton's interpreter (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_runnable(t: torch.Tensor, op: str, reference: str) -> None:
    """Raise, naming ``op`` and the ``reference`` to use instead, unless ``t``'s kernels can run:
    triton installed and ``t`` on CUDA (or the interpreter on)."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use {reference}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: tensors must be on a CUDA device, got {t.device} "
            "(CPU tensors run only under the Triton interpreter, TRITON_INTERPRET=1)"
        )


def launcher(kernel, traceable: bool):
    """(what to launch, launch options).  ``traceable`` (the operators' path): the kernel through
    ``torch.library.wrap_triton``, which returns the kernel itself on real tensors and a traceable
    wrapper while torch traces the operator (Inductor then launches it from the compiled graph);
    Triton's own compile options are passed only to a direct launch."""
    if traceable and _WRAP_TRITON is not None:
        wrapped = _WRAP_TRITON(kernel)
        if wrapped is not kernel:
            return wrapped, {}
    return kernel, {"enable_fp_fusion": True}  # explicit: triton 3.9 warns when unset


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: a context that makes it ``device``'s."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
