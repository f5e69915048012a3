"""Convolutional vision Transformer (CvT), written to be traced and rewritten with torch.fx.

Paper: Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021.
https://arxiv.org/abs/2103.15808

Layout at 224 px (no position embedding anywhere)::

    stage  token embed (conv)   grid    dim  heads  CvT-13  CvT-21  tokens
    1      7x7 / 4, pad 2       56x56    64    1      1       1     3136
    2      3x3 / 2, pad 1       28x28   192    3      2       4      784
    3      3x3 / 2, pad 1       14x14   384    6     10      16      196 + class token

Each attention builds q, k, v with a depthwise 3x3 conv + BatchNorm on the token grid (stride 1
for q, 2 for k and v) followed by a Linear; the class token bypasses the convs.

Two details follow the authors' released models rather than the paper, so that their
checkpoints reproduce: the attention scale is ``dim ** -0.5`` (the full width, not the head
width) and the MLP activation is QuickGELU, ``x * sigmoid(1.702 x)``.

Graph conventions the token-reduction passes rely on:

* tokens between blocks are ``(B, N, C)`` sequences; the class token (stage 3) comes first and
  is split off by slicing, ``x[:, :1]`` / ``x[:, 1:]``;
* every spatial op (the q/k/v conv projections, the next stage's token embed) is fed by
  ``x.transpose(1, 2).reshape(B, C, H, W)`` directly, with ``H, W`` read from the shape of the
  stage's embedding conv output, never from ``N``;
* blocks are pre-norm residuals: ``x = x + drop_path(attn(norm1(x), H, W))`` then the MLP.
"""

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._common import (
    AttentionBase,
    ClassTokenHead,
    ConvEmbed,
    PreNormBlock,
    QuickGELU,
    TokenStage,
    build,
    init_linear,
    stage_drop_path_rates,
)
from ._common import default_cfg as _cfg
from .checkpoint import checkpoint_filter_fn

__all__ = ["ConvolutionalVisionTransformer"]


class ConvProjection(nn.Module):
    """Depthwise conv + BatchNorm on a grid, flattened to tokens.

    ``(B, C, H, W) -> (B, H'*W', C)`` with ``H' = ceil(H / stride)`` (kernel 3, padding 1).
    """

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False, **dd
        )
        self.bn = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'*W', C)


class ConvAttention(AttentionBase):
    """Multi-head attention with convolutional q/k/v projections.

    Input ``(B, P + H*W, C)`` with ``P = num_prefix_tokens`` leading tokens (class token) that
    skip the convs; q keeps all ``P + H*W`` tokens, k and v have ``P + ceil(H/s) * ceil(W/s)``.
    Output ``(B, P + H*W, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(dim, num_heads, scale=dim**-0.5)  # the released models' full-width scale, see above
        dd = {"device": device, "dtype": dtype}
        self.num_prefix_tokens = num_prefix_tokens
        self.conv_proj_q = ConvProjection(dim, kernel_size, stride_q, **dd)
        self.conv_proj_k = ConvProjection(dim, kernel_size, stride_kv, **dd)
        self.conv_proj_v = ConvProjection(dim, kernel_size, stride_kv, **dd)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self._output_layers(dim, attn_drop, proj_drop, dd)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        P = self.num_prefix_tokens
        if P:
            prefix, x = x[:, :P], x[:, P:]  # (B, P, C), (B, H*W, C)
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        q = self.conv_proj_q(x)  # (B, H*W, C)
        k = self.conv_proj_k(x)  # (B, H/2 * W/2, C)
        v = self.conv_proj_v(x)
        if P:
            q = torch.cat((prefix, q), dim=1)
            k = torch.cat((prefix, k), dim=1)
            v = torch.cat((prefix, v), dim=1)
        q = self._heads(self.proj_q(q))
        k = self._heads(self.proj_k(k))
        v = self._heads(self.proj_v(v))
        x = self.attend(q, k, v).transpose(1, 2).reshape(B, -1, C)  # (B, h, Nq, d) -> (B, Nq, C)
        return self.proj_drop(self.proj(x))


class CvtStage(TokenStage):
    """Conv token embedding, optional class token, blocks.

    ``(B, C_in, H_in, W_in) -> ((B, P + H*W, C), H, W)`` where ``P = num_prefix_tokens``.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        patch_stride: int,
        patch_padding: int,
        class_token: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        act_layer: Callable[..., nn.Module] = QuickGELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding, norm_layer, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **dd)) if class_token else None
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.0] * depth
        drops = dict(attn_drop=attn_drop, proj_drop=proj_drop)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                dim,
                ConvAttention(dim, num_heads, self.num_prefix_tokens, qkv_bias, **drops, **dd),
                mlp_ratio,
                proj_drop,
                drop_path[i],
                act_layer,
                norm_layer,
                **dd,
            )
            for i in range(depth)
        )


class ConvolutionalVisionTransformer(ClassTokenHead, nn.Module):
    """CvT classifier: three :class:`CvtStage` s, final LayerNorm, linear head on the class token.

    ``forward_features``: (B, 3, H, W) -> (B, 1 + H/16 * W/16, C) normalised tokens;
    ``forward_head``: -> (B, num_classes).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_paddings: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: Optional[Callable[..., nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._init_classifier(num_classes, global_pool, embed_dims[-1])
        num_stages = len(depths)
        per_stage = (embed_dims, num_heads, patch_sizes, patch_strides, patch_paddings)
        if any(len(s) != num_stages for s in per_stage):
            raise ValueError(
                "embed_dims, depths, num_heads, patch_sizes, patch_strides and patch_paddings must have equal length"
            )
        act_layer = act_layer or QuickGELU
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)

        dpr = stage_drop_path_rates(drop_path_rate, list(depths))
        rates = dict(pos_drop=pos_drop_rate, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate)
        layers = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, act_layer=act_layer, norm_layer=norm_layer, **dd)
        in_dims = (in_chans, *embed_dims[:-1])
        self.stages = nn.ModuleList(
            CvtStage(
                in_dims[i],
                embed_dims[i],
                depths[i],
                num_heads[i],
                patch_sizes[i],
                patch_strides[i],
                patch_paddings[i],
                class_token=i == num_stages - 1,
                drop_path=dpr[i],
                **rates,
                **layers,
            )
            for i in range(num_stages)
        )
        self._init_head(norm_layer(embed_dims[-1], **dd), drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f"stages.{len(self.stages) - 1}.cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) image -> (B, 1 + H*W, C) normalised last-stage tokens."""
        x, H, W = self.stages[0](x)
        for prev, stage in zip(self.stages[:-1], self.stages[1:]):
            if prev.num_prefix_tokens:
                x = x[:, prev.num_prefix_tokens :]  # the grid only feeds the next embedding
            B, _, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
            x, H, W = stage(x)
        return self.norm(x)


def _create_cvt(variant: str, pretrained: bool, depths, locs, **kwargs) -> ConvolutionalVisionTransformer:
    """A CvT of ``depths``; token reduction at blocks ``locs`` of stage 3 (``kwargs`` override)."""
    sites, args = [f"stages.2.blocks.{i}" for i in locs], {"depths": depths, **kwargs}
    return build(ConvolutionalVisionTransformer, variant, pretrained, checkpoint_filter_fn, sites, **args)


# No hosted weights: the authors' ImageNet-1k checkpoints (github.com/microsoft/CvT) are not on
# the HF hub; load one with pretrained_cfg_overlay=dict(file=path) and it is remapped by
# checkpoint_filter_fn.
default_cfgs = generate_default_cfgs(
    {
        "cvt_13.in1k": _cfg(license="mit"),
        "cvt_21.in1k": _cfg(license="mit"),
    }
)


@register_model
def cvt_13(pretrained: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-13: depths (1, 2, 10); 20 M params, 4.5 GMACs at 224 px."""
    # TPS supplement: token reduction inside stage 3 only, at its blocks 3, 6 and 9
    return _create_cvt("cvt_13", pretrained, (1, 2, 10), (3, 6, 9), **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-21: depths (1, 4, 16); 32 M params, 7.1 GMACs at 224 px."""
    return _create_cvt("cvt_21", pretrained, (1, 4, 16), (5, 9, 13), **kwargs)
