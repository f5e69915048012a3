"""The ModelMap: what analysis found in a traced model, as plain typed records."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

__all__ = ["Attention", "Block", "ModelMap"]


@dataclass(frozen=True)
class Attention:
    """One self-attention in the graph.

    ``kind`` is ``"sdpa"`` (a ``scaled_dot_product_attention`` call: ``node`` is that call) or
    ``"softmax"`` (an explicit ``softmax(q @ k^T * scale)``: ``node`` is the softmax, whose
    output holds the probabilities). ``q`` and ``k`` are (B, H, N, d) nodes; ``scale`` is the
    logit scale (None for sdpa's default ``d ** -0.5``).
    """

    kind: str
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node | None
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
    """A pre-norm residual block: ``x1 = entry + f(attn(...)); exit = x1 + g(x1)``.

    ``index`` counts blocks over the whole model in execution order; ``stage`` numbers the runs
    of consecutive blocks that share one token stream (a plain ViT has one stage; PVT has four).
    ``num_prefix`` is the count of prefix tokens (class, distillation, registers) leading the
    stream, the first of them the class token when ``has_class_token``; ``num_tokens`` the full
    sequence length N of the example input.
    """

    index: int
    path: str
    stage: int
    entry: fx.Node
    attn: Attention
    attn_residual: fx.Node
    exit: fx.Node
    num_prefix: int
    has_class_token: bool
    num_tokens: int
    dim: int

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


@dataclass(frozen=True)
class ModelMap:
    """Everything the planner and the passes need to know about a traced model."""

    model_name: str
    blocks: tuple[Block, ...]
    example_shape: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())
    to_grid: tuple = field(default=())  # analysis.spatial.ToGrid
    from_grid: tuple = field(default=())  # analysis.spatial.FromGrid

    def block(self, index: int) -> Block:
        return self.blocks[index]

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
                    str(b.index), b.path, str(b.stage), b.attn.kind, str(b.attn.num_heads),
                    str(b.num_tokens), str(b.num_prefix), "yes" if b.has_class_token else "no",
                    str(b.dim), "/".join(sites),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = f"{self.model_name}: {len(self.blocks)} blocks, input {self.example_shape}"
        if self.to_grid:
            title += f", {len(self.to_grid)} spatial site(s), {len(self.from_grid)} grid return(s)"
        return "\n".join([title, *lines, *self.notes])

    __str__ = table

    def __repr__(self) -> str:
        return self.table()
