"""The ModelMap: what analysis found in a traced model, as plain typed records.

Plain data only (names, ints, shapes): it pickles, and it cannot go stale when a pass rewrites
the graph. The passes find their nodes by the marks analysis left (:mod:`tokenreduce.anchors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Attention", "Block", "ModelMap", "Position", "ToGrid", "FromGrid"]


@dataclass(frozen=True)
class Attention:
    """One self-attention in the graph.

    ``kind`` is ``"sdpa"`` (a ``scaled_dot_product_attention`` call) or ``"softmax"`` (an
    explicit ``softmax(q @ k^T * scale)``, whose output holds the probabilities); ``node`` names
    that node as analysis saw it (for messages). ``scale`` is the logit scale (None for sdpa's
    default ``d ** -0.5``).
    """

    kind: str
    node: str
    scale: float | None
    num_heads: int
    head_dim: int
    num_queries: int
    num_keys: int

    @property
    def full_keys(self) -> bool:
        """Keys are the token sequence itself (not a spatially reduced copy)."""
        return self.num_queries == self.num_keys


@dataclass(frozen=True)
class Block:
    """A pre-norm residual block: ``x1 = entry + f(attn(...)); exit = x1 + g(x1)`` (the graph
    marks ``entry``, ``attn_residual`` (x1) and ``exit`` with this block's index).

    ``index`` counts blocks over the whole model in execution order; ``stage`` numbers the runs
    of consecutive blocks that share one token stream (a plain ViT has one stage; PVT has four).
    ``num_prefix`` is the count of prefix tokens (class, distillation, registers) leading the
    stream, the first of them the class token when ``has_class_token``; ``num_tokens`` the full
    sequence length N of the example input.
    """

    index: int
    path: str
    stage: int
    attn: Attention
    num_prefix: int
    has_class_token: bool
    num_tokens: int
    dim: int

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


@dataclass(frozen=True)
class ToGrid:
    """Tokens of ``stage`` laid on an H x W ``grid`` by a spatial operator (graph mark
    ``("to_grid", i)`` for the i-th of the model map's ``to_grid``)."""

    stage: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class FromGrid:
    """Tokens computed on the grid of ``to_grid[source]`` flowing back into ``stage``'s stream
    (graph mark ``("from_grid", i)``)."""

    source: int
    stage: int


@dataclass(frozen=True)
class Position:
    """A position-indexed tensor (rotary table, relative position bias, positional attention)
    meeting block ``block``'s queries, keys or logits (graph mark ``("position", i)`` on the node
    ``node`` that reads it, for the i-th of the model map's ``positions``). ``where`` is the
    node's argument holding the table (an index, or a keyword such as ``attn_mask``); ``axes`` its
    token axes in the image operand's ``rank``; ``with_prefix`` when those axes cover the prefix
    tokens too; ``additive`` for a bias, False for a factor (rotary); ``fill`` the row a token
    without position (EViT's fused token) takes: None for the mean row/column, else this value
    (1 for ``cos``, 0 for the ``sin`` of a rotated copy: no rotation); ``masked`` when ``node`` is
    a positional softmax mixed into the attention's probabilities (ConViT), which the training
    policy masks as it masks the attention."""

    block: int
    node: str
    where: int | str
    axes: tuple[int, ...]
    rank: int
    with_prefix: bool
    additive: bool
    fill: float | None = None
    masked: bool = False


@dataclass(frozen=True)
class KeyReader:
    """Attention after the last block whose few queries (the class token, the first of its keys)
    read the token stream as keys (CaiT's class-attention blocks; graph mark ``("key_reader",
    i)``): not a block, but in the training form of learned scorers its keys must be masked by
    the policy too.
    ``kind`` "sdpa" or "softmax" (the node is the sdpa call or the softmax)."""

    node: str
    kind: str


@dataclass(frozen=True)
class ModelMap:
    """Everything the planner and the passes need to know about a traced model."""

    model_name: str
    blocks: tuple[Block, ...]
    example_shape: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())
    to_grid: tuple[ToGrid, ...] = field(default=())
    from_grid: tuple[FromGrid, ...] = field(default=())
    final_tokens: tuple[int, ...] | None = None  # (N, C) of the final tokens before pooling, if found
    positions: tuple[Position, ...] = field(default=())
    key_readers: tuple[KeyReader, ...] = field(default=())

    def block(self, index: int) -> Block:
        return self.blocks[index]

    def stream_stages(self, stage: int) -> tuple[int, ...]:
        """``stage`` and the earlier stages whose token stream it continues, latest first: a stage
        follows on from the one before unless that one lays its tokens on a grid (PVT, CvT). A
        stage entered by inserting a class token (ConViT's blocks after ``local_up_to_layer``)
        carries the tokens of the one before, and what a site there removed."""
        grids = {g.stage for g in self.to_grid}
        out = [stage]
        while out[-1] > 0 and out[-1] - 1 not in grids:
            out.append(out[-1] - 1)
        return tuple(out)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(b.path for b in self.blocks)

    def table(self) -> str:
        """A fixed-width table: one row per block."""
        head = ("#", "block", "stage", "attention", "heads", "tokens", "prefix", "cls", "dim", "sites")
        rows = [head]
        for b in self.blocks:
            sites = ["before"]
            if b.has_class_token and b.attn.full_keys:
                sites.append("after-attn")
            rows.append(
                (
                    str(b.index),
                    b.path,
                    str(b.stage),
                    b.attn.kind,
                    str(b.attn.num_heads),
                    str(b.num_tokens),
                    str(b.num_prefix),
                    "yes" if b.has_class_token else "no",
                    str(b.dim),
                    "/".join(sites),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = f"{self.model_name}: {len(self.blocks)} blocks, input {self.example_shape}"
        if self.to_grid:
            title += f", {len(self.to_grid)} spatial site(s), {len(self.from_grid)} grid return(s)"
        if self.positions:
            title += f", {len(self.positions)} position-indexed table use(s) (rotary / relative bias)"
        return "\n".join([title, *lines, *self.notes])

    __str__ = table

    def __repr__(self) -> str:
        return self.table()
