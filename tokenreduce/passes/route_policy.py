"""Pass: route the dTPS keep policy into attention (training form of learned scorers)."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import ModelMap
from ..anchors import find, move
from ..plan import Plan
from ..runtime.attention import attend, masked_probs
from .infra import graph_pass, require, site_states, state_before, tag, tags

__all__ = ["route_policy"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@graph_pass
def route_policy(gm: fx.GraphModule, model_map: ModelMap, plan: Plan) -> fx.GraphModule:
    """Make every attention from a site to the end of its token stream (its stage, and the stages
    that carry it on: :meth:`ModelMap.stream_stages`) read that site's keep policy.

    Expects: :func:`insert_sites` ran on ``gm``. Guarantees: in eval mode the graph computes
    exactly what it did (the wrapped calls fall through to the original op); in train mode
    attention keys of dropped tokens are masked, in a positional attention mixed into the
    probabilities (ConViT) and in class attention after the last block (CaiT) too. Attention
    whose keys are not the token sequence (spatial reduction) is left alone. The attention marks
    move to the new calls. Mutates and returns ``gm``.

    Generated code (sdpa)::

        attend = tokenreduce.runtime.attention.attend(q, k, v, getitem_81, 1, attn_mask=None,
                                                      dropout_p=0.0, is_causal=False)
    """
    require(gm, "route_policy", "insert_sites")
    graph = gm.graph
    states = {tags(n)["state_of"]: n for n in graph.nodes if "state_of" in tags(n)}
    for block in model_map.blocks:
        stream = model_map.stream_stages(block.stage)  # a site's policy holds to the end of its token stream
        site = next((s for s in reversed(plan.sites) if s.stage in stream and s.block <= block.index), None)
        if site is None or not block.attn.full_keys:
            continue
        if site.block == block.index and site.placement != "before":
            continue
        state, node = states[site.index], find(graph, "attn", block.index, user="pass route_policy")
        new = _reroute(graph, node, block.attn.kind, state, block.num_prefix)
        tag(new, block=block.index, role="policy_attention", site=site.index)
        for i, use in enumerate(model_map.positions):  # positional attention (ConViT): masked alike
            if use.block == block.index and use.masked:
                positional = find(graph, "position", i, user="pass route_policy")
                new = _reroute(graph, positional, "softmax", state, block.num_prefix)
                tag(new, block=block.index, role="policy_attention", site=site.index)
    _route_key_readers(gm, model_map)
    return gm


def _reroute(graph: fx.Graph, node: fx.Node, kind: str, state: fx.Node, num_prefix: int | None) -> fx.Node:
    """Make attention ``node`` read the keep policy of ``state``: an sdpa call becomes ``attend``
    (marks and meta move to it), a softmax gets ``masked_probs`` after it. Returns the new node."""
    if kind == "sdpa":
        bound = dict(zip(_SDPA_ARGS, node.args))
        bound.update(node.kwargs)
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        with graph.inserting_before(node):
            new = graph.call_function(attend, (q, k, v, state, num_prefix), bound)
        new.meta.update({key: val for key, val in node.meta.items() if key != "tokenreduce"})
        move(node, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return new
    with graph.inserting_after(node):
        new = graph.call_function(masked_probs, (node.args[0], node, state, num_prefix))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _route_key_readers(gm: fx.GraphModule, model_map: ModelMap) -> None:
    """Attention after the last block whose queries are the leading tokens of its keys (CaiT's
    class attention: the model map's ``key_readers``) reads the policy of the last site before it,
    those leading keys (the class token put in front) always alive."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    states = site_states(graph)
    stream = model_map.stream_stages(model_map.blocks[-1].stage)
    for i, reader in enumerate(model_map.key_readers):
        node = find(graph, "key_reader", i, user="pass route_policy")
        state = state_before(states, order, stream, node)
        if state is None:
            continue
        new = _reroute(graph, node, reader.kind, state, None)  # prefix keys counted at run time
        tag(new, role="policy_attention", site=tags(state)["state_of"])
