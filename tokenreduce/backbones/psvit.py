"""PS-ViT (vision transformer with progressive sampling), written to be traced with torch.fx.

Paper: Yue et al., "Vision Transformer with Progressive Sampling", ICCV 2021.
https://arxiv.org/abs/2108.01684 (official code: github.com/yuexy/PS-ViT)

A ResNet-like conv stem makes a (B, dim, H/4, W/4) feature map. The progressive sampling module
then runs ``num_iters`` iterations over ``n = points_h * points_w`` sampling points, which start
at the centres of a regular grid (feature pixels, (y, x) order)::

    tokens_t = bilinear(feature, p_t + gamma * o_t) + pos_layer(p'_t / (H, W)) + tokens_{t-1}
    tokens_t = transformer_layer_t(tokens_t)            # (B, n, C), no class token
    o_{t+1}  = offset_layer_t(tokens_t)                  # (B, n, 2), not in the last iteration
    p'_t     = p_t + o_t (offsets detached),  p_{t+1} = p'_t

``bilinear`` is ``F.grid_sample(align_corners=True, padding_mode="zeros")``: pixel ``i`` sits at
coordinate ``i`` and out-of-map neighbours read 0, as the authors' CUDA kernel does, so the module
is plain traceable torch (no leaf). ``pos_layer`` (Linear(2, C)) is one module shared by every
iteration. A class token is then prepended and ``depth - num_iters`` plain pre-norm blocks
(``blocks``) follow: the vision-transformer part, where the TPS supplement reduces tokens
(dTPS at blocks 3, 6, 9, keep 0.5). The sampling iterations are not reduction sites: their
offsets and points belong to a fixed set of ``n`` points, so :class:`SamplingLayer` is a
registered tokenreduce leaf (plain ``torch.fx.symbolic_trace`` still traces through it).

Variants (224 px, 14x14 or 18x18 points)::

    variant      dim  heads  iters  blocks  points  params    GMACs
    psvit_ti_14  192    3      4      8     14x14    4.8 M    1.6
    psvit_b_14   384    6      4     10     14x14   21.3 M    5.4
    psvit_b_18   384    6      4     10     18x18   21.3 M    8.8

Two details follow the released models: attention scales by ``dim ** -0.5`` (the full width, as
the released checkpoints were trained; ``qk_scale`` overrides it) and qkv has no bias. Points are
numbered in raster order (row by row); the official code numbers them column by column, which
changes nothing (every later op is per token or permutation-equivariant and the head reads the
class token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..capture import register_leaf_module
from ._common import Attention, ClassTokenHead, PreNormBlock, build, init_linear
from ._common import default_cfg as _cfg
from .checkpoint import _unwrap

__all__ = ["PSViT", "checkpoint_filter_fn", "grid_points", "sample_points"]


def grid_points(feat: torch.Tensor, points_h: int, points_w: int) -> torch.Tensor:
    """The initial sampling points: centres of a ``points_h x points_w`` grid over the feature map.

    ``feat`` (B, C, H, W) -> (B, points_h * points_w, 2) in (y, x) feature-pixel coordinates,
    raster order; point (r, c) is at ``((r + 0.5) * H / points_h, (c + 0.5) * W / points_w)``.
    """
    B, H, W = feat.shape[0], feat.shape[2], feat.shape[3]
    ys = (torch.arange(points_h, device=feat.device, dtype=feat.dtype) + 0.5) * (H / points_h)
    xs = (torch.arange(points_w, device=feat.device, dtype=feat.dtype) + 0.5) * (W / points_w)
    grid = torch.stack([ys[:, None].expand(points_h, points_w), xs[None, :].expand(points_h, points_w)], -1)
    return grid.reshape(1, points_h * points_w, 2).expand(B, -1, -1)


def sample_points(feat: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling: ``feat`` (B, C, H, W), ``points`` (B, n, 2) (y, x) -> (B, n, C).

    Pixel ``(i, j)`` is at coordinate ``(i, j)``; neighbours outside the map read 0 (a point more
    than one pixel outside reads 0). Differentiable w.r.t. ``feat`` and ``points``.
    """
    H, W = feat.shape[2], feat.shape[3]
    y = points[..., 0] * (2.0 / (H - 1)) - 1.0  # (B, n), in [-1, 1] on the map
    x = points[..., 1] * (2.0 / (W - 1)) - 1.0
    grid = torch.stack([x, y], dim=-1).unsqueeze(2)  # (B, n, 1, 2), grid_sample's (x, y) order
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B, C, n, 1)
    return out.squeeze(3).transpose(1, 2)  # (B, n, C)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 convs with BatchNorm; projection shortcut when the width
    changes): (B, C_in, H, W) -> (B, C_out, H, W). Names follow the official checkpoint."""

    def __init__(self, in_chans: int, mid: int, out_chans: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, mid, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        self.conv3 = nn.Conv2d(mid, out_chans, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chans, **dd)
        self.relu = nn.ReLU()
        self.downsample = None
        if in_chans != out_chans:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, bias=False, **dd), nn.BatchNorm2d(out_chans, **dd)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


def conv_stem(in_chans: int, mid_dim: int, dim: int, device=None, dtype=None) -> nn.Sequential:
    """(B, 3, H, W) -> (B, dim, H/4, W/4): conv 7x7/2, BN, ReLU, max-pool 3x3/2, two bottlenecks.
    Indices 0..5 as in the official ``stem``."""
    dd = {"device": device, "dtype": dtype}
    return nn.Sequential(
        nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False, **dd),
        nn.BatchNorm2d(64, **dd),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        Bottleneck(64, 64, mid_dim, **dd),
        Bottleneck(mid_dim, 64, dim, **dd),
    )


@register_leaf_module
class SamplingLayer(nn.Module):
    """One progressive sampling iteration (see the module docstring).

    Traceable, but registered as a tokenreduce leaf (one opaque node): its tokens are tied one to
    one to the sampling points (the offsets it predicts are added to the (B, n, 2) point tensor),
    so a reduction site in its block would break the next iteration with a shape mismatch.
    As a leaf, ``tokenreduce.inspect`` offers only the blocks after the sampling module.

    ``forward(feat (B, C, H, W), point (B, n, 2), offset (B, n, 2) | None, prev (B, n, C) | None)
    -> (tokens (B, n, C), next offset (B, n, 2) | None, sampled point (B, n, 2))``.
    """

    def __init__(
        self,
        block: PreNormBlock,
        position_layer: nn.Linear,
        dim: int,
        pred_offset: bool,
        gamma: float = 1.0,
        offset_bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.gamma = gamma
        self.transformer_layer = block
        self.position_layer = position_layer  # shared by every iteration
        self.offset_layer = nn.Linear(dim, 2, bias=offset_bias, device=device, dtype=dtype) if pred_offset else None

    def forward(self, feat, point, offset=None, prev=None):
        if offset is None:
            tokens = sample_points(feat, point)
        else:
            tokens = sample_points(feat, point + self.gamma * offset)
            point = point + offset.detach()
        H, W = feat.shape[2], feat.shape[3]
        pos = torch.cat([point[..., :1] / H, point[..., 1:] / W], dim=-1)  # (B, n, 2) in [0, 1]
        tokens = tokens + self.position_layer(pos)
        if prev is not None:
            tokens = tokens + prev
        tokens = self.transformer_layer(tokens)
        offset = self.offset_layer(tokens) if self.offset_layer is not None else None
        return tokens, offset, point


class PSViT(ClassTokenHead, nn.Module):
    """PS-ViT classifier: conv stem, progressive sampling, class token, ``blocks``, LayerNorm, head.

    ``forward_features``: (B, 3, H, W) -> (B, 1 + n, C) normalised tokens; ``forward_head``:
    -> (B, num_classes). Any input size works: the points are spread over the runtime feature map.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        stem_mid_dim: int = 256,
        depth: int = 14,
        num_iters: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        points: tuple[int, int] = (14, 14),
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        offset_gamma: float = 1.0,
        offset_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._init_classifier(num_classes, global_pool, embed_dim)
        if not 1 <= num_iters < depth:
            raise ValueError(f"num_iters must be in [1, depth) = [1, {depth}) (got {num_iters})")
        self.embed_dim = embed_dim
        self.points = tuple(points)
        scale = qk_scale if qk_scale is not None else embed_dim**-0.5  # the released models' scale

        self.stem = conv_stem(in_chans, stem_mid_dim, embed_dim, **dd)
        self.pos_layer = nn.Linear(2, embed_dim, **dd)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()

        def block(i):  # the official TransformerEncoderLayer
            attn = Attention(embed_dim, num_heads, None, scale, qkv_bias, attn_drop_rate, proj_drop_rate, **dd)
            return PreNormBlock(embed_dim, attn, mlp_ratio, proj_drop_rate, dpr[i], **dd)

        self.ps_layers = nn.ModuleList(
            SamplingLayer(block(i), self.pos_layer, embed_dim, i < num_iters - 1, offset_gamma, offset_bias, **dd)
            for i in range(num_iters)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.blocks = nn.ModuleList(block(i) for i in range(num_iters, depth))
        self._init_head(nn.LayerNorm(embed_dim, **dd), drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        for layer in self.ps_layers:  # sampling starts on the regular grid
            if layer.offset_layer is not None:
                nn.init.zeros_(layer.offset_layer.weight)
                if layer.offset_layer.bias is not None:
                    nn.init.zeros_(layer.offset_layer.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem|pos_layer|ps_layers", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) image -> (B, 1 + n, C) normalised tokens, class token first."""
        feat = self.stem(x)  # (B, C, H/4, W/4)
        point = grid_points(feat, *self.points)  # (B, n, 2)
        tokens, offset = None, None
        for layer in self.ps_layers:
            tokens, offset, point = layer(feat, point, offset, tokens)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)  # (B, 1 + n, C)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def checkpoint_filter_fn(state_dict, model: nn.Module) -> dict:
    """Map an official PS-ViT checkpoint (github.com/yuexy/PS-ViT) onto ``model``.

    Official ``trans_layers.{j}.*`` are our ``blocks.{j}.*``; ``point_coord`` (the initial points,
    recomputed here from the feature map) is dropped; every other name (``stem.4.conv1``,
    ``ps_layers.{i}.transformer_layer``, ``ps_layers.{i}.position_layer`` = ``pos_layer``, ...)
    is ours. Wrappers (``{'model': ...}``, ``{'state_dict': ...}``, ``module.``) are stripped.
    """
    out = {}
    for k, v in _unwrap(state_dict).items():
        if k == "point_coord":
            continue
        if k.startswith("trans_layers."):
            k = "blocks." + k[len("trans_layers.") :]
        out[k] = v
    return out


def _create(variant: str, pretrained: bool, locs: tuple[int, ...], **kwargs) -> PSViT:
    return build(PSViT, variant, pretrained, checkpoint_filter_fn, [f"blocks.{i}" for i in locs], **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "psvit_ti_14.in1k": _cfg(license="apache-2.0", crop_pct=0.9, first_conv="stem.0"),
        "psvit_b_14.in1k": _cfg(license="apache-2.0", crop_pct=0.9, first_conv="stem.0"),
        "psvit_b_18.in1k": _cfg(license="apache-2.0", crop_pct=0.9, first_conv="stem.0"),
    }
)


@register_model
def psvit_ti_14(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-Ti/14: dim 192, 4 sampling iterations + 8 blocks, 14x14 points; 4.8 M params, 1.6 GMACs.
    Default sites: blocks 2, 4, 6 (the supplement reduces only PS-ViT-B; these are its quarter points)."""
    args = dict(embed_dim=192, stem_mid_dim=192, depth=12, num_heads=3, points=(14, 14))
    return _create("psvit_ti_14", pretrained, (2, 4, 6), **dict(args, **kwargs))


@register_model
def psvit_b_14(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/14: dim 384, 4 sampling iterations + 10 blocks, 14x14 points; 21.3 M params,
    5.4 GMACs. Default sites: blocks 3, 6, 9 (TPS supplement)."""
    args = dict(embed_dim=384, stem_mid_dim=256, depth=14, num_heads=6, points=(14, 14))
    return _create("psvit_b_14", pretrained, (3, 6, 9), **dict(args, **kwargs))


@register_model
def psvit_b_18(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/18: as B/14 with 18x18 points; 21.3 M params, 8.8 GMACs. Default sites: blocks 3, 6, 9."""
    args = dict(embed_dim=384, stem_mid_dim=256, depth=14, num_heads=6, points=(18, 18))
    return _create("psvit_b_18", pretrained, (3, 6, 9), **dict(args, **kwargs))
