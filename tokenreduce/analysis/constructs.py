"""Attention constructs that are not self-attention over a token stream, and the refusals that
name them: windowed attention (Swin, MaxViT, Hiera's mask units), class attention (CaiT's last
blocks), channel attention (XCiT), an inner transformer per token (TNT), a class token rebuilt
between the blocks of one stream (CrossViT)."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..errors import TokenReduceError
from ._found import FoundAttention, FoundBlock
from .graph import shape_of

__all__ = ["CHANNEL", "GRID", "check_handovers", "check_nested", "construct", "opaque_attention", "refusal"]

_QKV_NAMES = {"qkv", "qk", "q", "kv", "to_qkv", "query"}

GRID = "attention over a (B, H, W, C) feature map (windowed or grid attention)"

WINDOWED = "windowed attention"
CLASS = "class attention (fewer queries than keys: the class token attends to the patches)"
CHANNEL = "channel (cross-covariance) attention: its logits are (d, d) over channels, not tokens"
NEEDS = {
    WINDOWED: "tokens are attended within fixed windows (Swin, MaxViT, Hiera's mask units); removing "
    "tokens breaks the window partition, and serving it needs window-aware reduction (dropped "
    "tokens padded back into their windows), which tokenreduce does not implement",
    GRID: "the blocks keep the tokens on a (B, H, W, C) grid between layers, not as a (B, N, C) stream; "
    "reduction needs a token stream",
    CLASS: "class attention only updates the class token and has no tokens to reduce",
    CHANNEL: "channel attention costs O(N) and does not score tokens; the model has no token attention to reduce",
}


def construct(att: FoundAttention, batch: int | None) -> str | None:
    """What kind of attention ``att`` is when it is not self-attention over the token stream."""
    q = shape_of(att.q) or ()
    if len(q) == 5:  # (B, heads, windows, tokens per window, d): Hiera's mask-unit attention
        return WINDOWED + f" ({q[2]} mask unit(s) of {q[3]} tokens per image)"
    if batch is not None and len(q) == 4 and q[0] != batch:
        return WINDOWED + f" ({q[0] // batch} windows of {q[2]} tokens per image)" if q[0] % batch == 0 else WINDOWED
    nq, nk = att.record.num_queries, att.record.num_keys
    if nq < nk and nq <= 2 and nk > 4 * nq:
        # CaiT, XCiT: the class token's query (pooled queries, as in MViT, are many)
        return CLASS
    return None


def refusal(model: str, count: int, kinds: dict[str, str]) -> str:
    """The message for a model whose attention is all of the ``kinds`` (construct -> first place)."""
    parts = []
    for kind, where in kinds.items():
        base = next(k for k in NEEDS if kind.startswith(k))
        parts.append(f"{kind} (first at '{where}'): {NEEDS[base]}")
    return (
        f"analyze: {model} has {count} attention op(s) but no self-attention block over a token stream "
        f"that tokenreduce can reduce: " + "; ".join(parts) + ". tokenreduce reduces pre-norm blocks "
        "`x = x + attn(norm(x)); x = x + mlp(norm(x))` whose attention runs over the (B, N, C) tokens."
    )


def check_handovers(g: nx.DiGraph, blocks: list[FoundBlock], model: str) -> None:
    """Refuse a stage whose stream is an earlier stage's tokens, same length, with other prefix
    tokens (CrossViT's fusion writes a fused class token into each branch, which reads as image
    tokens): the sites of both would keep their own counts and the class token could be pruned."""
    firsts = [b for i, b in enumerate(blocks) if i and blocks[i - 1].stage != b.stage]
    for b in firsts:
        for e in blocks:
            if e.stage >= b.stage or e.num_prefix == b.num_prefix or shape_of(e.exit) != shape_of(b.entry):
                continue
            if nx.has_path(g, e.exit, b.entry):
                raise TokenReduceError(
                    f"analyze: {model}: block '{b.path}' continues the token stream of block '{e.path}' (same "
                    f"{shape_of(b.entry)[1]} tokens) but its {e.num_prefix} prefix token(s) are rebuilt from the "
                    f"image in between (a fused class token, as in CrossViT's cross-attention fusion), so "
                    f"tokenreduce cannot tell them from patch tokens there; reducing it needs the prefix tokens "
                    f"followed across that fusion, which tokenreduce does not do."
                )


def check_nested(blocks: list[FoundBlock], inner: dict[int, str], model: str) -> None:
    """Refuse TNT-like models: skipped windowed attention with one window per token of a block
    (``inner``: windows per image -> where), whose output is added back to those tokens."""
    # TNT: one attention window per token of the outer stream (the class token aside)
    nested = next(
        ((b, w) for b in blocks for w in {b.num_tokens, b.num_tokens - b.num_prefix, b.num_tokens - 1} if w in inner),
        None,
    )
    if nested is not None:
        b, w = nested
        raise TokenReduceError(
            f"analyze: {model} runs an inner transformer inside every token (attention at "
            f"'{inner[w]}' over {w} windows, one per token of block '{b.path}'), whose output is added back to "
            f"those tokens: removing outer tokens would need the inner (pixel) stream reduced with them, which "
            f"tokenreduce does not do."
        )


def opaque_attention(gm: fx.GraphModule) -> list[str]:
    """Attention modules that tracing kept opaque (a leaf: timm marks some as not traceable, such
    as ConViT's GPSA and Twins' LocallyGroupedAttn, which branch on the input size), as
    ``"path (Class)"``: a composite leaf module named like attention or holding q/k/v projections."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        children = dict(module.named_children())
        if children and ("att" in type(module).__name__.lower() or _QKV_NAMES & children.keys()):
            out.append(f"'{node.target}' ({type(module).__name__})")
    return out
