"""A graph as plain records, so a reduced model pickles with its node marks and names intact.

torch.fx's own pickling regenerates the graph by tracing the generated code again, which drops
``node.meta`` (where the analysis marks live) and renames nodes; this keeps both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["graph_records", "graph_from_records"]

_KEPT_META = ("tokenreduce", "tensor_meta", "nn_module_stack")


class _Ref(NamedTuple):
    """A reference to an earlier node, by name."""

    name: str


def _plain_meta(meta):
    """Tensor metadata without ``memory_format`` (torch.save cannot pickle it), nested as given."""
    if isinstance(meta, TensorMetadata):
        return meta._replace(memory_format=None)
    if isinstance(meta, (tuple, list)):
        return type(meta)(_plain_meta(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _plain_meta(m) for k, m in meta.items()}
    return meta


def graph_records(graph: fx.Graph) -> list[dict]:
    """Every node as ``{name, op, target, args, kwargs, meta}`` with node arguments as names."""
    records = []
    for node in graph.nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(n.name))
        meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        if "tensor_meta" in meta:
            meta["tensor_meta"] = _plain_meta(meta["tensor_meta"])
        if "nn_module_stack" in meta:  # module classes as names: torch.save cannot pickle them
            meta["nn_module_stack"] = {
                k: (v[0], getattr(v[1], "__qualname__", str(v[1]))) for k, v in meta["nn_module_stack"].items()
            }
        records.append(
            {"name": node.name, "op": node.op, "target": node.target, "args": args, "kwargs": kwargs, "meta": meta}
        )
    return records


def _resolve(value, env: dict[str, fx.Node]):
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, tuple):  # plain tuples, torch.Size and named tuples keep their type
        items = [_resolve(v, env) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


def graph_from_records(records: list[dict]) -> fx.Graph:
    """The inverse of :func:`graph_records`: same nodes, names, targets and kept meta."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for r in records:
        node = graph.create_node(
            r["op"], r["target"], _resolve(r["args"], env), _resolve(r["kwargs"], env), name=r["name"]
        )
        node.meta.update(r["meta"])
        env[r["name"]] = node
    return graph
