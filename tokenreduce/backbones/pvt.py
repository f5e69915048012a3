"""Pyramid Vision Transformer (PVT v1), written to be traced and rewritten with torch.fx.

Paper: Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction
without Convolutions", ICCV 2021. https://arxiv.org/abs/2102.12122

Layout at 224 px (all variants share widths; they differ in depth only)::

    stage  patch embed   grid    dim  heads  sr  mlp   tokens
    1      4x4 / 4       56x56    64    1    8    8    3136
    2      2x2 / 2       28x28   128    2    4    8     784
    3      2x2 / 2       14x14   320    5    2    4     196
    4      2x2 / 2        7x7    512    8    1    4      49 + class token

Graph conventions the token-reduction passes rely on:

* tokens between blocks are ``(B, N, C)`` sequences; the class token (stage 4 only) comes first;
* every spatial op (the SR conv, the next stage's patch embed) is fed by
  ``x.transpose(1, 2).reshape(B, C, H, W)`` directly, with ``H, W`` read from the shape of the
  stage's patch-embed conv output, never from ``N``;
* blocks are pre-norm residuals: ``x = x + drop_path(attn(norm1(x), H, W))`` then the MLP.
"""

from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._common import (
    AttentionBase,
    ClassTokenHead,
    ConvEmbed,
    PreNormBlock,
    TokenStage,
    build,
    init_linear,
    stage_drop_path_rates,
)
from ._common import default_cfg as _cfg
from .checkpoint import checkpoint_filter_fn

__all__ = ["PyramidVisionTransformer"]


class SpatialReductionAttention(AttentionBase):
    """Multi-head attention whose keys/values come from a spatially reduced grid (SRA).

    ``q = Linear(x)``; if ``sr_ratio > 1`` the tokens are laid out on their ``(H, W)`` grid,
    reduced by a ``sr_ratio x sr_ratio`` conv of the same stride and LayerNorm-ed before
    ``kv = Linear(.)``. Input and output ``(B, N, C)``; with ``sr_ratio > 1`` the input must hold
    exactly the ``H*W`` grid tokens (no prefix tokens).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(dim, num_heads)
        dd = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self._output_layers(dim, attn_drop, proj_drop, dd)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``x``: (B, N, C) with N == H*W when ``sr`` is set. Returns (B, N, C)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        if self.sr is not None:
            x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
            x = self.sr(x).flatten(2).transpose(1, 2)  # (B, H/sr * W/sr, C)
            x = self.norm(x)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, h, M, d)
        x = self.attend(q, k, v).transpose(1, 2).reshape(B, N, C)  # (B, h, N, d) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class PvtStage(TokenStage):
    """Patch embed, optional class token, learned absolute position embedding, blocks.

    ``(B, C_in, H_in, W_in) -> ((B, P + H*W, C), H, W)`` where ``P = num_prefix_tokens``.
    ``pos_embed`` is ``(1, P + gh*gw, C)`` for the default grid ``grid_size = (gh, gw)``; with
    ``dynamic_img_size`` its grid part is bilinearly resampled to the runtime ``(H, W)``, which
    is an exact copy when ``(H, W) == grid_size``.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        patch_size: int,
        grid_size: Tuple[int, int],
        class_token: bool = False,
        dynamic_img_size: bool = True,
        qkv_bias: bool = True,
        pos_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if class_token and sr_ratio > 1:
            raise ValueError(f"class_token=True needs sr_ratio == 1 (got {sr_ratio}): the SR conv only sees the grid")
        self.grid_size = tuple(grid_size)
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_size, **dd)  # LayerNorm eps as released
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **dd)) if class_token else None
        num_pos = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.0] * depth
        drops = dict(attn_drop=attn_drop, proj_drop=proj_drop)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                dim,
                SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, **drops, **dd),
                mlp_ratio,
                proj_drop,
                drop_path[i],
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        )

    def _pos_embed(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Add the position embedding to ``x`` (B, P + H*W, C)."""
        if not self.dynamic_img_size:
            return x + self.pos_embed
        P = self.num_prefix_tokens
        gh, gw = self.grid_size
        pos = self.pos_embed[:, P:] if P else self.pos_embed  # (1, gh*gw, C)
        pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, C, gh, gw)
        pos = F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False)  # (1, C, H, W)
        pos = pos.flatten(2).transpose(1, 2)  # (1, H*W, C)
        if P:
            pos = torch.cat((self.pos_embed[:, :P], pos), dim=1)
        return x + pos


class PyramidVisionTransformer(ClassTokenHead, nn.Module):
    """PVT v1 classifier: four :class:`PvtStage` s, final LayerNorm, linear head on the class token.

    ``forward_features``: (B, 3, H, W) -> (B, 1 + H/32 * W/32, C) normalised tokens;
    ``forward_head``: -> (B, num_classes).
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        patch_size: int = 4,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        dynamic_img_size: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._init_classifier(num_classes, global_pool, embed_dims[-1])
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == num_stages):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios must have equal length")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)

        dpr = stage_drop_path_rates(drop_path_rate, list(depths))
        rates = dict(pos_drop=pos_drop_rate, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate)
        layers = dict(dynamic_img_size=dynamic_img_size, qkv_bias=qkv_bias, norm_layer=norm_layer, **dd)
        stages = []
        in_dim, grid = in_chans, img_size
        for i in range(num_stages):
            stage_patch = patch_size if i == 0 else 2
            grid = grid // stage_patch
            stage_args = (in_dim, embed_dims[i], depths[i], num_heads[i], mlp_ratios[i], sr_ratios[i], stage_patch)
            last = i == num_stages - 1
            stages.append(PvtStage(*stage_args, (grid, grid), class_token=last, drop_path=dpr[i], **rates, **layers))
            in_dim = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self._init_head(norm_layer(embed_dims[-1], **dd), drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {f"stages.{i}.pos_embed" for i in range(len(self.stages))}
        return names | {f"stages.{len(self.stages) - 1}.cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) image -> (B, 1 + H*W, C) normalised last-stage tokens."""
        x, H, W = self.stages[0](x)
        for stage in self.stages[1:]:
            B, _, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
            x, H, W = stage(x)
        return self.norm(x)


def _create_pvt(variant: str, pretrained: bool, depths, **kwargs) -> PyramidVisionTransformer:
    """A PVT of ``depths`` (``kwargs`` override)."""
    return build(PyramidVisionTransformer, variant, pretrained, checkpoint_filter_fn, **{"depths": depths, **kwargs})


# No hosted weights: the authors' ImageNet-1k checkpoints (github.com/whai362/PVT) are not on the
# HF hub; load one with pretrained_cfg_overlay=dict(file=path) and it is remapped by
# checkpoint_filter_fn.
default_cfgs = generate_default_cfgs(
    {
        "pvt_tiny.in1k": _cfg(license="apache-2.0", crop_pct=0.9),
        "pvt_small.in1k": _cfg(license="apache-2.0", crop_pct=0.9),
        "pvt_medium.in1k": _cfg(license="apache-2.0", crop_pct=0.9),
        "pvt_large.in1k": _cfg(license="apache-2.0", crop_pct=0.9),
    }
)


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny: depths (2, 2, 2, 2); 13.2 M params, 1.9 GMACs at 224 px."""
    return _create_pvt("pvt_tiny", pretrained, (2, 2, 2, 2), **kwargs)


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Small: depths (3, 4, 6, 3); 24.5 M params, 3.8 GMACs at 224 px."""
    return _create_pvt("pvt_small", pretrained, (3, 4, 6, 3), **kwargs)


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Medium: depths (3, 4, 18, 3); 44.2 M params, 6.7 GMACs at 224 px."""
    return _create_pvt("pvt_medium", pretrained, (3, 4, 18, 3), **kwargs)


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Large: depths (3, 8, 27, 3); 61.4 M params, 9.8 GMACs at 224 px."""
    return _create_pvt("pvt_large", pretrained, (3, 8, 27, 3), **kwargs)
