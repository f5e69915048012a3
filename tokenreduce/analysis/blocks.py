"""Find pre-norm residual blocks around each attention, and the prefix tokens of each stage."""

from __future__ import annotations

import operator

import networkx as nx
import torch.fx as fx

from ..errors import TokenReduceError
from ._found import FoundAttention, FoundBlock
from .constructs import CHANNEL, GRID, add, check_handovers, check_nested, construct, refusal, skipped
from .graph import data_args, data_graph, is_add, is_cat, node_path, shape_of

__all__ = ["find_blocks"]


def _residual_add(g: nx.DiGraph, order: dict, src: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The first add downstream of ``src`` of the form ``entry + f(src)``, with ``entry`` upstream
    of ``src`` (the skip connection). Returns (add, entry)."""
    below = nx.descendants(g, src)
    above = nx.ancestors(g, src)
    for node in sorted((n for n in below if is_add(n)), key=order.__getitem__):
        a, b = node.args[0], node.args[1]
        for skip, branch in ((a, b), (b, a)):
            if skip in above and (branch in below or branch is src):
                return node, skip
    return None


def _mlp_residual(g: nx.DiGraph, order: dict, x1: fx.Node) -> fx.Node | None:
    """The add ``x1 + g(x1)`` that closes the block's second residual branch."""
    below = nx.descendants(g, x1)
    for node in sorted((u for u in x1.users if is_add(u)), key=order.__getitem__):
        other = node.args[1] if node.args[0] is x1 else node.args[0]
        if other in below:
            return node
    return None


def _source_name(node: fx.Node) -> str:
    """The parameter a prefix operand is built from (``expand(cls_token, ...)`` -> 'cls_token')."""
    while node.op != "get_attr":
        args = data_args(node)
        if not args:
            return ""
        node = args[0]
    return str(node.target)


def _leaf_prefix(gm: fx.GraphModule, node: fx.Node) -> tuple[int, bool] | None:
    """The prefix count an opaque embedding module declares (timm's ``num_prefix_tokens``, as on
    NaFlexViT's leaf ``embeds``), for ``node`` = that module's call or an item of its output."""
    if node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0] if node.args[0].op == "call_module" else node
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    count = getattr(module, "num_prefix_tokens", None)
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    return count, count > 0 and getattr(module, "cls_token", None) is not None


def _leading_cut(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, k)`` when ``node`` is ``x[:, :k]`` of a (B, N, C) ``x``: its first ``k`` tokens."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return None
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
        return None
    cut = index[1]
    if not (isinstance(cut, slice) and cut.start in (None, 0) and cut.step in (None, 1) and isinstance(cut.stop, int)):
        return None
    return node.args[0], cut.stop


def _prefix_count(entry: fx.Node, image: set[fx.Node], gm: fx.GraphModule | None = None) -> tuple[int, bool]:
    """Prefix tokens leading the stream at ``entry``, and whether the first is a class token.

    Walk back over token-preserving ops to the ``cat`` that built the sequence and count its
    leading operands that do not depend on the image (class token, distillation token,
    registers). Where the cat also inserts such operands, an operand ``x[:, :k]`` cutting the
    first ``k`` prefix tokens of an earlier stream back out counts as ``k`` prefix tokens too
    (DINOv2 with registers: ``cat(x[:, :1], registers, x[:, 1:])``). The first prefix token is a
    class token when its parameter is named like one (``cls_token``, ``class_token``);
    register-only models (``*_reg4_gap``) have none. No cat: 0.
    """
    n_tokens = shape_of(entry)[1]
    node = entry
    while True:
        if is_cat(node):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim in (1, -2):
                count, cls = 0, False
                inserted = any(p not in image for p in node.args[0])  # registers put in after a prefix
                for i, part in enumerate(node.args[0]):
                    if part in image:  # the prefix of an earlier stream, cut back out (DINOv2 registers)
                        lead = _leading_cut(part) if inserted else None
                        inner = _prefix_count(lead[0], image, gm) if lead else (0, False)
                        if not lead or lead[1] > inner[0]:
                            break
                        count, cls = count + lead[1], cls if i else inner[1]
                        continue
                    if i == 0:
                        first = _source_name(part).rsplit(".", 1)[-1].lower()
                        cls = "cls" in first or "class" in first
                    count += shape_of(part)[1]
                return count, cls and count > 0
        leaf = _leaf_prefix(gm, node) if gm is not None else None
        if leaf is not None:
            return leaf
        same = [
            a
            for a in data_args(node)
            if a in image and (shape_of(a) or (0, 0))[1:2] == (n_tokens,) and len(shape_of(a)) == 3
        ]
        if len(same) != 1:
            return 0, False
        node = same[0]


def find_blocks(gm: fx.GraphModule, attentions: list[FoundAttention]) -> tuple[list[FoundBlock], list[str]]:
    """Group the graph into blocks, one per attention, in execution order.

    Returns the blocks and notes on attention that could not be placed in a block.
    """
    graph = gm.graph
    g = data_graph(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    image = nx.descendants(g, placeholders[0]) | {placeholders[0]}

    notes: list[str] = []
    kinds: dict[str, str] = {}  # construct -> first place it was seen
    batch = (shape_of(placeholders[0]) or (None,))[0]
    inner: dict[int, str] = {}  # windows per image of skipped windowed attention -> where
    raw = []
    for att in attentions:
        where = node_path(att.node) or att.node.name
        kind = construct(att, batch)
        if kind is not None:
            kinds.setdefault(kind, where)
            q = shape_of(att.q) or ()
            if batch and len(q) == 4 and q[0] % batch == 0:
                inner.setdefault(q[0] // batch, where)
            notes.append(f"attention at '{where}' is {kind}: skipped")
            continue
        found = _residual_add(g, order, att.node)
        exit_ = _mlp_residual(g, order, found[0]) if found is not None else None
        if exit_ is None and (named := skipped(g, att, found and found[1], batch)) is not None:
            add(kinds, named, where)  # a construct that fits no block, named for the refusal
        if found is None:
            notes.append(f"attention at '{where}' ({att.node.format_node()}) has no residual add: skipped")
            continue
        x1, entry = found
        if exit_ is None:
            notes.append(f"attention at '{where}' has no second residual (MLP) branch: skipped")
            continue
        shape = shape_of(entry)
        if shape is None or len(shape) != 3:
            notes.append(f"block at '{where}' carries a {shape}-shaped stream, not (B, N, C): skipped")
            if shape is not None and len(shape) == 4:
                kinds.setdefault(GRID, where)
            continue
        if att.record.head_dim == shape[1] and att.record.num_queries != shape[1]:  # XCiT's XCA: (B, H, d, d) logits
            kinds.setdefault(CHANNEL, where)
            notes.append(f"attention at '{where}' is {CHANNEL}: skipped")
            continue
        path = node_path(x1) or where.rsplit(".", 1)[0]
        raw.append((att, x1, entry, exit_, path))

    blocks: list[FoundBlock] = []
    stage, prefix, has_cls = -1, 0, False
    for i, (att, x1, entry, exit_, path) in enumerate(raw):
        if i == 0 or raw[i - 1][3] is not entry:
            stage += 1
            prefix, has_cls = _prefix_count(entry, image, gm)
        shape = shape_of(entry)
        blocks.append(
            FoundBlock(
                index=i,
                path=path,
                stage=stage,
                entry=entry,
                attn=att,
                attn_residual=x1,
                exit=exit_,
                num_prefix=prefix,
                has_class_token=has_cls,
                num_tokens=shape[1],
                dim=shape[2],
            )
        )
    check_handovers(g, blocks, type(gm).__name__)
    check_nested(blocks, inner, type(gm).__name__)
    if not blocks and kinds:
        raise TokenReduceError(refusal(type(gm).__name__, len(attentions), kinds))
    if not blocks:
        raise TokenReduceError(
            f"analyze: no transformer block found in {type(gm).__name__}: found "
            f"{len(attentions)} attention op(s) but none inside a pre-norm residual block "
            f"`x = x + attn(norm(x)); x = x + mlp(norm(x))`. "
            + (
                "Notes: " + "; ".join(notes)
                if notes
                else "No scaled_dot_product_attention call or softmax(q @ k^T) pattern was traced; if "
                "attention is inside a registered leaf module, unregister it."
            )
        )
    return blocks, notes
