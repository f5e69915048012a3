"""Attention constructs that are not self-attention over a token stream, and the refusals that
name them: windowed attention (Swin, MaxViT, Hiera's mask units), class attention (CaiT's last
blocks), channel attention (XCiT), an inner transformer per token (TNT), a class token rebuilt
between the blocks of one stream (CrossViT)."""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import holds_attention
from ..errors import TokenReduceError
from ._found import FoundAttention, FoundBlock
from .attention import _MAX_SCORE_OPS, _is_matmul, _is_softmax, _score_product, _softmax_module, _untranspose
from .graph import data_args, data_graph, is_add, node_path, shape_of
from .opaque import probe_leaves

__all__ = [
    "CHANNEL",
    "GRID",
    "check_handovers",
    "check_nested",
    "construct",
    "opaque_attention",
    "add",
    "refusal",
    "skipped",
    "unrecognised",
]


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
        if holds_attention(module):
            out.append(f"'{node.target}' ({type(module).__name__})")
    return out


# Constructs that fit no block, named for the refusal: detected from the graph around
# a skipped attention (`skipped`), from attention-like ops the recogniser does not accept
# (`unrecognised`), or from inside opaque modules (`inside`).
POOLED = "pooling attention"
CONV_BLOCK = "attention inside a convolutional block"
FACTORIZED = "factorized attention"
KEY_LAYOUT = "attention with keys projected straight to a (B, heads, d, N) layout (q @ k, no transpose)"
CONV_MAP = "attention on a (B, C, H, W) feature map"
RESIZING = "resolution-changing attention"
UNFOLDED = "attention over unfolded patches"
NEEDS.update(
    {
        POOLED: "serving it needs the tokens scattered back onto the grid before every pooling conv and the "
        "pooled query and shortcut followed through the block, which tokenreduce does not do",
        CONV_BLOCK: "the stream between blocks is a convolutional feature map, not (B, N, C) tokens; serving it "
        "needs every conv of the block run on a grid with the removed tokens scattered back",
        FACTORIZED: "there is no (N, N) attention map to score tokens by or to mask in training; serving it "
        "needs a masked factorized attention, which tokenreduce does not implement",
        KEY_LAYOUT: "serving it needs the recogniser to accept that key layout (and a learned bias gathered at "
        "the kept tokens), which tokenreduce does not do",
        CONV_MAP: "the tokens stay a (B, C, H, W) map projected by convolutions, never a (B, N, C) stream; "
        "reduction needs a token stream",
        RESIZING: "its output is a coarser grid computed from the full input grid; serving it needs the removed "
        "tokens scattered back onto that grid first, which tokenreduce does not do for this attention",
        UNFOLDED: "each sequence holds one pixel of every patch, so removing a patch means removing it from "
        "every sequence together and folding the map back with it padded, which tokenreduce does not do",
    }
)
_SPATIAL_MODULES = (nn.Conv1d, nn.Conv2d, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
_SPATIAL_FNS = {F.conv2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d}


def _is_spatial(node: fx.Node) -> bool:
    """A convolution or pooling call (module or function)."""
    if node.op == "call_function":
        return node.target in _SPATIAL_FNS
    if node.op != "call_module" or node.graph.owning_module is None:
        return False
    return isinstance(node.graph.owning_module.get_submodule(str(node.target)), _SPATIAL_MODULES)


def _spatial_before(node: fx.Node, depth: int = 8) -> bool:
    """A conv or pool within ``depth`` data steps above ``node`` (q/k/v projected or pooled on a grid)."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in data_args(n) if a not in seen]
        seen.update(frontier)
        if any(_is_spatial(n) for n in frontier):
            return True
    return False


def _map_layout(stream: tuple[int, ...], tokens: int, lead: int, batch: int) -> tuple[str, int] | None:
    """The layout of a 4-D ``stream`` around an attention over ``tokens`` whose logits' batch is
    ``lead`` (images x windows, maybe x heads): ``(layout, windows per image)``."""
    for layout, hw in (("(B, H, W, C)", stream[1] * stream[2]), ("(B, C, H, W)", stream[2] * stream[3])):
        if hw % tokens == 0 and lead % (batch * (hw // tokens)) == 0:
            return layout, hw // tokens
    return None


def _has_bias(g: nx.DiGraph, att: FoundAttention) -> bool:
    """An sdpa whose ``attn_mask`` is computed from parameters (a relative-position bias)."""
    mask = att.node.kwargs.get("attn_mask") if att.record.kind == "sdpa" else None
    return isinstance(mask, fx.Node) and any(n.op == "get_attr" for n in nx.ancestors(g, mask))


def skipped(g: nx.DiGraph, att: FoundAttention, entry: fx.Node | None, batch: int | None) -> str | None:
    """What ``att`` is when no block is built around it: ``entry`` is the skip operand of the first
    residual add below it (None when none). None when it is nothing named here."""
    stream, q = shape_of(entry) if entry is not None else None, shape_of(att.q) or ()
    nq, nk = att.record.num_queries, att.record.num_keys
    if entry is att.q and (_spatial_before(att.q) or _spatial_before(att.k)):  # MViT's residual pooling
        return POOLED + (
            f" (queries pooled to {nq} and keys to {nk} tokens by a conv on the token grid, the pooled query "
            f"added back to the output)"
        )
    if stream is not None and len(stream) == 3 and att.record.head_dim == stream[1] and nq != stream[1]:
        return CHANNEL  # EdgeNeXt's XCA in a conv block
    if stream is None or len(stream) != 4 or not batch or not q:
        return None
    found = _map_layout(stream, nq, q[0], batch)
    if found is None:
        return None
    layout, windows = found
    if windows > 1:
        folded = ", heads folded into the batch" if len(q) == 3 else ""
        bias = " with a relative-position bias" if _has_bias(g, att) else ""
        return WINDOWED + f" ({windows} windows of {nq} tokens per image{folded}){bias} on a {layout} map"
    if layout == "(B, C, H, W)":  # Next-ViT: attention flattened from and added back to a conv map
        pooled = f", keys pooled to {nk} of {nq} tokens" if nk < nq else ""
        return CONV_BLOCK + f" (tokens flattened from a {layout} map and added back to it{pooled})"
    return GRID


def _softmax_dim(node: fx.Node) -> int | None:
    if node.op == "call_function" and node.target in (F.softmax, torch.softmax, torch.Tensor.softmax):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    elif node.op == "call_method" and node.target == "softmax":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    else:
        module = _softmax_module(node)
        dim = module.dim if module is not None else None
    rank = len(shape_of(node) or ())
    return dim % rank if isinstance(dim, int) and rank else None


def _factorized(softmax: fx.Node) -> str | None:
    """CoaT: ``q @ (softmax(k, dim=tokens)^T @ v)``, a (d, d) context instead of an (N, N) map."""
    shape = shape_of(softmax)
    if len(shape) < 3 or _softmax_dim(softmax) != len(shape) - 2:
        return None
    for user in softmax.users:
        ctx = next(iter(user.users), None) if _untranspose(user) is softmax else None
        if ctx is not None and _is_matmul(ctx) and (shape_of(ctx) or ())[-2:] == (shape[-1], shape[-1]):
            return FACTORIZED + (
                f" (softmax over the {shape[-2]} keys' tokens, then q @ (softmax(k)^T v), a ({shape[-1]}, "
                f"{shape[-1]}) context per head)"
            )
    return None


def _nearest_module(node: fx.Node, depth: int = 8) -> fx.Node | None:
    for _ in range(depth):
        if node.op == "call_module":
            return node
        args = data_args(node)
        if not args:
            return None
        node = args[0]
    return None


def _learned_bias(g: nx.DiGraph, scores: fx.Node, product: fx.Node) -> bool:
    """An add between the ``product`` and the softmax's input ``scores`` whose other operand is
    computed from parameters alone (no image data): a learned attention bias."""
    for node in nx.ancestors(g, scores) | {scores}:
        if is_add(node) and nx.has_path(g, product, node):
            other = [a for a in node.args[:2] if isinstance(a, fx.Node) and not nx.has_path(g, product, a)]
            if other and not any(n.op == "placeholder" for n in nx.ancestors(g, other[0])):
                return True
    return False


def _unaccepted(g: nx.DiGraph, softmax: fx.Node, batch: int | None) -> list[str]:
    """What a ``softmax(q @ k ...)`` the recogniser rejected is (its keys not ``k.transpose(-2, -1)``)."""
    found = _score_product(softmax.args[0], shape_of(softmax), _MAX_SCORE_OPS)
    if found is None:
        return []
    q, kt = found[0].args[0], found[0].args[1]
    if not (isinstance(q, fx.Node) and isinstance(kt, fx.Node)):
        return []
    nq, nk = shape_of(found[0])[-2:]
    if kt.op == "call_method" and kt.target == "contiguous" and _untranspose(kt.args[0]) is not None:
        k, lead = _untranspose(kt.args[0]), shape_of(q)[:-2]  # GC ViT: k.transpose(-2, -1).contiguous()
        if batch and lead and lead[0] != batch and lead[0] % batch == 0:
            own = _nearest_module(k)
            glob = "" if own is None or own in nx.ancestors(g, q) else ", queries from another tensor in some blocks"
            return [WINDOWED + f" ({lead[0] // batch} windows of {nq} tokens per image{glob})"]
        return []
    bias = " and a learned (N, N) bias" if _learned_bias(g, softmax.args[0], found[0]) else ""
    kinds = [CONV_MAP + f" (q, k, v projected by convolutions{bias})" if _spatial_before(q, 3) else KEY_LAYOUT + bias]
    if nq < nk:
        kinds.append(RESIZING + f" ({nq} queries over {nk} keys: the queries are a coarser grid)")
    return kinds


def inside(rows: list, batch: int | None) -> dict[str, str]:
    """Constructs of the attention calls found inside opaque modules (:mod:`.opaque`)."""
    kinds: dict[str, str] = {}
    note = ", inside a module opaque to tracing"
    for r in rows:
        kind = None
        if len(r.lead) == 3:  # (B, windows, heads): Twins' locally-grouped attention
            kind = WINDOWED + f" ({r.lead[1]} windows of {r.queries} tokens per image{note})"
        elif batch and r.lead and r.lead[0] != batch and r.lead[0] % batch == 0:
            seqs, kind = r.lead[0] // batch, WINDOWED + f" ({r.lead[0] // batch} windows of {r.queries} tokens{note})"
            if r.grid is not None and r.positions is not None:
                rows_, cols = [p // r.grid[1] for p in r.positions], [p % r.grid[1] for p in r.positions]
                span = (max(rows_) - min(rows_) + 1) * (max(cols) - min(cols) + 1)
                if span > len(r.positions) or r.queries == 1:  # one pixel of every patch, not a window
                    kind = UNFOLDED + (
                        f" (the {r.grid[0]} x {r.grid[1]} map cut into {r.queries} patches; each of the {seqs} "
                        f"pixel positions of a patch attends across the patches{note})"
                    )
        if kind is not None:
            add(kinds, kind, r.path)
    return kinds


def add(kinds: dict[str, str], kind: str, where: str) -> None:
    """Record ``kind`` first seen at ``where``, unless the same construct (with other counts) is
    already listed: one entry per construct in a message."""
    base = next(k for k in NEEDS if kind.startswith(k))
    if not any(k.startswith(base) for k in kinds):
        kinds[kind] = where


def unrecognised(gm: fx.GraphModule, example_shape: tuple[int, ...]) -> tuple[int, dict[str, str]]:
    """For a graph in which no attention was recognised: how many attention-like ops there are and
    what they are (construct -> first module path), from the graph or from inside opaque modules."""
    g, batch = data_graph(gm.graph), (example_shape or (None,))[0]
    kinds: dict[str, str] = {}
    count = 0
    for node in gm.graph.nodes:
        if shape_of(node) is None or _softmax_dim(node) is None:
            continue
        found = [k] if (k := _factorized(node)) else _unaccepted(g, node, batch) if _is_softmax(node) else []
        count += bool(found)
        for kind in found:
            add(kinds, kind, node_path(node) or node.name)
    if not kinds:
        rows = probe_leaves(gm, example_shape)
        count, kinds = len(rows), inside(rows, batch)
    return count, kinds
