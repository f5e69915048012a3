"""What the PVT and CvT backbones share: weight init and timm's default config."""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["init_linear", "default_cfg"]


def init_linear(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights and zero biases, as both papers initialise."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def default_cfg(url: str = "", **kwargs) -> dict:
    """timm's pretrained config for an ImageNet-1k classifier at 224 px; ``kwargs`` override."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": False,
        **kwargs,
    }
