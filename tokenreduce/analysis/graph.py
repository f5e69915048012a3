"""Graph helpers: tensor shapes from shape propagation and the data-dependency DiGraph.

Only *tensor data* edges are kept in the DiGraph: ``expand(cls_token, x.shape[0], -1, -1)``
depends on ``x`` through an int, which does not make the class token image-dependent.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["shape_of", "is_tensor", "carries_data", "data_graph", "data_args", "is_add", "is_cat", "node_path"]


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The tensor shape recorded for ``node`` by shape propagation, or None for non-tensors."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    return None


def is_tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and shape_of(node) is not None


def _holds_tensor(meta: object) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_tensor(m) for m in meta.values())
    return False


def carries_data(node: object) -> bool:
    """A tensor, or a container of tensors (``unbind``'s tuple); not a shape or a Python scalar."""
    return isinstance(node, fx.Node) and _holds_tensor(node.meta.get("tensor_meta"))


def data_args(node: fx.Node) -> list[fx.Node]:
    """The data-carrying nodes among ``node``'s inputs (args and kwargs, nested), in order."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if carries_data(a) else None)
    return out


def data_graph(graph: fx.Graph) -> nx.DiGraph:
    """A DiGraph of the tensor data flow: an edge u -> v when tensor u is an input of v."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for a in data_args(node):
            g.add_edge(a, node)
    return g


def is_add(node: fx.Node) -> bool:
    """``a + b`` in any of its traced spellings, with two tensor operands."""
    if node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd):
        pass
    elif node.op == "call_method" and node.target in ("add", "add_", "__add__"):
        pass
    else:
        return False
    return len([a for a in node.args[:2] if is_tensor(a)]) == 2


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate)


def node_path(node: fx.Node) -> str:
    """The module path a node was traced in (from ``nn_module_stack``), or '' at the top level."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack))
    if node.op == "call_module":
        return str(node.target)
    return ""
