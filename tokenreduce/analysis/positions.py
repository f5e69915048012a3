"""Find position-indexed tensors: image-independent tensors with a token axis that meet a block's
queries, keys or attention logits.

Rotary tables (``q * cos + rot(q) * sin``, a token axis against q's and k's), relative position
bias or its index table once it is a bias (both token axes of the logits, often as sdpa's
``attn_mask``) and positional attention terms mixed into the probabilities (ConViT's
``sigmoid(g) * softmax(pos_logits)``: found at the logits of that softmax, so that it runs over
the kept keys) all look the same in the graph: an operand that does not depend on the image,
broadcast against a tensor that does, with a dimension as long as the token sequence. Once
tokens are removed these tensors must be indexed by the kept tokens' original positions;
:mod:`tokenreduce.passes.positions` does that.

Where they meet:

* *q/k level*: nodes between the block entry and the q or k the attention reads; the image
  operand is (B, H, n, d) (token axis 2) or (B, n, ...) (token axis 1);
* *logit level*: nodes downstream of both q and k up to the attention output (scores, bias,
  probabilities, before ``@ v``), and sdpa's ``attn_mask``; token axes are the last two.

The token axis holds either the whole sequence (P + n, prefix rows first) or only the patches
(n: timm applies rotary embeddings to ``q[:, :, P:]``).
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from ._found import FoundBlock
from .attention import _is_softmax
from .graph import is_tensor, shape_of

__all__ = ["FoundPosition", "find_positions"]

_BINARY_FNS = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    operator.iadd,
    operator.imul,
}
_BINARY_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "__add__", "__mul__"}
_ADDITIVE = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd, "add", "sub", "add_", "__add__"}


class FoundPosition:
    """One use of a position-indexed tensor: ``node``'s input ``where`` (an arg index or a kwarg
    name) is the table; ``axes`` are its token axes counted in the image operand's ``rank``;
    ``with_prefix`` when the token axis includes the P prefix rows; ``additive`` for a bias
    (added), False for a factor (rotary tables); ``fill`` the row of a token with no position (an
    appended one): None for the table's mean (a bias), 1.0 for a factor, 0.0 for a factor of a
    rotated copy of q/k (``rot(q) * sin``), so that such a token is not rotated; ``masked`` when
    ``node`` is a positional softmax whose probabilities are mixed into the attention's (ConViT),
    which the training policy masks too."""

    __slots__ = ("block", "node", "where", "axes", "rank", "with_prefix", "additive", "fill", "masked")

    def __init__(
        self,
        block: int,
        node: fx.Node,
        where: int | str,
        axes: tuple[int, ...],
        rank: int,
        with_prefix: bool,
        additive: bool,
        fill: float | None = None,
        masked: bool = False,
    ) -> None:
        self.block, self.node, self.where, self.axes = block, node, where, axes
        self.rank, self.with_prefix, self.additive, self.fill = rank, with_prefix, additive, fill
        self.masked = masked


def _binary(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _BINARY_FNS
    return node.op == "call_method" and node.target in _BINARY_METHODS


def _additive(node: fx.Node) -> bool:
    return node.target in _ADDITIVE


def _is_neg(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.neg, torch.neg)) or (
        node.op == "call_method" and node.target in ("neg", "__neg__")
    )


def _fill(g: nx.DiGraph, node: fx.Node, other: fx.Node, after_entry: set[fx.Node]) -> float | None:
    """Row of an appended token: mean (None) for a bias; for a factor 1, or 0 when it multiplies
    a rotated copy of q/k (a negation on the way from the block entry: ``rot(q) * sin``)."""
    if _additive(node):
        return None
    rotated = any(_is_neg(a) for a in nx.ancestors(g, other) & after_entry)
    return 0.0 if rotated else 1.0


def _positional_softmax(table: fx.Node, depth: int = 4) -> fx.Node | None:
    """The softmax whose probabilities ``table`` is, maybe scaled by a gate that has no token
    axes: ConViT mixes ``sigmoid(g) * softmax(pos_logits)`` into the patch probabilities. Such
    a term follows the tokens as its logits do, so that its softmax runs over the kept keys."""
    node = table
    for _ in range(depth):
        if _is_softmax(node) and len(shape_of(node) or ()) == 4:
            return node
        if not _binary(node):
            return None
        full = [a for a in node.args[:2] if is_tensor(a) and shape_of(a) == shape_of(node)]
        if len(full) != 1:
            return None
        node = full[0]
    return None


def _aligned(table: tuple[int, ...], rank: int, axis: int) -> int | None:
    """Size of ``table``'s dimension broadcast against dimension ``axis`` of a rank-``rank``
    operand (right-aligned), or None when the table has no such dimension."""
    j = axis - (rank - len(table))
    return table[j] if 0 <= j < len(table) else None


def _token_axes(shape: tuple[int, ...], logit: bool, heads: int, lengths: set[int]) -> tuple[int, ...]:
    rank = len(shape)
    if logit:
        return (rank - 2, rank - 1) if rank >= 3 and shape[-1] in lengths and shape[-2] in lengths else ()
    if rank == 4 and shape[1] == heads and shape[2] in lengths:
        return (2,)
    if rank >= 3 and shape[1] in lengths:
        return (1,)
    return ()


def find_positions(
    graph: fx.Graph, g: nx.DiGraph, image: set[fx.Node], blocks: list[FoundBlock]
) -> list[FoundPosition]:
    """Every position-indexed operand meeting the attention of ``blocks``, in graph order
    (``g`` the data graph of ``graph``, ``image`` the nodes that depend on the image)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found: list[FoundPosition] = []
    for b in blocks:
        P, N = b.num_prefix, b.num_tokens
        lengths, heads = {N, N - P}, b.attn.record.num_heads
        after_entry = nx.descendants(g, b.entry)
        qk = (nx.ancestors(g, b.attn.q) | nx.ancestors(g, b.attn.k) | {b.attn.q, b.attn.k}) & after_entry
        out = b.attn.node
        if b.attn.record.kind == "softmax" and b.attn.v is not None:  # probs @ v: the matmul reading v
            out = next((u for u in b.attn.v.users if u in nx.descendants(g, b.attn.node)), b.attn.node)
        logit = nx.descendants(g, b.attn.q) & nx.descendants(g, b.attn.k) & (nx.ancestors(g, out) | {out})
        probs = logit & nx.descendants(g, b.attn.node) if b.attn.record.kind == "softmax" else set()
        for node in sorted(qk | logit, key=order.__getitem__):
            if node is b.attn.node and b.attn.record.kind == "sdpa":
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                if is_tensor(mask) and mask not in image:
                    where = "attn_mask" if "attn_mask" in node.kwargs else 3
                    q_shape = shape_of(node.args[0])
                    rank = len(q_shape)
                    shape = q_shape[:-1] + (shape_of(node.args[1])[-2],)
                    use = _use(b, node, where, shape_of(mask), shape, True, heads, lengths, P, rank, additive=True)
                    if use is not None:
                        found.append(use)
                continue
            if not _binary(node):
                continue
            args = node.args[:2]
            if not (len(args) == 2 and all(is_tensor(a) for a in args)):
                continue
            for i, (table, other) in enumerate(((args[0], args[1]), (args[1], args[0]))):
                if table in image or other not in image:
                    continue
                positional = _positional_softmax(table) if node in probs else None
                if positional is not None:  # positional attention: its logits follow the tokens
                    logits, image_shape = shape_of(positional.args[0]), shape_of(other)
                    use = _use(b, positional, 0, logits, image_shape, True, heads, lengths, P, 4, True, masked=True)
                    if use is not None:
                        found.append(use)
                    continue
                use = _use(
                    b,
                    node,
                    i,
                    shape_of(table),
                    shape_of(other),
                    node in logit,
                    heads,
                    lengths,
                    P,
                    len(shape_of(other)),
                    additive=_additive(node),
                    fill=_fill(g, node, other, after_entry),
                )
                if use is not None:
                    found.append(use)
    return found


def _use(
    b: FoundBlock,
    node: fx.Node,
    where: int | str,
    table: tuple[int, ...],
    other: tuple[int, ...],
    logit: bool,
    heads: int,
    lengths: set[int],
    P: int,
    rank: int,
    additive: bool,
    fill: float | None = None,
    masked: bool = False,
) -> FoundPosition | None:
    axes = tuple(
        a for a in _token_axes(other, logit, heads, lengths) if _aligned(table, rank, a) == other[a] and other[a] > 1
    )
    if not axes:
        return None
    return FoundPosition(
        block=b.index,
        node=node,
        where=where,
        axes=axes,
        rank=rank,
        with_prefix=other[axes[0]] == b.num_tokens and P > 0,
        additive=additive,
        fill=fill,
        masked=masked,
    )
