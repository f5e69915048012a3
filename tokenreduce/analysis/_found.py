"""What the analysis functions find, with the graph nodes themselves. Internal: ``analyze``
marks these nodes (see :mod:`tokenreduce.anchors`) and returns plain records
(:mod:`.model_map`), so no node handle outlives the analysis."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .model_map import Attention

__all__ = ["FoundAttention", "FoundBlock", "FoundToGrid", "FoundFromGrid"]


@dataclass(frozen=True)
class FoundAttention:
    """One self-attention: ``record`` the plain description (its ``node`` named), ``node`` the sdpa
    call or the softmax itself; q, k (B, H, N, d) nodes and v (None when no ``probs @ v`` was seen)."""

    record: Attention
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node | None


@dataclass(frozen=True)
class FoundBlock:
    """``x1 = entry + f(attn(...)); exit = x1 + g(x1)`` and what describes it."""

    index: int
    path: str
    stage: int
    entry: fx.Node
    attn: FoundAttention
    attn_residual: fx.Node
    exit: fx.Node
    num_prefix: int
    has_class_token: bool
    num_tokens: int
    dim: int


@dataclass(frozen=True)
class FoundToGrid:
    """``src`` (B, n, C) tokens laid on an H x W grid by the chain starting at ``head``."""

    src: fx.Node
    head: fx.Node
    stage: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class FoundFromGrid:
    """``node`` (B, H * W, C): tokens computed on the grid of to-grid number ``source``."""

    node: fx.Node
    source: int
    stage: int
