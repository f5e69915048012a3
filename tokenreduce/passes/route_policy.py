"""Pass: route the dTPS keep policy into attention (training form of learned scorers)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..analysis import ModelMap
from ..errors import TokenReduceError
from ..plan import Plan
from .infra import graph_pass, tag, tags

__all__ = ["route_policy", "attend", "masked_probs"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _policy(keep: Tensor, num_prefix: int) -> Tensor:
    """(B, P + n) policy: prefix tokens always alive, then the keep mask (B, n, 1)."""
    prefix = keep.new_ones(keep.shape[0], num_prefix)
    return torch.cat([prefix, keep[..., 0]], dim=1)


def attend(q: Tensor, k: Tensor, v: Tensor, state, num_prefix: int, **sdpa_kwargs) -> Tensor:
    """``F.scaled_dot_product_attention`` unless ``state`` holds a training keep mask; then the
    policy-masked attention of tps-reference Sec. 2 (keys masked, self always visible, float32).
    In eval the call is exactly the original one."""
    keep = None if state is None else state.keep
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    if sdpa_kwargs.get("attn_mask") is not None or sdpa_kwargs.get("is_causal"):
        raise TokenReduceError("attend: an attention mask or causal attention cannot be combined with a keep policy")
    scale = sdpa_kwargs.get("scale") or q.shape[-1] ** -0.5
    return ops.policy_attention(q, k, v, _policy(keep, num_prefix), scale)


def masked_probs(scores: Tensor, probs: Tensor, state, num_prefix: int) -> Tensor:
    """The model's own softmax ``probs`` unless ``state`` holds a training keep mask; then the
    policy softmax of the pre-softmax ``scores`` (B, H, N, N)."""
    keep = None if state is None else state.keep
    if keep is None:
        return probs
    return ops.policy_softmax(scores, _policy(keep, num_prefix))


@graph_pass
def route_policy(gm: fx.GraphModule, model_map: ModelMap, plan: Plan) -> fx.GraphModule:
    """Make every attention from a site to the end of its stage read that site's keep policy.

    Expects: :func:`insert_sites` ran on ``gm`` (state nodes tagged ``state_of``). Guarantees: in
    eval mode the graph computes exactly what it did (the wrapped calls fall through to the
    original op); in train mode attention keys of dropped tokens are masked. Attention whose keys
    are not the token sequence (spatial reduction) is left alone. Mutates and returns ``gm``.

    Generated code (sdpa)::

        attend = tokenreduce.passes.route_policy.attend(q, k, v, getitem_81, 1, attn_mask=None,
                                                        dropout_p=0.0, is_causal=False)
    """
    graph = gm.graph
    states = {tags(n)["state_of"]: n for n in graph.nodes if "state_of" in tags(n)}
    for block in model_map.blocks:
        site = next((s for s in reversed(plan.sites) if s.stage == block.stage and s.block <= block.index), None)
        if site is None or not block.attn.full_keys:
            continue
        if site.block == block.index and site.placement != "before":
            continue
        state, att = states[site.index], block.attn
        if att.kind == "sdpa":
            node = att.node
            bound = dict(zip(_SDPA_ARGS, node.args))
            bound.update(node.kwargs)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            with graph.inserting_before(node):
                new = graph.call_function(attend, (q, k, v, state, block.num_prefix), bound)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        else:
            probs = att.node
            with graph.inserting_after(probs):
                new = graph.call_function(masked_probs, (probs.args[0], probs, state, block.num_prefix))
            probs.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        tag(new, block=block.index, role="policy_attention", site=site.index)
    return gm
