"""Pass: position-indexed tensors (rotary tables, relative position bias, positional attention)
follow the tokens after a reduction site."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import ModelMap
from ..analysis.graph import node_path
from ..anchors import find
from ..runtime.positions import follow_positions
from .infra import graph_pass, require, site_states, state_before, tag, tags

__all__ = ["gather_positions"]


def _table_of(node: fx.Node, where: int | str) -> fx.Node:
    return node.kwargs[where] if isinstance(where, str) else node.args[where]


def _shape_reads(table: fx.Node, block_path: str) -> list[fx.Node]:
    """Reads of ``table``'s shape inside the block at ``block_path`` (DINOv3 sizes its split of
    q into prefix and patches by its rotary table: ``q.split((n - sin.shape[-2], sin.shape[-2]))``)."""
    out = []
    for user in table.users:
        shape = (user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",)) or (
            user.op == "call_method" and user.target == "size"
        )
        path = node_path(user)
        if shape and (path == block_path or path.startswith(block_path + ".")):
            out.append(user)
    return out


def _replace(node: fx.Node, where: int | str, new: fx.Node) -> None:
    if isinstance(where, str):
        node.update_kwarg(where, new)
    else:
        node.update_arg(where, new)


@graph_pass
def gather_positions(gm: fx.GraphModule, model_map: ModelMap) -> fx.GraphModule:
    """Index every position-indexed tensor that meets attention after a site by ``state.pos``.

    Expects: :func:`insert_sites` ran (site states tagged ``state_of``/``stage``). Guarantees:
    each table read after the first site of its token stream (its stage and the stages it carries
    on from) is replaced by ``follow_positions(table, state, ...)`` with the last state of that
    stream before the reading node; reads before any site are untouched. Reads of that table's
    shape inside the same block (``sin.shape`` sizing a split of q, as in DINOv3) read the
    gathered table too, which is then inserted before the first of them. A bias comes out
    (B, H, k, k) with aligned rows (see ``follow_positions``). A token a reducer appends (EViT)
    takes the mean row/column of a bias and no rotation from a rotary table (``fill``: cos 1,
    sin 0). Mutates ``gm``.
    """
    require(gm, "gather_positions", "insert_sites")
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    states = site_states(graph)
    sites = list(gm.reduce_sites)
    done: dict[tuple, fx.Node] = {}
    for i, use in enumerate(model_map.positions):
        node = find(graph, "position", i, user="pass gather_positions")
        block = model_map.block(use.block)
        state = state_before(states, order, model_map.stream_stages(block.stage), node)
        if state is None:
            continue
        site = sites[tags(state)["state_of"]]
        appended = bool(site.reducer.extra_tokens)
        table = _table_of(node, use.where)
        readers = _shape_reads(table, block.path)
        first = min([node, *readers], key=order.__getitem__)
        key = (table, state, use.axes, use.rank, use.with_prefix, use.fill)
        new = done.get(key)
        if new is None or order.get(new, -1) > order[first]:
            with graph.inserting_before(first):
                new = graph.call_function(
                    follow_positions,
                    (table, state, use.axes, use.rank, block.num_prefix, use.with_prefix, appended, use.fill),
                )
            tag(new, role="position", block=block.index)
            done[key] = new
            order[new] = order[first] - 0.5
        _replace(node, use.where, new)
        for reader in readers:  # the block sizes its tokens by the table: it reads the gathered one
            reader.replace_input_with(table, new)
    return gm
