"""Pass: serve spatial operators (SR conv, conv projection, depthwise-conv MLP, next stage's
patch embedding) after a reduction, as tps-reference.md Sec. 4 states."""

from __future__ import annotations

import torch.fx as fx
from torch import Tensor

from .. import ops
from ..analysis import ModelMap
from .infra import graph_pass, tag, tags

__all__ = ["pad_spatial", "to_grid_tokens", "from_grid_tokens"]


def to_grid_tokens(tokens: Tensor, state) -> Tensor:
    """Tokens (B, k, C) about to be laid on the stage's H x W grid -> (B, H * W, C).

    Eval: the kept tokens scattered into a zero grid at their original positions (``Pad(X, M)``).
    Training form: full length, multiplied by the keep mask (``X * M``). Nothing removed yet:
    returned as is.
    """
    if state.keep is not None:
        return tokens * state.keep.to(tokens.dtype)
    if tokens.shape[1] == state.n_ref:
        return tokens
    return ops.scatter_to_grid(tokens, state.pos, state.n_ref)


def from_grid_tokens(tokens: Tensor, state) -> Tensor:
    """Tokens computed on the full grid (B, H * W, C) -> the kept ones (B, k, C), in stream order,
    so queries stay reduced. Training form and nothing removed: returned as is."""
    if state.keep is not None or state.pos.shape[1] == state.n_ref:
        return tokens
    return ops.gather_tokens(tokens, state.pos)


@graph_pass
def pad_spatial(gm: fx.GraphModule, model_map: ModelMap) -> fx.GraphModule:
    """Wrap every grid entry after a reduction site in :func:`to_grid_tokens` and every grid return
    at the same resolution in :func:`from_grid_tokens`; mutates and returns ``gm``.

    Expects: :func:`insert_sites` ran (state nodes tagged ``state_of`` with their ``stage``).
    Guarantees: every spatial operator downstream of a site sees the full H x W grid (zeros, or
    masked tokens in training); tokens returning from the grid are gathered back to the kept
    positions; grids before the first site of their stage are untouched.

    Generated code (PVT spatial-reduction attention after a dTPS site)::

        to_grid_tokens = tokenreduce.passes.spatial.to_grid_tokens(layer_norm_5, getitem_40)
        transpose_14 = to_grid_tokens.transpose(1, 2)                  # was layer_norm_5
        reshape_12 = transpose_14.reshape(getitem_41, 128, 28, 28)
        stages_1_blocks_0_attn_sr = self.stages[1].blocks[0].attn.sr(reshape_12)
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    states = [n for n in graph.nodes if "state_of" in tags(n)]
    padded: dict[int, fx.Node] = {}
    for i, grid in enumerate(model_map.to_grid):
        src = grid.head.args[0]  # the current input: insert_sites may have rewired it
        state = None
        for s in states:
            if tags(s)["stage"] == grid.stage and order[s] < order[src]:
                state = s
        if state is None:
            continue
        with graph.inserting_before(grid.head):
            new = graph.call_function(to_grid_tokens, (src, state))
        grid.head.replace_input_with(src, new)
        tag(new, role="to_grid", stage=grid.stage)
        padded[i] = state
    for ret in model_map.from_grid:
        state = padded.get(ret.source)
        if state is None:
            continue
        with graph.inserting_after(ret.node):
            new = graph.call_function(from_grid_tokens, (ret.node, state))
        ret.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        tag(new, role="from_grid", stage=ret.stage)
    return gm
