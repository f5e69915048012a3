"""Pass: also return what losses and pictures need (``apply(..., aux=True)``)."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import ModelMap
from ..anchors import find
from ..plan import Plan
from ..runtime.outputs import final_keep, hosts_of, make_aux
from ..runtime.state import keep_mask
from .infra import graph_pass, require, site_states, tag, tags

__all__ = ["add_aux_output"]


@graph_pass
def add_aux_output(gm: fx.GraphModule, model_map: ModelMap, plan: Plan) -> fx.GraphModule:
    """Change the output from ``out`` to ``(out, Aux(keeps, tokens, token_keep, hosts))``.

    Expects: :func:`insert_sites` ran. Guarantees: ``keeps[s]`` (B, n_ref) is 1 where an original
    patch is alive after site s (the straight-through mask in training, so losses reach the score
    heads); ``tokens`` the final tokens before pooling (None when analysis found none);
    ``token_keep`` their alive mask; ``hosts[s]`` (B, n_ref) the original position each patch lives
    in after site s (-1: gone). Turns on host tracking in every site. Mutates ``gm``.

    Generated code (one site)::

        keep_mask = tokenreduce.runtime.state.keep_mask(getitem_81)
        hosts_of = tokenreduce.runtime.outputs.hosts_of(getitem_81)
        final_keep = tokenreduce.runtime.outputs.final_keep(blocks_11_norm, getitem_81)
        make_aux = tokenreduce.runtime.outputs.make_aux((keep_mask,), norm, final_keep, (hosts_of,))
        return (head, make_aux)
    """
    require(gm, "add_aux_output", "insert_sites")
    graph = gm.graph
    states = sorted(site_states(graph), key=lambda n: tags(n)["state_of"])
    for site in gm.reduce_sites:
        site.track_hosts = True
    output = next(n for n in graph.nodes if n.op == "output")
    keeps, hosts = [], []
    with graph.inserting_before(output):
        for state in states:
            keeps.append(graph.call_function(keep_mask, (state,)))
            hosts.append(graph.call_function(hosts_of, (state,)))
            tag(keeps[-1], keep_of=tags(state)["state_of"])
        tokens = token_keep = None
        if model_map.final_tokens is not None:
            tokens = find(graph, "tokens", 0, user="pass add_aux_output")
            final_stage = model_map.blocks[-1].stage
            stream = model_map.stream_stages(final_stage)
            last = [st for st, s in zip(states, plan.sites) if s.stage in stream]
            token_keep = graph.call_function(final_keep, (tokens, last[-1] if last else None))
        aux = graph.call_function(make_aux, (tuple(keeps), tokens, token_keep, tuple(hosts)))
    output.args = ((output.args[0], aux),)
    return gm
