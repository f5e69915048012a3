"""Symbolic tracing beside concrete values: Python control flow is decided by the example.

``torch.fx`` refuses Python control flow on traced values: ``if x.dtype != w.dtype``, ``if
n != self.num_channels`` or ``(*x.shape[:-1], -1, d)`` raise ``TraceError``. Hugging Face
models are full of such checks. :class:`ValueTracer` runs the example batch alongside the
trace, so every proxy also holds the value it has for that batch:

* ``bool(proxy)``, ``len(proxy)``, ``int(proxy)`` and iteration read that value, so a branch
  takes the way it takes for an input of the example's shape and dtype (the graph is
  specialised to it, as :func:`torch.compile` specialises on its guards);
* everything else stays symbolic: ``x.shape[0]`` is a graph node, so a batch size read as a
  shape and passed on (``x.view(b, n, -1)``) stays dynamic.

The example values are computed under ``torch.no_grad()`` with the modules' ordinary calls,
outside the trace (the tracing thread's ``nn.Module`` wrappers are paused meanwhile).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate

from .capture import Tracer
from .errors import TokenReduceError

__all__ = ["ValueTracer"]

log = logging.getLogger(__name__)


class ValueProxy(fx.Proxy):
    """A proxy whose Python protocol (``len``, ``int``, indexing by it) reads its example value."""

    def __len__(self) -> int:
        return len(self.tracer.value_of(self))

    def __int__(self) -> int:
        return self.tracer.concrete(self, int)

    def __index__(self) -> int:
        return self.tracer.concrete(self, int)

    def __float__(self) -> float:
        return self.tracer.concrete(self, float)

    def __getattr__(self, name: str) -> ValueAttribute:
        return ValueAttribute(self, name)

    def __setitem__(self, index: Any, value: Any) -> None:  # x[i] = v: an in-place node, as in eager
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class ValueAttribute(fx.proxy.Attribute, ValueProxy):
    """``proxy.attr``: a graph node (or a method call) only once it is used."""


class ValueTracer(Tracer):
    """:class:`tokenreduce.capture.Tracer` whose proxies carry the value they take for ``example``.

    Args:
        example: the image batch (B, C, H, W) the root's one input receives.
        leaf_types: module classes kept opaque in addition to the registered leaves.
        through: registered leaf classes traced through after all (their Python control flow is
            decided by the example).
    """

    def __init__(
        self, example: torch.Tensor, leaf_types: tuple[type, ...] = (), through: tuple[type, ...] = ()
    ) -> None:
        super().__init__()
        self._leaf_types = tuple(t for t in self._leaf_types if t not in through) + tuple(leaf_types)
        self._example = example
        self._values: dict[fx.Node, Any] = {}
        self.specialised: list[str] = []  # nodes whose value decided Python control flow

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    def value_of(self, proxy: fx.Proxy) -> Any:
        node = proxy.node
        if node not in self._values:
            raise TokenReduceError(f"capture: no example value for node '{node.name}' ({node.op} {node.target})")
        return self._values[node]

    def concrete(self, proxy: fx.Proxy, kind: type) -> Any:
        value = self.value_of(proxy)
        self.specialised.append(proxy.node.name)
        return kind(value)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concrete(obj, bool)

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter([obj[i] for i in range(len(self.value_of(obj)))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.value_of(obj).keys()

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            self._values[proxy.node] = self._example
        elif kind != "output":
            self._values[proxy.node] = self._run(kind, target, args, kwargs)
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """Execute one node on the example values, with module calls untraced."""
        args, kwargs = map_aggregate((args, kwargs), lambda a: self.value_of(a) if isinstance(a, fx.Proxy) else a)
        confinement = self._confinement
        confinement.active = False  # this thread's module calls run the modules, not the tracer
        try:
            with torch.no_grad():
                if kind == "get_attr":
                    value = self.root
                    for part in str(target).split("."):
                        value = getattr(value, part)
                    return value
                if kind == "call_module":
                    return self.root.get_submodule(str(target))(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return target(*args, **kwargs)
        finally:
            confinement.active = True
