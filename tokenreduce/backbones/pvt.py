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
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import ClassTokenHead, Mlp, init_linear, stage_drop_path_rates
from ._common import default_cfg as _cfg
from .checkpoint import checkpoint_filter_fn

__all__ = ["PyramidVisionTransformer"]


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding followed by LayerNorm.

    ``(B, C_in, H_in, W_in) -> ((B, H*W, C), H, W)`` with ``H = H_in // patch_size``.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)  # default eps, as in the released models

    def forward(self, x: torch.Tensor):
        x = self.proj(x)  # (B, C, H, W)
        H, W = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return self.norm(x), H, W


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced grid (SRA).

    ``q = Linear(x)``; if ``sr_ratio > 1`` the tokens are laid out on their ``(H, W)`` grid,
    reduced by a ``sr_ratio x sr_ratio`` conv of the same stride and LayerNorm-ed before
    ``kv = Linear(.)``. Input and output ``(B, N, C)``; with ``sr_ratio > 1`` the input must hold
    exactly the ``H*W`` grid tokens (no prefix tokens).
    """

    fused_attn: torch.jit.Final[bool]

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
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()

        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
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

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, M)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention; (B, N, C) -> (B, N, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PvtStage(nn.Module):
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
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **dd)) if class_token else None
        num_pos = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                sr_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
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

    def forward(self, x: torch.Tensor):
        x, H, W = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        x = self.pos_drop(self._pos_embed(x, H, W))
        for blk in self.blocks:
            x = blk(x, H, W)
        return x, H, W


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
        if global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' or '' (got {global_pool!r})")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == num_stages):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios must have equal length")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = embed_dims[-1]

        dpr = stage_drop_path_rates(drop_path_rate, list(depths))
        stages = []
        in_dim, grid = in_chans, img_size
        for i in range(num_stages):
            stage_patch = patch_size if i == 0 else 2
            grid = grid // stage_patch
            stages.append(
                PvtStage(
                    in_dim,
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    stage_patch,
                    (grid, grid),
                    class_token=i == num_stages - 1,
                    dynamic_img_size=dynamic_img_size,
                    qkv_bias=qkv_bias,
                    pos_drop=pos_drop_rate,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    **dd,
                )
            )
            in_dim = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = norm_layer(embed_dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
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


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return build_model_with_cfg(
        PyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


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
    model_args = dict(depths=(2, 2, 2, 2))
    return _create_pvt("pvt_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Small: depths (3, 4, 6, 3); 24.5 M params, 3.8 GMACs at 224 px."""
    model_args = dict(depths=(3, 4, 6, 3))
    return _create_pvt("pvt_small", pretrained, **dict(model_args, **kwargs))


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Medium: depths (3, 4, 18, 3); 44.2 M params, 6.7 GMACs at 224 px."""
    model_args = dict(depths=(3, 4, 18, 3))
    return _create_pvt("pvt_medium", pretrained, **dict(model_args, **kwargs))


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Large: depths (3, 8, 27, 3); 61.4 M params, 9.8 GMACs at 224 px."""
    model_args = dict(depths=(3, 8, 27, 3))
    return _create_pvt("pvt_large", pretrained, **dict(model_args, **kwargs))
