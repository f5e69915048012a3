"""Analyze: read a captured graph and describe it as a :class:`ModelMap`.

The description is plain data; the nodes a rewrite needs are marked in the graph itself
(:mod:`tokenreduce.anchors`), which is the only thing analysis writes (into ``node.meta``).
"""

from __future__ import annotations

import operator
from dataclasses import fields
from typing import TypeVar

import networkx as nx
import torch.fx as fx

from ..anchors import mark
from ..errors import TokenReduceError
from ._found import FoundBlock
from .attention import find_attention
from .blocks import find_blocks
from .constructs import CLASS, construct, opaque_attention, refusal, unrecognised
from .graph import data_args, data_graph, shape_of
from .model_map import Attention, Block, FromGrid, KeyReader, ModelMap, Position, ToGrid
from .positions import find_positions
from .spatial import find_spatial

__all__ = ["analyze", "Attention", "Block", "ModelMap", "Position", "ToGrid", "FromGrid", "KeyReader"]

R = TypeVar("R")


def _final_tokens(last_exit: fx.Node) -> fx.Node:
    """The final tokens: the last block's output after the shape-preserving ops (the final norm)
    that are its only consumer, before pooling changes the shape."""
    node = last_exit
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or shape_of(user) != shape_of(node):
            break
        node = user
    return node


def _positions(gm: fx.GraphModule, g: nx.DiGraph, found: list[FoundBlock]) -> list:
    image_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    image = nx.descendants(g, image_input) | {image_input}
    return find_positions(gm.graph, g, image, found)


def _key_readers(g: nx.DiGraph, attentions: list, found: list[FoundBlock], batch: int) -> list:
    """Attention after the last block whose few queries, the leading tokens of its keys (a class
    token put in front), read the last block's tokens as keys: CaiT's class attention. (A pooling
    head's learned query is not a token of the stream: not one of these.)"""
    stream = nx.descendants(g, found[-1].exit) | {found[-1].exit}
    inside = {b.attn.node for b in found}
    return [
        a
        for a in attentions
        if a.node not in inside and a.k in stream and construct(a, batch) == CLASS and _leading_query(g, a.q, a.k)
    ]


def _leading_query(g: nx.DiGraph, q: fx.Node, k: fx.Node, depth: int = 12) -> bool:
    """Whether ``q`` is computed from the leading token(s) ``t[:, 0]`` / ``t[:, :m]`` of a tensor
    ``t`` that ``k`` is computed from (query i is key i), through one-tensor ops (projections,
    reshapes)."""
    node = q
    for _ in range(depth):
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            index = node.args[1]
            if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None):
                lead = index[1] == 0 or (
                    isinstance(index[1], slice) and index[1].start in (None, 0) and index[1].step in (None, 1)
                )
                return lead and k in nx.descendants(g, node.args[0])
        inputs = data_args(node)
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def _record(cls: type[R], found: object, **given: object) -> R:
    """The plain ``cls`` record (:mod:`.model_map`) of ``found``: each field copied from the
    attribute of that name, except those ``given``."""
    return cls(**{f.name: getattr(found, f.name) for f in fields(cls) if f.name not in given}, **given)


def _mark_block(b: FoundBlock) -> Block:
    for role, node in (
        ("entry", b.entry),
        ("attn", b.attn.node),
        ("q", b.attn.q),
        ("k", b.attn.k),
        ("attn_residual", b.attn_residual),
        ("exit", b.exit),
    ):
        mark(node, role, b.index)
    if b.attn.v is not None:
        mark(b.attn.v, "v", b.index)
    return _record(Block, b, attn=b.attn.record)


def analyze(gm: fx.GraphModule, example_shape: tuple[int, ...], model_name: str) -> ModelMap:
    """Find blocks, attention and prefix tokens in ``gm`` (which capture() annotated) and mark
    their nodes. Returns the plain description."""
    attentions = find_attention(gm.graph)
    opaque = opaque_attention(gm)
    if not attentions:
        count, kinds = unrecognised(gm, example_shape)
        if kinds:  # attention in a construct tokenreduce does not serve: name it
            raise TokenReduceError(refusal(model_name, count, kinds))
        hint = (
            f"Its attention modules {', '.join(opaque[:3])}{' ...' if len(opaque) > 3 else ''} are opaque "
            f"to tracing (registered as leaf modules, e.g. by timm because they branch on the input size): "
            f"tokenreduce cannot see inside them."
            if opaque
            else "Check that the attention module is not registered as a leaf; attention in another layout "
            "(a talking-heads conv between the logits and the softmax, factorized or linear attention, "
            "keys laid out other than (B, H, N, d)) is not recognised."
        )
        raise TokenReduceError(
            f"analyze: no attention found in {model_name}: tokenreduce looks for "
            f"F.scaled_dot_product_attention calls and softmax(q @ k.transpose(-2, -1)) patterns. " + hint
        )
    found, notes = find_blocks(gm, attentions)
    notes = [*notes, *(f"attention module {m} is opaque to tracing (a leaf): its block is not reduced" for m in opaque)]
    to_grid, from_grid = find_spatial(gm, tuple(found))
    blocks = tuple(_mark_block(b) for b in found)
    for i, t in enumerate(to_grid):
        mark(t.head, "to_grid", i)
    for i, f in enumerate(from_grid):
        mark(f.node, "from_grid", i)
    g = data_graph(gm.graph)  # tensor data edges, for positions and key readers
    positions = []
    for i, p in enumerate(_positions(gm, g, found)):
        mark(p.node, "position", i)
        positions.append(_record(Position, p, node=p.node.name))
    readers = []
    for i, a in enumerate(_key_readers(g, attentions, found, example_shape[0])):
        mark(a.node, "key_reader", i)
        readers.append(KeyReader(node=a.node.name, kind=a.record.kind))
    tokens = _final_tokens(found[-1].exit)
    final = shape_of(tokens)
    final_tokens = None
    if final is not None and len(final) == 3:
        mark(tokens, "tokens", 0)
        final_tokens = tuple(final[1:])
    return ModelMap(
        model_name=model_name,
        blocks=blocks,
        example_shape=tuple(example_shape),
        notes=tuple(notes),
        to_grid=tuple(ToGrid(stage=t.stage, grid=t.grid) for t in to_grid),
        from_grid=tuple(FromGrid(source=f.source, stage=f.stage) for f in from_grid),
        final_tokens=final_tokens,
        positions=tuple(positions),
        key_readers=tuple(readers),
    )
