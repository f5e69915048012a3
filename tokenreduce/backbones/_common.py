"""What the backbones share: weight init, timm's default config, the pieces of their blocks
(token embedding, attention bookkeeping, pre-norm block, MLP) and the class-token classifier."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg
from torch import nn

__all__ = [
    "Attention",
    "AttentionBase",
    "ClassTokenHead",
    "ConvEmbed",
    "Mlp",
    "PreNormBlock",
    "QuickGELU",
    "TokenStage",
    "build",
    "check_global_pool",
    "default_cfg",
    "init_linear",
    "stage_drop_path_rates",
]


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


class ConvEmbed(nn.Module):
    """Conv token embedding followed by a norm (PVT's non-overlapping patches, CvT's overlapping ones).

    ``(B, C_in, H_in, W_in) -> ((B, H*W, C), H, W)``, ``H, W`` read from the conv output's shape.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        stride: int,
        padding: int = 0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=padding, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)  # (B, C, H, W)
        H, W = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return self.norm(x), H, W


class AttentionBase(nn.Module):
    """Head bookkeeping and the attention product of the backbones' multi-head attentions.

    Sets ``num_heads``, ``head_dim`` (``dim // num_heads`` unless given), ``scale`` (``head_dim **
    -0.5`` unless given) and ``fused_attn``; a subclass builds its projections, then calls
    :meth:`_output_layers` (``attn_drop``, ``proj``, ``proj_drop``, registered last) and, in its
    forward, :meth:`attend` on its (B, h, N, d) heads.
    """

    fused_attn: torch.jit.Final[bool]
    takes_head_dim = False  # whether the subclass's constructor offers ``head_dim`` (error message)

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, scale: Optional[float] = None):
        super().__init__()
        if head_dim is None and dim % num_heads:
            hint = ", or pass head_dim" if self.takes_head_dim else ""
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}){hint}")
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5 if scale is None else scale
        self.fused_attn = use_fused_attn()

    def _output_layers(self, dim: int, attn_drop: float, proj_drop: float, dd: dict) -> None:
        """Attention dropout and the output projection ``Linear(num_heads * head_dim, dim)``."""
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.num_heads * self.head_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T * scale) v``: (B, h, Nq, d) queries, (B, h, Nkv, d) keys and values ->
        (B, h, Nq, d); the fused kernel when ``fused_attn``, else the explicit product."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, Nq, Nkv)
        return self.attn_drop(attn.softmax(dim=-1)) @ v  # (B, h, Nq, d)


class Attention(AttentionBase):
    """Multi-head self-attention with one qkv Linear, (B, N, C) -> (B, N, C) (LV-ViT's, PS-ViT's);
    ``head_dim`` may differ from C / heads, ``scale`` defaults to ``head_dim ** -0.5``."""

    takes_head_dim = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        scale: Optional[float] = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(dim, num_heads, head_dim, scale)
        dd = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, self.num_heads * self.head_dim * 3, bias=qkv_bias, **dd)
        self._output_layers(dim, attn_drop, proj_drop, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, d)
        x = self.attend(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class PreNormBlock(nn.Module):
    """Pre-norm transformer block around a given attention module, (B, N, C) -> (B, N, C)::

        x = x + drop_path1(attn(norm1(x), *grid))
        x = x + drop_path2(mlp(norm2(x)))

    ``grid`` is what the attention takes after the tokens (``H, W`` for PVT and CvT, none for
    plain self-attention). ``mlp`` is ``Mlp(dim, dim * mlp_ratio, act_layer, proj_drop)``.
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, *grid) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), *grid))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class TokenStage(nn.Module):
    """A PVT / CvT stage: conv token embedding, class token in front (when ``cls_token`` is set),
    position embedding (:meth:`_pos_embed`, none here), dropout, blocks fed ``(x, H, W)``.

    ``(B, C_in, H_in, W_in) -> ((B, P + H*W, C), H, W)`` where ``P = num_prefix_tokens``. A
    subclass sets ``patch_embed``, ``cls_token`` (a parameter or None), ``pos_drop`` and ``blocks``.
    """

    def _pos_embed(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor):
        x, H, W = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        x = self.pos_drop(self._pos_embed(x, H, W))
        for blk in self.blocks:
            x = blk(x, H, W)
        return x, H, W


def build(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable, locs=None, **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg`` with ``filter_fn`` mapping official checkpoints; ``locs``
    (module paths), when given, become the model's ``default_reduction_locs``."""
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    if locs is not None:
        model.default_reduction_locs = tuple(locs)
    return model


def check_global_pool(global_pool: str) -> str:
    """``global_pool`` itself if it is "token" or "" (the pools the class-token backbones offer)."""
    if global_pool not in ("token", ""):
        raise ValueError(f"global_pool must be 'token' or '' (got {global_pool!r})")
    return global_pool


class ClassTokenHead:
    """timm's classifier interface for a backbone whose ``forward_features`` returns normalised
    (B, 1 + N, C) tokens with the class token first. The host module defines ``head``,
    ``head_drop``, ``norm``, ``num_features``, ``num_classes``, ``global_pool`` ("token" or "")."""

    def _init_classifier(self, num_classes: int, global_pool: str, num_features: int) -> None:
        """Check ``global_pool`` and set the classifier attributes (one class token in front)."""
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool)
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = num_features

    def _init_head(self, norm: nn.Module, drop_rate: float, device=None, dtype=None) -> None:
        """The final ``norm``, ``head_drop`` and ``head`` (see :meth:`_classifier`)."""
        self.norm = norm
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._classifier(self.num_classes, device, dtype)

    def _classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        """``Linear(num_features, num_classes)``, ``Identity`` for ``num_classes == 0``."""
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stages\.0\.patch_embed", blocks=r"^stages\.(\d+)")

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        ref = self.norm.weight
        self.head = self._classifier(num_classes, ref.device, ref.dtype)

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
