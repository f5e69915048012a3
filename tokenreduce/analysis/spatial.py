"""Find spatial sites: where the token stream is laid back on its H x W grid, and where tokens
computed on that grid flow back into the stream.

* ``ToGrid``: a (B, N, C) token tensor reshaped to a (B, C, H, W) grid (``x.transpose(1, 2)
  .reshape(B, C, H, W)`` or a permute/view spelling, N == H * W, H, W > 1): PVT's
  spatial-reduction conv, CvT's convolutional projection, PVT-v2's depthwise-conv MLP, the next
  stage's patch embedding, a final feature map.
* ``FromGrid``: a grid flattened back to (B, H * W, C) tokens at the same resolution that flows
  into the same stage's stream (CvT's query projection, PVT-v2's MLP). Lower-resolution results
  (spatially reduced keys, the next stage) are not.

No per-model code: both are found by shape and data flow.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._found import FoundBlock, FoundFromGrid, FoundToGrid
from .graph import data_args, data_graph, shape_of

__all__ = ["find_spatial"]

_LAYOUT_METHODS = {"transpose", "permute", "contiguous", "reshape", "view", "flatten"}
_LAYOUT_FNS = {torch.transpose, torch.permute, torch.reshape, torch.flatten}
_SPATIAL_MODULES = (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_SPATIAL_FNS = {F.conv2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.interpolate}


def _is_layout(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
        node.op == "call_function" and node.target in _LAYOUT_FNS
    )


def _is_spatial(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _SPATIAL_MODULES)
    return node.op == "call_function" and node.target in _SPATIAL_FNS


def _stage_of(node: fx.Node, blocks: tuple[FoundBlock, ...], order: dict) -> int:
    """The stage of the last block whose entry precedes ``node`` (-1: before every block)."""
    stage = -1
    for b in blocks:
        if order[b.entry] <= order[node]:
            stage = b.stage
    return stage


def find_spatial(
    gm: fx.GraphModule, blocks: tuple[FoundBlock, ...]
) -> tuple[tuple[FoundToGrid, ...], tuple[FoundFromGrid, ...]]:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    dg = data_graph(graph)
    image = nx.descendants(dg, next(n for n in graph.nodes if n.op == "placeholder"))
    to_grid: list[FoundToGrid] = []
    for node in graph.nodes:
        shape = shape_of(node)
        if shape is None or len(shape) != 4 or not _is_layout(node):
            continue
        if any(_is_layout(u) and len(shape_of(u) or ()) == 4 for u in node.users):
            continue  # (B, H, W, C) on its way to (B, C, H, W): take the last grid of the chain
        # walk back over layout ops to the (B, N, C) tokens
        chain = [node]
        while True:
            args = data_args(chain[-1])
            if len(args) != 1 or not _is_layout(args[0]):
                break
            chain.append(args[0])
        src = data_args(chain[-1])
        src_shape = shape_of(src[0]) if len(src) == 1 else None
        if src_shape is None or len(src_shape) != 3 or src[0] not in image:
            continue  # not tokens, or a parameter laid on a grid (position-embedding resampling)
        h, w = (shape[2], shape[3]) if shape[1] == src_shape[2] else (shape[1], shape[2])
        # any consumer counts (conv, pooling, a mean over H, W): a reduced sequence cannot be laid
        # on the grid without padding. H, W > 1 rules out one-head (B, N, 1, d) reshapes.
        if h * w != src_shape[1] or h == 1 or w == 1:
            continue
        if _stage_of(src[0], blocks, order) < 0:
            continue  # the stem, before any block
        to_grid.append(FoundToGrid(src=src[0], head=chain[-1], stage=_stage_of(src[0], blocks, order), grid=(h, w)))

    below = [nx.descendants(dg, t.head) for t in to_grid]
    stage_exit = {b.stage: b.exit for b in blocks}
    from_grid: list[FoundFromGrid] = []
    for node in graph.nodes:
        shape = shape_of(node)
        if shape is None or len(shape) != 3 or not _is_layout(node) or any(_is_layout(u) for u in node.users):
            continue
        for i in reversed(range(len(to_grid))):  # the nearest grid upstream
            t = to_grid[i]
            exit_ = stage_exit[t.stage]
            if (
                node in below[i]
                and shape[1] == t.grid[0] * t.grid[1]
                and order[node] < order[exit_]
                and exit_ in nx.descendants(dg, node)
                and _is_layout_from_grid(gm, node)
            ):
                from_grid.append(FoundFromGrid(node=node, source=i, stage=t.stage))
                break
    return tuple(to_grid), tuple(from_grid)


def _is_layout_from_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` (B, N, C) ends a chain of layout ops that starts at a (B, C, H, W) or (B, H, W, C)
    grid, H * W == N, computed by a module or a spatial op (not attention's (B, heads, N, d)
    output, which with one head has the same shape as a channels-last grid)."""
    n, c = shape_of(node)[1:]
    cur = node
    while _is_layout(cur):
        args = data_args(cur)
        if len(args) != 1:
            return False
        cur = args[0]
        shape = shape_of(cur) or ()
        if len(shape) == 4:
            made_by_op = cur.op == "call_module" or _is_spatial(gm, cur)
            grid = (shape[1] == c and shape[2] * shape[3] == n) or (shape[3] == c and shape[1] * shape[2] == n)
            return made_by_op and grid
    return False
