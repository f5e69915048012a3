"""Thread-safe ``torch.fx`` symbolic tracing.

``torch.fx.Tracer.trace`` patches ``nn.Module.__call__`` and ``nn.Module.__getattr__`` on the
class for the whole process while it runs (``torch/fx/_symbolic_trace.py``, ``_Patcher``). Two
traces at once leave each other's wrappers installed (every later module call in the process
fails), and any other thread that calls a module during a trace is routed into the tracer and
fails with ``NameError: module is not installed as a submodule``.

:class:`ConfinedTracer` makes tracing safe to run in a serving process:

* one lock (:data:`TRACE_LOCK`) serialises every tokenreduce trace;
* torch's two ``nn.Module`` wrappers are installed already wrapped in dispatchers that run
  torch's wrapper only on the tracing thread and while that trace is active; every other thread
  goes straight to the original method. The dispatcher is what torch's patcher itself installs
  (during our traces ``torch.fx._symbolic_trace._Patcher`` is a subclass that wraps them), so no
  other thread ever sees torch's bare wrapper. torch's other patches (the wrapped free functions
  and ``Tensor.__getitem__``) already fall through when no ``Proxy`` is passed;
* afterwards both methods are checked, and restored if anything of this trace is left installed.

One case cannot be made safe from outside torch: a ``torch.fx`` trace that does *not* go through
tokenreduce (``torch.fx.symbolic_trace``, timm's feature extraction) running in another thread
at the same time. It patches ``nn.Module`` with torch's own, unconfined wrappers. A trace that
finds such a patch installed refuses to start, and one that finds it installed over its own
dispatchers fails; both raise :class:`~tokenreduce.TokenReduceError` saying so. Run such traces
holding :data:`TRACE_LOCK` (``from tokenreduce.capture import TRACE_LOCK``; ``with TRACE_LOCK:
torch.fx.symbolic_trace(m)``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from torch import fx, nn
from torch.fx import _symbolic_trace as _st

from .errors import TokenReduceError

__all__ = ["TRACE_LOCK", "ConfinedTracer", "foreign_patch"]

log = logging.getLogger(__name__)

TRACE_LOCK = threading.RLock()
"""Held for the whole of every tokenreduce trace; hold it around your own ``torch.fx`` traces."""

_PATCHED = ("__call__", "__getattr__")
_ORIGINAL = {"__call__": _st._orig_module_call, "__getattr__": _st._orig_module_getattr}
_DISPATCH_FLAG = "_tokenreduce_dispatch"


def _current() -> dict[str, Callable]:
    return {name: nn.Module.__dict__.get(name) for name in _PATCHED}


def _is_ours(fn: Any) -> bool:
    return getattr(fn, _DISPATCH_FLAG, None) is not None


def _is_inert(fn: Any) -> bool:
    """A dispatcher of a finished trace (a foreign trace's revert can put one back)."""
    confinement = getattr(fn, _DISPATCH_FLAG, None)
    return confinement is not None and not confinement.active


def foreign_patch() -> str | None:
    """Which ``nn.Module`` method a ``torch.fx`` trace outside tokenreduce has patched, if any."""
    for name, fn in _current().items():
        if fn is not _ORIGINAL[name] and not _is_ours(fn):
            return f"nn.Module.{name}"
    return None


class _Confinement:
    """The dispatchers of one trace: torch's wrapper on the owner thread while active."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.active = True
        self.installed: dict[str, Callable] = {}

    def dispatcher(self, name: str, traced: Callable, orig: Callable) -> Callable:
        confinement = self

        @functools.wraps(traced)
        def dispatch(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if confinement.active and threading.get_ident() == confinement.owner:
                return traced(mod, *args, **kwargs)
            return orig(mod, *args, **kwargs)

        setattr(dispatch, _DISPATCH_FLAG, self)
        self.installed[name] = dispatch
        return dispatch

    def confine(self) -> None:
        """Swap any bare torch ``nn.Module`` wrapper still installed for a dispatcher, in the
        patcher's own records so that its revert (and its temporary revert/reapply) stays
        consistent. A fallback: :class:`_ConfiningPatcher` normally installs dispatchers already."""
        patcher = _st.CURRENT_PATCHER
        if patcher is None:  # pragma: no cover - torch changed how tracing patches
            raise TokenReduceError(
                "capture: torch.fx no longer exposes its patcher (torch.fx._symbolic_trace.CURRENT_PATCHER); "
                "tokenreduce cannot confine tracing to one thread with this torch version. Please report it."
            )
        for i, p in enumerate(patcher.patches_made):
            if p.frame_dict is nn.Module and p.fn_name in _PATCHED and not _is_ours(p.new_fn):
                confined = type(p)(p.frame_dict, p.fn_name, p.orig_fn, self.dispatcher(p.fn_name, p.new_fn, p.orig_fn))
                patcher.patches_made[i] = confined
                confined.patch()

    def check_not_overridden(self) -> None:
        """Fail if another trace patched ``nn.Module`` over this trace's dispatchers."""
        for name, fn in _current().items():
            if name in self.installed and fn is not self.installed[name]:
                raise TokenReduceError(
                    f"capture: a torch.fx trace outside tokenreduce patched nn.Module.{name} in another thread "
                    f"while this model was being traced, so this trace is unreliable. Run other torch.fx "
                    f"traces holding `from tokenreduce.capture import TRACE_LOCK`, or apply/inspect when none runs."
                )


_local = threading.local()  # .confinement: the active trace's, on its own thread


class _ConfiningPatcher(_st._Patcher):
    """torch's patcher, installing the tracing thread's ``nn.Module`` wrappers inside dispatchers
    (one ``setattr``, so no other thread can run in between). Unchanged for any other thread."""

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        confinement = getattr(_local, "confinement", None)
        if confinement is not None and confinement.active and cls is nn.Module and name in _PATCHED:
            new_fn = confinement.dispatcher(name, new_fn, getattr(cls, name))
        super().patch_method(cls, name, new_fn, deduplicate)


class ConfinedTracer(fx.Tracer):
    """An ``fx.Tracer`` whose patching of ``nn.Module`` is serialised and confined to its thread."""

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        confinement = self._confinement

        # Called by Tracer.trace right after it patched nn.Module, before the model runs.
        @functools.wraps(fn)
        def confined_root(*a: Any) -> Any:
            confinement.confine()
            out = fn(*a)
            confinement.check_not_overridden()
            return out

        return confined_root, args

    def trace(self, root, concrete_args=None):
        with TRACE_LOCK:
            before = _current()
            for name, fn in before.items():  # an outer trace's (same thread) stays; a finished one goes
                if _is_inert(fn):
                    setattr(nn.Module, name, _ORIGINAL[name])
                    before[name] = _ORIGINAL[name]
            foreign = foreign_patch()
            if foreign is not None:
                raise TokenReduceError(
                    f"capture: {foreign} is patched, most likely by a torch.fx trace running outside "
                    f"tokenreduce in another thread; tracing now would break both. Retry when it is done, or run "
                    f"your own torch.fx traces holding `from tokenreduce.capture import TRACE_LOCK`."
                )
            self._confinement = _Confinement()
            outer = getattr(_local, "confinement", None)
            torch_patcher, _st._Patcher = _st._Patcher, _ConfiningPatcher
            _local.confinement = self._confinement
            try:
                return super().trace(root, concrete_args)
            finally:
                self._confinement.active = False
                _local.confinement = outer
                _st._Patcher = torch_patcher
                _restore(before, self._confinement)


def _restore(before: dict[str, Callable], confinement: _Confinement) -> None:
    """Put back ``nn.Module``'s methods if anything installed by this trace is still there."""
    for name, fn in _current().items():
        if fn is before[name]:
            continue
        if _is_ours(fn) or fn is getattr(confinement, "installed", {}).get(name):
            log.error("capture: nn.Module.%s was left patched after a trace; restored", name)
            setattr(nn.Module, name, before[name])
        else:
            log.warning("capture: nn.Module.%s changed during a trace by code outside tokenreduce", name)
