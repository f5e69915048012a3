"""Pass: insert one :class:`~tokenreduce.runtime.ReductionSite` call per site of the plan."""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from ..analysis import ModelMap
from ..anchors import find
from ..errors import TokenReduceError
from ..plan import Plan
from .infra import graph_pass, tag

__all__ = ["insert_sites"]


@graph_pass
def insert_sites(gm: fx.GraphModule, model_map: ModelMap, plan: Plan, modules: list[nn.Module]) -> fx.GraphModule:
    """Insert the reduction of every site; mutates and returns ``gm``.

    Expects: ``gm`` carries the marks of the analysis ``model_map`` describes; ``modules[i]``
    serves ``plan.sites[i]``; no site inserted yet. Guarantees: after site i the stream carries
    ``P + sites[i].n_out`` tokens for the example input (P prefix tokens, untouched); every later
    user of the stream reads the reduced tensor; sites of one stage are chained through a
    ``TokenState``. The site call is tagged ``site``, its state ``state_of`` (with its ``stage``).
    Position-indexed tensors (rotary tables, relative bias) are left to
    :func:`tokenreduce.passes.positions.gather_positions`, which runs next.

    Generated code, eTPS at block 3 (placement after attention)::

        add_7 = add_6 + blocks_3_drop_path1                     # x = x + attn(norm1(x))
        reduce_sites_0 = self.reduce_sites[0](add_7, None, q=blocks_3_attn_q_norm,
                                              k=blocks_3_attn_k_norm, scale=None)
        getitem_80 = reduce_sites_0[0]                           # (B, P + k, C)
        getitem_81 = reduce_sites_0[1]                           # TokenState
        layer_norm_7 = layer_norm(getitem_80, ...)               # the MLP runs on P + k tokens
        add_8 = getitem_80 + blocks_3_drop_path2

    dTPS (placement before) anchors on the block's entry instead, so the whole block runs reduced.
    """
    if hasattr(gm, "reduce_sites"):
        raise TokenReduceError("pass insert_sites: the graph already has reduction sites (`reduce_sites`)")
    if len(modules) != len(plan.sites):
        raise TokenReduceError(f"pass insert_sites: {len(modules)} modules for {len(plan.sites)} sites")
    graph = gm.graph
    gm.add_submodule("reduce_sites", nn.ModuleList(modules))
    last_state: dict[int, fx.Node] = {}
    for site in plan.sites:
        block = model_map.block(site.block)
        anchor = find(
            graph, "entry" if site.placement == "before" else "attn_residual", block.index, user="pass insert_sites"
        )
        kwargs = {}
        if site.placement == "after_attn":
            att = find(graph, "attn", block.index, user="pass insert_sites")
            if block.attn.kind == "sdpa":
                q, k = (find(graph, r, block.index, user="pass insert_sites") for r in ("q", "k"))
                kwargs = {"q": q, "k": k, "scale": block.attn.scale}
            else:
                kwargs = {"probs": att}
        with graph.inserting_after(anchor):
            call = graph.call_module(f"reduce_sites.{site.index}", (anchor, last_state.get(site.stage)), kwargs)
        with graph.inserting_after(call):
            x_new = graph.call_function(operator.getitem, (call, 0))
        with graph.inserting_after(x_new):
            state = graph.call_function(operator.getitem, (call, 1))
        anchor.replace_all_uses_with(x_new, delete_user_cb=lambda user: user is not call)
        tag(call, site=site.index, block=site.block)
        tag(state, state_of=site.index, stage=site.stage)
        last_state[site.stage] = state
    return gm
