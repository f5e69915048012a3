"""Pass: also return the per-site keep decisions (``apply(..., aux=True)``)."""

from __future__ import annotations

import torch.fx as fx

from ..site import keep_mask
from .infra import graph_pass, tag, tags

__all__ = ["add_aux_output"]


@graph_pass
def add_aux_output(gm: fx.GraphModule) -> fx.GraphModule:
    """Change the output from ``out`` to ``(out, (keep_0, keep_1, ...))``.

    ``keep_s`` is (B, n_ref) over the original patch positions of site s's stage: 1 where the token
    is alive after site s. In training (learned scorers) it is the straight-through Gumbel mask,
    so losses on it reach the score heads. Expects :func:`insert_sites` ran. Mutates ``gm``.
    """
    graph = gm.graph
    states = sorted((n for n in graph.nodes if "state_of" in tags(n)), key=lambda n: tags(n)["state_of"])
    output = next(n for n in graph.nodes if n.op == "output")
    masks = []
    for state in states:
        with graph.inserting_before(output):
            mask = graph.call_function(keep_mask, (state,))
        tag(mask, keep_of=tags(state)["state_of"])
        masks.append(mask)
    output.args = ((output.args[0], tuple(masks)),)
    return gm
