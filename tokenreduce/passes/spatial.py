"""Pass: serve spatial operators (SR conv, conv projection, depthwise-conv MLP, next stage's
patch embedding) after a reduction: the pad/mask rule of the method (docs/method.md)."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import ModelMap
from ..anchors import find_all
from ..runtime.grid import from_grid_tokens, to_grid_tokens
from .infra import graph_pass, require, site_states, state_before, tag

__all__ = ["pad_spatial"]


@graph_pass
def pad_spatial(gm: fx.GraphModule, model_map: ModelMap) -> fx.GraphModule:
    """Wrap every grid entry after a reduction site in ``to_grid_tokens`` and every grid return
    at the same resolution in ``from_grid_tokens``; mutates and returns ``gm``.

    Expects: :func:`insert_sites` ran. Guarantees: every spatial operator downstream of a site
    sees the full H x W grid (zeros, or masked tokens in training); tokens returning from the grid
    are gathered back to the kept positions; grids before the first site of their stage are
    untouched.

    Generated code (PVT spatial-reduction attention after a dTPS site)::

        to_grid_tokens = tokenreduce.runtime.grid.to_grid_tokens(layer_norm_5, getitem_40)
        transpose_14 = to_grid_tokens.transpose(1, 2)                  # was layer_norm_5
        reshape_12 = transpose_14.reshape(getitem_41, 128, 28, 28)
        stages_1_blocks_0_attn_sr = self.stages[1].blocks[0].attn.sr(reshape_12)
    """
    require(gm, "pad_spatial", "insert_sites")
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    states = site_states(graph)
    heads, returns = find_all(graph, "to_grid"), find_all(graph, "from_grid")
    padded: dict[int, fx.Node] = {}
    for i, grid in enumerate(model_map.to_grid):
        head = heads[i]
        src = head.args[0]  # the current input: insert_sites may have rewired it
        state = state_before(states, order, model_map.stream_stages(grid.stage), src)
        if state is None:
            continue
        with graph.inserting_before(head):
            new = graph.call_function(to_grid_tokens, (src, state))
        head.replace_input_with(src, new)
        tag(new, role="to_grid", stage=grid.stage)
        padded[i] = state
    for j, ret in enumerate(model_map.from_grid):
        state = padded.get(ret.source)
        if state is None:
            continue
        node = returns[j]
        with graph.inserting_after(node):
            new = graph.call_function(from_grid_tokens, (node, state))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        tag(new, role="from_grid", stage=ret.stage)
    return gm
