"""Capture: ``torch.fx`` symbolic tracing plus shape propagation.

``capture(model, example)`` returns a ``GraphModule`` whose every tensor node carries
``node.meta["tensor_meta"]`` (shape, dtype) for ``example``. Modules and functions that tracing
must leave opaque are kept in a registry that users extend with :func:`register_leaf_module`
and :func:`register_leaf_function`; timm's own "no-trace" registries are honoured too.
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TokenReduceError

__all__ = ["capture", "register_leaf_module", "register_leaf_function", "Tracer"]

log = logging.getLogger(__name__)

_LEAF_MODULES: set[type[nn.Module]] = set()
_LEAF_FUNCTIONS: set[Callable] = set()

M = TypeVar("M", bound=type)
F = TypeVar("F", bound=Callable)


def register_leaf_module(cls: M) -> M:
    """Keep instances of ``cls`` opaque when tracing (usable as a class decorator).

    A leaf module appears as one ``call_module`` node. Use it for modules with data-dependent
    Python control flow. Reduction cannot be placed *inside* a leaf.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module: expected an nn.Module subclass, got {cls!r}")
    _LEAF_MODULES.add(cls)
    return cls


def register_leaf_function(fn: F) -> F:
    """Keep calls of the module-level function ``fn`` opaque when tracing (usable as a decorator)."""
    if not callable(fn) or not hasattr(fn, "__globals__"):
        raise TypeError(
            f"register_leaf_function: expected a plain module-level Python function, got {fn!r}"
        )
    _LEAF_FUNCTIONS.add(fn)
    return fn


def _timm_leaves() -> tuple[set[type], set[Callable]]:
    from timm.layers import DropPath, PatchDropout, resample_abs_pos_embed

    # These branch on `self.training` in Python: traced through, the branch taken at trace time
    # would be frozen into the graph, so they stay opaque.
    modules: set[type] = {DropPath, PatchDropout}
    # Branches on the runtime grid size (dynamic_img_size ViTs); timm wraps it only since ~1.0.9.
    functions: set[Callable] = {resample_abs_pos_embed}
    try:  # timm's own no-trace registries (timm.layers._fx; timm.models._features_fx before ~1.0.9)
        from timm.layers import _fx as timm_fx
    except ImportError:
        try:
            from timm.models import _features_fx as timm_fx
        except ImportError:  # pragma: no cover
            return modules, functions
    modules |= set(getattr(timm_fx, "_leaf_modules", set()))
    functions |= set(getattr(timm_fx, "_autowrap_functions", set()))
    return modules, functions


class Tracer(fx.Tracer):
    """``fx.Tracer`` that honours tokenreduce's and timm's leaf registries."""

    def __init__(self) -> None:
        timm_modules, timm_functions = _timm_leaves()
        self._leaf_types = tuple(_LEAF_MODULES | timm_modules)
        super().__init__(autowrap_functions=tuple(_LEAF_FUNCTIONS | timm_functions))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, as ``file:line in fn``, to point at the cause."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")
    ]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def _module_being_traced(tracer: Tracer, root: nn.Module) -> str:
    stack = getattr(tracer, "module_stack", None)
    if stack:
        path = next(reversed(stack))
        return path or type(root).__name__
    return type(root).__name__


def capture(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` into a flat ``GraphModule`` and annotate every node with its shape.

    Args:
        model: the module to trace; it is not modified.
        example: an input batch, e.g. ``(2, 3, 224, 224)``; shapes in the graph refer to it.

    Returns:
        A ``GraphModule`` sharing ``model``'s submodules, with ``node.meta["tensor_meta"]`` set.

    Raises:
        TokenReduceError: tracing failed; the message names the module and the source line and
            says how to register an opaque leaf.
    """
    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        where = _module_being_traced(tracer, model)
        cls = type(model.get_submodule(where)).__name__ if where in dict(model.named_modules()) else where
        raise TokenReduceError(
            f"capture: torch.fx could not trace module '{where}' ({cls}) at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {exc}. If this module has data-dependent control flow and "
            f"contains no attention to reduce, register it as opaque with "
            f"tokenreduce.register_leaf_module({cls}); for a free function use "
            f"tokenreduce.register_leaf_function(fn)."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001
        raise TokenReduceError(
            f"capture: the traced graph of {type(model).__name__} failed on an example input of "
            f"shape {tuple(example.shape)}: {type(exc).__name__}: {exc}. Pass `example_input=` "
            f"with a shape the model accepts."
        ) from exc
    finally:
        gm.train(was_training)
    log.debug("captured %s: %d nodes", type(model).__name__, len(graph.nodes))
    return gm
