"""What the PVT and CvT backbones share: weight init and timm's default config."""

from __future__ import annotations

from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["init_linear", "default_cfg", "ClassTokenHead", "Mlp", "QuickGELU", "stage_drop_path_rates"]


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop, (B, N, C) -> (B, N, C); timm's Mlp layout (same state-dict
    keys) with factory kwargs, which timm's own Mlp takes only in recent releases."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# Both below are in recent timm.layers, not in timm 1.0.x (which this package supports).
class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation CvT's released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def stage_drop_path_rates(rate: float, depths: list[int]) -> list[list[float]]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over all blocks, split by stage."""
    return [x.tolist() for x in torch.linspace(0, rate, sum(depths)).split(depths)]


class ClassTokenHead:
    """timm's classifier interface for a backbone whose ``forward_features`` returns normalised
    (B, 1 + N, C) tokens with the class token first. The host module defines ``head``,
    ``head_drop``, ``norm``, ``num_features``, ``num_classes``, ``global_pool`` ("token" or "")."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stages\.0\.patch_embed", blocks=r"^stages\.(\d+)")

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", ""):
                raise ValueError(f"global_pool must be 'token' or '' (got {global_pool!r})")
            self.global_pool = global_pool
        ref = self.norm.weight
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]  # class token
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
