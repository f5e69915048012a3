"""Capture: ``torch.fx`` symbolic tracing plus shape propagation.

``capture(model, example)`` returns a ``GraphModule`` whose every tensor node carries
``node.meta["tensor_meta"]`` (shape, dtype) for ``example``. Modules and functions that tracing
must leave opaque are kept in a registry that users extend with :func:`register_leaf_module`
and :func:`register_leaf_function`; timm's own "no-trace" registries are honoured too.

Tracing is safe to call from a serving process (see :mod:`tokenreduce._tracing_lock`). The graph
has exactly one placeholder, the image batch: forward arguments after it that have a default
(timm's ``attn_mask=None``, ``is_causal=False``) are bound to that default. Hooks on modules
that tracing flattens away are refused (:mod:`tokenreduce._hooks` says why).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.utils._pytree import tree_leaves

from . import _hooks, _signature, hf
from ._tracing_lock import TRACE_LOCK, ConfinedTracer, foreign_patch
from .errors import TokenReduceError

__all__ = ["TRACE_LOCK", "Tracer", "capture", "hooked_modules", "register_leaf_function", "register_leaf_module"]

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
        raise TypeError(f"register_leaf_function: expected a plain module-level Python function, got {fn!r}")
    _LEAF_FUNCTIONS.add(fn)
    return fn


def _timm_registry() -> tuple[set[type], set[Callable]]:
    """timm's own no-trace registries (``timm.layers._fx``; ``timm.models._features_fx`` before
    ~1.0.9): modules and functions timm marks as not symbolically traceable."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        try:
            from timm.models import _features_fx as timm_fx
        except ImportError:  # pragma: no cover
            return set(), set()
    return set(getattr(timm_fx, "_leaf_modules", set())), set(getattr(timm_fx, "_autowrap_functions", set()))


def _timm_leaves() -> tuple[set[type], set[Callable]]:
    from timm.layers import DropPath, PatchDropout, resample_abs_pos_embed

    # These branch on `self.training` in Python: traced through, the branch taken at trace time
    # would be frozen into the graph, so they stay opaque.
    modules: set[type] = {DropPath, PatchDropout}
    # Branches on the runtime grid size (dynamic_img_size ViTs); timm wraps it only since ~1.0.9.
    functions: set[Callable] = {resample_abs_pos_embed}
    registry_modules, registry_functions = _timm_registry()
    return modules | registry_modules, functions | registry_functions


_QKV_NAMES = {"qkv", "qk", "q", "kv", "to_qkv", "query"}


def holds_attention(module: nn.Module) -> bool:
    """Whether ``module`` looks like an attention module: a composite named like attention or
    holding q/k/v projections."""
    children = dict(module.named_children())
    return bool(children) and ("att" in type(module).__name__.lower() or bool(_QKV_NAMES & children.keys()))


def _attention_leaves(model: nn.Module) -> tuple[type, ...]:
    """Classes of timm's no-trace registry in ``model`` that hold attention (ConViT's GPSA, which
    branches on the token count; Twins' LocallyGroupedAttn, on the grid size): a plain trace
    keeps them opaque, so their blocks could not be reduced. Not user-registered leaves."""
    registry, _ = _timm_registry()
    candidates = registry - _LEAF_MODULES
    classes = {type(m) for m in model.modules() if type(m) in candidates and holds_attention(m)}
    return tuple(sorted(classes, key=lambda c: c.__name__))


class Tracer(ConfinedTracer):
    """``fx.Tracer`` that honours tokenreduce's and timm's leaf registries; its traces are
    serialised and leave other threads' module calls alone (:class:`ConfinedTracer`)."""

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
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
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


def hooked_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` that tracing flattens away and that carry hooks, as
    ``"path (Class): kinds"``; see :func:`tokenreduce._hooks.hooked_modules`."""
    return _hooks.hooked_modules(model, Tracer())


def _same(a: Any, b: Any) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(la, lb)
    )


def _scope(node: fx.Node, classes: tuple[type, ...]) -> tuple[str, type] | None:
    """The innermost module of one of ``classes`` that ``node`` was traced in, as (path, class)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(((p, c) for p, c in reversed(list(stack.values())) if c in classes), None)


def _partial_attention(gm: fx.GraphModule, through: tuple[type, ...]) -> list[str]:
    """Names of the classes in ``through`` whose traced attention is not over their whole input
    sequence: a softmax or sdpa whose (queries, keys) are not (N, N) for the module's (B, N, C)
    input (Twins' windows), or none at all (linear attention)."""
    inputs: dict[str, int] = {}
    softmaxes: list[tuple[str, type, tuple[int, ...]]] = []
    members: dict[tuple[str, type], list[fx.Node]] = {}
    for node in gm.graph.nodes:  # in graph order: a module's input is the first one its nodes read
        scope = _scope(node, through)
        if scope is not None:
            members.setdefault(scope, []).append(node)
    for (path, cls), nodes in members.items():
        inside = set(nodes)
        for node in nodes:
            for a in node.all_input_nodes:
                meta = a.meta.get("tensor_meta")
                if a not in inside and hasattr(meta, "shape") and len(meta.shape) == 3 and path not in inputs:
                    inputs[path] = meta.shape[1]
            meta = node.meta.get("tensor_meta")
            name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
            if name == "softmax" and hasattr(meta, "shape"):  # (..., queries, keys)
                softmaxes.append((path, cls, tuple(meta.shape)))
            elif name == "scaled_dot_product_attention" and len(node.args) > 1:
                q, k = (a.meta.get("tensor_meta") for a in node.args[:2])
                if hasattr(q, "shape") and hasattr(k, "shape"):
                    softmaxes.append((path, cls, (q.shape[-2], k.shape[-2])))
    bad = {c.__name__ for path, c, shape in softmaxes if shape[-2:] != (inputs.get(path),) * 2}
    bad |= {c.__name__ for c in through} - {c.__name__ for _, c, _ in softmaxes}  # no softmax attention at all
    return sorted(bad)


def _capture_through(model: nn.Module, example: torch.Tensor, through: tuple[type, ...]) -> fx.GraphModule | None:
    """``model`` traced with :class:`~tokenreduce._value_tracer.ValueTracer`, the attention
    leaves ``through`` traced through (their Python checks decided by the example, buffers read
    as graph nodes), or None when that trace fails or its graph does not give the model's own
    output on ``example`` bit for bit (the caller then keeps them opaque). Runs ``model`` once on
    ``example`` in eval mode (its forward hooks fire), then restores every module's mode."""
    from ._value_tracer import ValueTracer

    names = ", ".join(c.__name__ for c in through)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():  # the model's own call also builds buffers made on first use (GPSA's rel_indices)
            expected = model(example)
        tracer = ValueTracer(example, through=through)
        tracer.proxy_buffer_attributes = True
        _hooks.check_hooks(model, tracer)
        concrete = _signature.bound_defaults(model)
        graph = tracer.trace(model, concrete_args=concrete or None)
        _signature.drop_bound_placeholders(graph)
        gm = fx.GraphModule(model, graph, type(model).__name__)
        gm.eval()
        with torch.no_grad():
            got = _ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001 - the plain trace (with these modules opaque) is the fallback
        log.debug("capture: tracing through %s failed (%s: %s); they stay opaque", names, type(exc).__name__, exc)
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    if not _same(got, expected):
        log.debug("capture: tracing through %s changed the output; they stay opaque", names)
        return None
    partial = _partial_attention(gm, through)
    if partial:  # windows, linear attention: nothing to reduce inside; opaque, the probe names them better
        log.debug("capture: %s attend within parts of their input; they stay opaque", ", ".join(partial))
        rest = tuple(c for c in through if c.__name__ not in partial)
        return _capture_through(model, example, rest) if rest else None
    gm.train(modes[model])
    log.debug("captured %s with %s traced through: %d nodes", type(model).__name__, names, len(graph.nodes))
    return gm


class _ShapeProp(ShapeProp):
    """torch's shape propagation, but quiet and naming the node it was running when it failed.

    ``ShapeProp.run_node`` prints the traceback to stderr and re-raises a generic error; here the
    node's own error propagates (its message unchanged) and :attr:`node` says where.
    """

    node: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # keep the failing op's message as it is

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        result = fx.Interpreter.run_node(self, n)
        meta = map_aggregate(result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v)
        if any(isinstance(v, torch.Tensor) for v in tree_leaves(result)):
            n.meta["tensor_meta"] = meta
        return result


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:  # ShapeProp wraps the real error
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _node_where(gm: fx.GraphModule, node: fx.Node | None) -> str:
    if node is None:
        return ""
    if node.op == "call_module":
        path, cls = str(node.target), type(gm.get_submodule(str(node.target))).__name__
    else:  # traced-through modules are not kept in the flat graph module: read the recorded stack
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return f" at node '{node.name}'"
        path, cls = next(reversed(stack.values()))
        cls = getattr(cls, "__name__", str(cls))
    return f" at node '{node.name}' in module '{path}' ({cls})"


def _example_hint(model: nn.Module, example: torch.Tensor) -> str:
    """What is most likely wrong with ``example``, judged against the model's parameters."""
    param = next(model.parameters(), None)
    if param is not None and example.device != param.device:
        return (
            f"example_input is on {example.device} but the model's parameters are on {param.device}: "
            f"pass example_input.to('{param.device}')"
        )
    if param is not None and param.is_floating_point() and example.dtype != param.dtype:
        return (
            f"example_input is {example.dtype} but the model's parameters are {param.dtype}: pass "
            f"example_input.to({param.dtype}) (or convert the model)"
        )
    if example.dim() != 4:
        return (
            f"example_input has {example.dim()} dimension(s); vision models take an image batch "
            f"(B, C, H, W), e.g. torch.randn(2, 3, 224, 224)"
        )
    return "pass example_input= with a shape, dtype and device the model accepts"


def capture(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Trace ``model`` into a flat ``GraphModule`` and annotate every node with its shape.

    Args:
        model: the module to trace; it is not modified, except that a ``transformers`` model is
            switched to tokenreduce's attention implementation (:mod:`tokenreduce.hf`), and that a
            model holding attention timm keeps opaque is run once on ``example`` in eval mode
            (buffers built on first use, as GPSA's, are built): pass a copy.
        example: an input batch, e.g. ``(2, 3, 224, 224)``; shapes in the graph refer to it.

    Returns:
        A ``GraphModule`` sharing ``model``'s submodules, with ``node.meta["tensor_meta"]`` set
        and exactly one placeholder (the image batch).

    Raises:
        TokenReduceError: tracing failed (the message names the module and the source line and
            says how to register an opaque leaf); hooks sit on modules tracing flattens away;
            forward needs more than one input; the example batch does not run through the graph
            (the message gives the node, the underlying error and the likely fix).
    """
    if not hf.is_hf_model(model):
        through = _attention_leaves(model)
        if through:  # attention timm keeps opaque: traced through by value where that reproduces the model
            gm = _capture_through(model, example, through)
            if gm is not None:
                return gm
    root, tracer = model, Tracer()
    if hf.is_hf_model(model):  # traced through a one-input root, beside the example's values
        from ._value_tracer import ValueTracer

        hf.prepare(model)
        root, tracer = hf.ImageRoot(model), ValueTracer(example, hf.leaf_types(model))
    _hooks.check_hooks(model, tracer)
    concrete = _signature.bound_defaults(root)
    try:
        graph = tracer.trace(root, concrete_args=concrete or None)
    except TokenReduceError:
        raise
    except Exception as exc:
        where = _module_being_traced(tracer, root)
        cls = type(root.get_submodule(where)).__name__ if where in dict(root.named_modules()) else where
        foreign = foreign_patch()
        note = (
            (
                f" ({foreign} is patched by a torch.fx trace outside tokenreduce in another thread; hold "
                f"`from tokenreduce.capture import TRACE_LOCK` around it)"
            )
            if foreign
            else ""
        )
        raise TokenReduceError(
            f"capture: torch.fx could not trace module '{where}' ({cls}) at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {exc}{note}. If this module has data-dependent control flow and "
            f"contains no attention to reduce, register it as opaque with "
            f"tokenreduce.register_leaf_module({cls}); for a free function use "
            f"tokenreduce.register_leaf_function(fn)."
        ) from exc
    _signature.drop_bound_placeholders(graph)
    owner = model if root is model else hf.rebase(root, graph)
    gm = fx.GraphModule(owner, graph, type(model).__name__)
    was_training = model.training
    gm.eval()
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.propagate(example)
    except Exception as exc:  # noqa: BLE001
        cause = _root_cause(exc)
        raise TokenReduceError(
            f"capture: {type(model).__name__} failed on example_input of shape {tuple(example.shape)} "
            f"({example.dtype}, {example.device}){_node_where(gm, prop.node)}: {type(cause).__name__}: "
            f"{str(cause).rstrip('.')}. {_example_hint(model, example)}."
        ) from cause
    finally:
        gm.train(was_training)
    log.debug("captured %s: %d nodes", type(model).__name__, len(graph.nodes))
    return gm
