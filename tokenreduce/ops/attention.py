"""Attention pieces for token scoring (eTPS/EViT) and masked training attention (dTPS).

``cls_attention`` recomputes only the class-token row of the attention, so the block's own
attention keeps its fused kernel. ``policy_softmax``/``policy_attention`` are DynamicViT's
key-masked attention for fixed-length training (tps-reference.md, Sec. 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_float, check_shape, check_tensor

__all__ = ["cls_attention", "policy_attention", "policy_softmax"]

POLICY_EPS = 1e-6


def cls_attention(q: Tensor, k: Tensor, scale: float, num_prefix: int) -> Tensor:
    """Class-token attention to each patch, averaged over heads.

    q, k (B, H, N, d) -> (B, N - P) float32, ``P = num_prefix``:
    ``mean_h softmax(q[:, h, 0] @ k[:, h]^T * scale)[P:]``. The softmax runs over all N keys
    (prefix included) and only then are the prefix columns dropped, as EViT scores them.
    Cost O(N d) per head: the N x N matrix is never formed.
    """
    op = "cls_attention"
    check_tensor(op, "q", q, 4, "(B, H, N, d)")
    check_tensor(op, "k", k, 4, "(B, H, N, d)")
    check_float(op, "q", q)
    check_float(op, "k", k)
    check_shape(op, "k", k, tuple(q.shape), "(B, H, N, d) equal to `q`'s")
    N = q.shape[2]
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, (int, torch.SymInt)):
        raise TypeError(f"{op}: `num_prefix` must be an int, got {type(num_prefix).__name__}")
    if not 0 <= num_prefix < N:
        raise ValueError(
            f"{op}: `num_prefix` must satisfy 0 <= num_prefix < N = {N} (at least one patch token), got {num_prefix}"
        )
    q0 = q[:, :, :1]  # (B, H, 1, d)
    if torch.compiler.is_compiling():
        # Inductor fuses this into one reduction that reads K where it lies (a strided view of
        # the qkv projection) and multiplies in fp32. A matmul would first copy K contiguous:
        # ~60 us per batch at DeiT-S's three sites on an H200, more than the product itself.
        logits = (q0.float() * k.float()).sum(dim=-1) * scale  # (B, H, N)
    else:
        # Eager: the product in the input dtype (fp32 accumulation inside the matmul), upcast
        # after; upcasting K first would write an fp32 copy of it at every site.
        logits = (q0 @ k.transpose(-2, -1))[:, :, 0].float() * scale  # (B, H, N)
    attn = logits.softmax(dim=-1)  # (B, H, N)
    return attn[:, :, num_prefix:].mean(dim=1)  # (B, N - P)


def policy_softmax(scores: Tensor, policy: Tensor) -> Tensor:
    """Softmax over keys that ignores dropped keys: (B, H, Nq, N), (B, N) -> (B, H, Nq, N).

    ``Nq = N`` for self-attention; ``Nq < N`` when the queries are the first ``Nq`` tokens only
    (a class token attending to the stream, as in CaiT's class attention): query i is key i.
    With ``p = policy`` (1 alive, 0 dropped), in float32 (float64 for float64 input)::

        P_ij = p_j + (1 - p_j) [i == j]          every token always sees itself
        A    = exp(s - rowmax(s)) * P
        out  = (A + eps / N) / (rowsum(A) + eps),  eps = 1e-6

    Returned in ``scores``' dtype. An all-ones policy gives the plain softmax (to ~eps). The
    row max runs over all keys, dropped ones included, as DynamicViT computes it.
    """
    op = "policy_softmax"
    check_tensor(op, "scores", scores, 4, "(B, H, N, N)")
    check_tensor(op, "policy", policy, 2, "(B, N)")
    check_float(op, "scores", scores)
    check_float(op, "policy", policy)
    B, H, Nq, N = scores.shape
    if Nq > N:
        raise ValueError(
            f"{op}: `scores` must have at most as many queries as keys (B, H, Nq, N) with Nq <= N, "
            f"got shape {tuple(scores.shape)}"
        )
    check_shape(op, "policy", policy, (B, N), "(B, N)")

    # In half precision eps / N vanishes next to 1 and the row sums lose digits: work in at
    # least float32 (float64 input stays float64, which gradcheck needs).
    work = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(work)
    p = policy.to(work).reshape(B, 1, 1, N)  # keys along the last dim
    eye = torch.eye(Nq, N, dtype=work, device=scores.device).reshape(1, 1, Nq, N)
    visible = p + (1.0 - p) * eye  # (B, 1, Nq, N)
    a = (s - s.amax(dim=-1, keepdim=True)).exp() * visible
    out = (a + POLICY_EPS / N) / (a.sum(dim=-1, keepdim=True) + POLICY_EPS)
    return out.to(scores.dtype)


def policy_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float) -> Tensor:
    """Attention with dropped keys masked out: q (B, H, Nq, d), k, v (B, H, N, d), policy (B, N)
    -> (B, H, Nq, d); ``Nq = N`` for self-attention, fewer for queries of the first tokens only.

    ``policy_softmax((q * scale) @ k^T, policy) @ v``; scaling q first, as timm's Attention does.
    """
    op = "policy_attention"
    check_tensor(op, "q", q, 4, "(B, H, Nq, d)")
    check_tensor(op, "k", k, 4, "(B, H, N, d)")
    check_tensor(op, "v", v, 4, "(B, H, N, d)")
    check_shape(op, "k", k, tuple(q.shape[:2]) + (k.shape[2], q.shape[3]), "(B, H, N, d) matching `q`")
    check_shape(op, "v", v, tuple(k.shape[:3]) + (v.shape[3],), "(B, H, N, d_v) matching `k`")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"{op}: `q` must have at most as many queries as `k` has keys, got {q.shape[2]} and {k.shape[2]}"
        )
    attn = policy_softmax((q * scale) @ k.transpose(-2, -1), policy)  # (B, H, Nq, N)
    return attn @ v  # (B, H, Nq, d_v)
