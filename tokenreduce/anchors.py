"""Anchors: analysis marks the nodes a rewrite starts from, and each pass finds them by mark in
the graph as it is then, so nothing outside the graph holds an ``fx.Node``.

A mark is ``(role, index)`` in ``node.meta["tokenreduce"]["anchors"]``; one node may carry
several (block i's exit is block i + 1's entry). Roles: ``entry``, ``attn`` (the
``scaled_dot_product_attention`` call or the softmax), ``q``, ``k``, ``v``, ``attn_residual``,
``exit`` (index: block), ``to_grid`` (the first layout op laying tokens on a grid), ``from_grid``
(tokens back from it; index: grid), ``tokens`` (the final tokens, index 0). A pass that replaces
a marked node hands its marks on with :func:`move`.
"""

from __future__ import annotations

import torch.fx as fx

from .errors import TokenReduceError

__all__ = ["META_KEY", "mark", "marks", "find", "find_all", "move"]

META_KEY = "tokenreduce"


def mark(node: fx.Node, role: str, index: int) -> None:
    node.meta.setdefault(META_KEY, {}).setdefault("anchors", set()).add((role, index))


def marks(node: fx.Node) -> set[tuple[str, int]]:
    return node.meta.get(META_KEY, {}).get("anchors", set())


def find_all(graph: fx.Graph, role: str) -> dict[int, fx.Node]:
    """Every node marked ``role``, by index."""
    return {i: n for n in graph.nodes for r, i in marks(n) if r == role}


def find(graph: fx.Graph, role: str, index: int, *, user: str = "pass") -> fx.Node:
    """The node marked ``(role, index)``; a TokenReduceError naming ``user`` if there is none."""
    for node in graph.nodes:
        if (role, index) in marks(node):
            return node
    raise TokenReduceError(
        f"{user}: no node marked ({role!r}, {index}) in the graph; it was not produced by "
        f"tokenreduce's analysis, or a pass removed the node without handing its mark on"
    )


def move(old: fx.Node, new: fx.Node) -> None:
    """Hand ``old``'s marks to ``new`` (``old`` is about to be replaced)."""
    for role, index in marks(old):
        mark(new, role, index)
    old.meta.get(META_KEY, {}).pop("anchors", None)
