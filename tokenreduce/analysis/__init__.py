"""Analyze: read a captured graph and describe it as a :class:`ModelMap` (read-only)."""

from __future__ import annotations

import torch.fx as fx

from ..errors import TokenReduceError
from .attention import find_attention
from .blocks import find_blocks
from .model_map import Attention, Block, ModelMap
from .spatial import FromGrid, ToGrid, find_spatial

__all__ = ["analyze", "Attention", "Block", "ModelMap", "ToGrid", "FromGrid"]


def analyze(gm: fx.GraphModule, example_shape: tuple[int, ...], model_name: str) -> ModelMap:
    """Find blocks, attention and prefix tokens in ``gm`` (which capture() annotated)."""
    attentions = find_attention(gm.graph)
    if not attentions:
        raise TokenReduceError(
            f"analyze: no attention found in {model_name}: tokenreduce looks for "
            f"F.scaled_dot_product_attention calls and softmax(q @ k.transpose(-2, -1)) patterns. "
            f"Check that the attention module is not registered as a leaf, or that the model is "
            f"a vision transformer."
        )
    blocks, notes = find_blocks(gm, attentions)
    to_grid, from_grid = find_spatial(gm, tuple(blocks))
    return ModelMap(model_name=model_name, blocks=tuple(blocks), example_shape=tuple(example_shape),
                    notes=tuple(notes), to_grid=to_grid, from_grid=from_grid)
