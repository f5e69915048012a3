"""A picture of what a reduced model kept, dropped and squeezed, as in the TPS paper's Fig. 2.

One panel for the input, then one per site: patches that were dropped (pruning, or fused into
EViT's extra token) are blanked; every squeeze group (a kept host and the pruned tokens it
absorbed) gets its own colour; a kept token that absorbed nothing is shown as it is.
"""

from __future__ import annotations

import colorsys
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import TokenReduceError
from .reduced import ReducedModel

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["visualize", "preprocess", "group_colours"]

BLANK = (255, 255, 255)
MIN_PANEL = 224  # small inputs (28 px digits) are enlarged to at least this, nearest-neighbour


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - the vis extra
        raise ImportError("tokenreduce.visualize needs Pillow: pip install 'tokenreduce[vis]'") from err
    return Image


def preprocess(reduced: ReducedModel, image) -> Tensor:
    """A PIL image or a path -> the (1, C, H, W) batch the model takes, through timm's data
    config of the model (resize, crop, normalisation) at the size ``apply`` traced with."""
    from timm.data import create_transform, resolve_data_config

    Image = _pil()
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    shape = reduced.reduction.example_shape
    cfg = resolve_data_config({"input_size": tuple(shape[1:])}, model=reduced)
    image = image.convert("L" if shape[1] == 1 else "RGB")
    return create_transform(**cfg)(image).unsqueeze(0)


def group_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated colours (golden-ratio hues), none of them white."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _grid(n: int, height: int, width: int) -> tuple[int, int]:
    gh = round(math.sqrt(n * height / width))
    if gh < 1 or n % gh:
        raise TokenReduceError(f"visualize: {n} patch tokens do not tile a {height} x {width} image")
    return gh, n // gh


def _display(x: Tensor, reduced: ReducedModel) -> Tensor:
    """(1, C, H, W) normalised input -> (H, W, 3) uint8 for display."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({"input_size": tuple(x.shape[1:])}, model=reduced)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).reshape(-1, 1, 1)[: x.shape[1]]
    std = torch.tensor(cfg["std"], dtype=torch.float32).reshape(-1, 1, 1)[: x.shape[1]]
    img = (x[0].float().cpu() * std + mean).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img[:3].permute(1, 2, 0) * 255).round().to(torch.uint8)


def _panel(base: Tensor, hosts: Tensor, grid: tuple[int, int], alpha: float) -> Tensor:
    """Colour one site's groups onto ``base`` (H, W, 3): hosts (n_ref,) original positions or -1."""
    gh, gw = grid
    H, W = base.shape[:2]
    ph, pw = H // gh, W // gw
    out = base.float().clone()
    sizes = torch.bincount(hosts[hosts >= 0], minlength=hosts.numel())
    groups = [int(h) for h in torch.nonzero(sizes > 1)[:, 0]]
    colour = dict(zip(groups, group_colours(len(groups))))
    for p, h in enumerate(hosts.tolist()):
        r, c = divmod(p, gw)
        cell = out[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
        if h < 0:
            cell[:] = torch.tensor(BLANK, dtype=torch.float32)
        elif h in colour:
            cell.mul_(1 - alpha).add_(alpha * torch.tensor(colour[h], dtype=torch.float32))
    return out.round().to(torch.uint8)


def visualize(reduced: ReducedModel, image, *, alpha: float = 0.6) -> Image.Image:
    """Render what ``reduced`` does to ``image`` (a PIL image, a path, or a (1, C, H, W) batch the
    model takes): the input, then one panel per site, side by side. ``alpha``: how strongly a
    group's colour covers its patches (1: solid).

    The model must have been applied with ``aux=True`` (the host maps are an aux output); it is
    run once in eval mode, without gradients.
    """
    if not isinstance(reduced, ReducedModel):
        raise TypeError(f"visualize: expected a module returned by tokenreduce.apply, got {type(reduced).__name__}")
    if not reduced.reduction.aux:
        raise TokenReduceError(
            "visualize: the model was applied without aux=True, so it does not report which "
            "host absorbed which token; apply again with aux=True"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"visualize: alpha must be in [0, 1], got {alpha}")
    Image = _pil()
    x = image if isinstance(image, Tensor) else preprocess(reduced, image)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"visualize: expected one image as a (1, C, H, W) batch, got shape {tuple(x.shape)}")
    param = next(reduced.parameters())
    was_training = reduced.training
    reduced.eval()
    try:
        with torch.no_grad():
            _, aux = reduced(x.to(param.device, param.dtype))
    finally:
        reduced.train(was_training)
    base = _display(x, reduced)
    scale = max(1, math.ceil(MIN_PANEL / min(base.shape[:2])))
    base = base.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    panels = [base]
    for site, hosts in zip(reduced.reduction.plan.sites, aux.hosts):
        grid = _grid(hosts.shape[1], *base.shape[:2])
        panels.append(_panel(base, hosts[0].cpu(), grid, alpha))
    gap = torch.full((base.shape[0], 4, 3), 255, dtype=torch.uint8)
    row = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=1)
    return Image.fromarray(row.numpy())
