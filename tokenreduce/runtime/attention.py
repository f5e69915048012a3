"""Attention that reads a site's keep policy (the training form of learned scorers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..errors import TokenReduceError
from .state import TokenState

__all__ = ["attend", "masked_probs"]


def _policy(keep: Tensor, num_prefix: int | None, num_keys: int) -> Tensor:
    """(B, P + n) policy: prefix tokens always alive, then the keep mask (B, n, 1). ``num_prefix``
    None: as many prefix tokens as the ``num_keys`` keys hold beyond the n patches (a class token
    put in front of the stream after the last block, as CaiT's class attention does)."""
    P = num_keys - keep.shape[1] if num_prefix is None else num_prefix
    if P < 0:
        raise TokenReduceError(
            f"attend: the attention has {num_keys} keys, fewer than the {keep.shape[1]} tokens its keep "
            f"policy covers; it does not read the token stream as keys"
        )
    prefix = keep.new_ones(keep.shape[0], P)
    return torch.cat([prefix, keep[..., 0]], dim=1)


def attend(q: Tensor, k: Tensor, v: Tensor, state: TokenState | None, num_prefix: int | None, **sdpa_kwargs) -> Tensor:
    """``F.scaled_dot_product_attention`` unless ``state`` holds a training keep mask; then the
    policy-masked attention (keys masked, self always visible, float32): q (B, H, Nq, d), k, v
    (B, H, N, d), Nq <= N (the first Nq tokens' queries); ``num_prefix`` None: every key ahead of
    the n patches is a prefix token. A
    float ``attn_mask`` (relative position bias) is added to the logits before the policy softmax.
    In eval the call is exactly the original one."""
    keep = None if state is None else state.keep
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    mask = sdpa_kwargs.get("attn_mask")
    if sdpa_kwargs.get("is_causal") or (mask is not None and not mask.is_floating_point()):
        raise TokenReduceError(
            "attend: a boolean attention mask or causal attention cannot be combined with a keep policy"
        )
    scale = sdpa_kwargs.get("scale") or q.shape[-1] ** -0.5
    if mask is not None:  # an additive bias (relative position bias): (B or 1, H or 1, N, N)
        scores = (q * scale) @ k.transpose(-2, -1) + mask
        return ops.policy_softmax(scores, _policy(keep, num_prefix, k.shape[-2])).to(v.dtype) @ v
    return ops.policy_attention(q, k, v, _policy(keep, num_prefix, k.shape[-2]), scale)


def masked_probs(scores: Tensor, probs: Tensor, state: TokenState | None, num_prefix: int | None) -> Tensor:
    """The model's own softmax ``probs`` unless ``state`` holds a training keep mask; then the
    policy softmax of the pre-softmax ``scores`` (B, H, Nq, N), Nq <= N."""
    keep = None if state is None else state.keep
    if keep is None:
        return probs
    return ops.policy_softmax(scores, _policy(keep, num_prefix, scores.shape[-1]))
