"""LV-ViT (token labeling ViT), written to be traced and rewritten with torch.fx.

Paper: Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
NeurIPS 2021. https://arxiv.org/abs/2104.10858 (official code: github.com/zihangJiang/TokenLabeling)

Layout at 224 px (every variant: 196 patch tokens + class token, MLP ratio 3, no qkv bias)::

    stem (all variants): conv 7x7/2 (3 -> 64) BN ReLU, conv 3x3 (64 -> 64) BN ReLU x 2  -> 112x112
                         conv 8x8/8 (64 -> dim)                                        -> 14x14
    variant    dim  depth  heads  skip_lam  params    GMACs
    lvvit_t    240    12     4      1       8.53 M    2.79 (not in the papers: see docs/backbones.md)
    lvvit_s    384    16     6      2      26.15 M    6.6
    lvvit_m    512    20     8      2      55.83 M   12.7

Blocks scale both residual branches down by ``skip_lam``::

    x = x + drop_path(attn(norm1(x))) / skip_lam
    x = x + drop_path(mlp(norm2(x))) / skip_lam

The token labeling head ``aux_head`` (Linear(dim, num_classes)) reads every patch token after the
final norm; the prediction is ``head(x[:, 0]) + 0.5 * max_n aux_head(x[:, 1:])``, what the
released models return in eval mode, and :meth:`LVViT.forward` returns it in both modes (the
dense per-token logits for a token labeling loss come from :meth:`LVViT.forward_dense`). After a
token reduction the max runs over the tokens that are left: the kept (squeezed) ones, plus EViT's
appended token; in dTPS's fixed-length training form it still runs over all of them.
The authors' MixToken augmentation is a data-pipeline step (it edits the batch) and is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._common import Attention, ClassTokenHead, PreNormBlock, build, init_linear
from ._common import default_cfg as _cfg
from .checkpoint import _resample_pos_embeds, _unwrap

__all__ = ["PAPER_LOCS", "LVViT", "checkpoint_filter_fn"]

# TPS supplement: the sites tried on LV-ViT, 1-based as the paper writes them (block l is
# ``blocks.{l-1}``); the first set of each is the default. LV-ViT-M is not in the supplement: its
# default follows DynamicViT's LV-ViT-M sites (blocks 5, 10, 15, 0-based).
PAPER_LOCS = {
    "lvvit_t": ((4, 7, 10), (3, 5, 7, 9), (4, 6, 8, 10)),
    "lvvit_s": ((5, 9, 13), (3, 6, 9, 12), (4, 7, 10, 13)),
}


class ConvStem(nn.Module):
    """LV-ViT's four-conv patch embedding: (B, 3, H, W) -> (B, dim, H/16, W/16).

    Three convs with BatchNorm and ReLU at stride 2 (the official ``PatchEmbed4_2``), then a
    non-overlapping ``patch_size/2`` conv; module names follow the official checkpoint.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int = 16, stem_dim: int = 64, device=None, dtype=None
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if patch_size % 2:
            raise ValueError(f"patch_size must be even (the stem halves the image first), got {patch_size}")
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_dim, **dd)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_dim, **dd)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_dim, **dd)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(stem_dim, embed_dim, patch_size // 2, stride=patch_size // 2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)  # (B, dim, H/16, W/16)


class Block(PreNormBlock):
    """Pre-norm block whose residual branches are divided by ``skip_lam``; (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, skip_lam: float = 1.0, **kwargs):
        super().__init__(dim, attn, mlp_ratio, **kwargs)
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path2(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class LVViT(ClassTokenHead, nn.Module):
    """LV-ViT classifier: conv stem, class token, learned position embedding, ``skip_lam`` blocks,
    final LayerNorm, class head plus the token labeling head.

    ``forward_features``: (B, 3, H, W) -> (B, 1 + H/16 * W/16, C) normalised tokens;
    ``forward_head``: -> (B, num_classes) = ``head(cls) + 0.5 * max over tokens of aux_head``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        skip_lam: float = 2.0,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        stem_dim: int = 64,
        aux_head: bool = True,
        dynamic_img_size: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._init_classifier(num_classes, global_pool, embed_dim)
        norm_layer = norm_layer or nn.LayerNorm  # eps 1e-5, as the released models
        self.embed_dim = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = ConvStem(in_chans, embed_dim, patch_size, stem_dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                Attention(embed_dim, num_heads, head_dim, None, qkv_bias, attn_drop_rate, proj_drop_rate, **dd),
                mlp_ratio,
                skip_lam,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        )
        self._init_head(norm_layer(embed_dim, **dd), drop_rate, **dd)
        self.aux_head = self._classifier(num_classes, **dd) if aux_head else None  # the token labeling head
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class and token labeling heads (both ``Identity`` for ``num_classes == 0``)."""
        super().reset_classifier(num_classes, global_pool)
        if self.aux_head is not None:
            ref = self.norm.weight
            self.aux_head = self._classifier(num_classes, ref.device, ref.dtype)

    def _pos_embed(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Add the position embedding to ``x`` (B, 1 + H*W, C); its grid part is bilinearly
        resampled to (H, W) with ``dynamic_img_size`` (an exact copy at the default size)."""
        if not self.dynamic_img_size:
            return x + self.pos_embed
        gh, gw = self.grid_size
        pos = self.pos_embed[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, C, gh, gw)
        pos = F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False)  # (1, C, H, W)
        pos = torch.cat((self.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)), dim=1)  # (1, 1 + H*W, C)
        return x + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) image -> (B, 1 + H*W, C) normalised tokens, class token first."""
        x = self.patch_embed(x)  # (B, C, H, W)
        H, W = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        x = self.pos_drop(self._pos_embed(x, H, W))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, C) tokens -> (B, num_classes); ``pre_logits``: the class token (B, C).

        ``global_pool=""`` (no pooling): the class head on every token, (B, 1 + N, num_classes)
        (or the tokens themselves with ``pre_logits``), without the token labeling term.
        """
        if self.global_pool != "token":
            return x if pre_logits else self.head(self.head_drop(x))
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        out = self.head(cls)
        if self.aux_head is not None and self.num_classes > 0:
            out = out + 0.5 * self.aux_head(x[:, 1:]).amax(dim=1)  # (B, N, K) -> (B, K)
        return out

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token labeling training outputs: ``(head(cls) (B, K), aux_head(patches) (B, N, K))``."""
        if self.aux_head is None:
            raise ValueError("forward_dense: this LVViT has no token labeling head (built with aux_head=False)")
        x = self.forward_features(x)
        return self.head(self.head_drop(x[:, 0])), self.aux_head(x[:, 1:])


def checkpoint_filter_fn(state_dict, model: nn.Module) -> dict:
    """Map an official LV-ViT checkpoint (github.com/zihangJiang/TokenLabeling) onto ``model``.

    The official module names are ours (``patch_embed.conv1``, ``blocks.{i}.attn.qkv``,
    ``aux_head``, ...), so only wrappers (``{'model': ...}``, ``{'state_dict': ...}``, ``module.``)
    are stripped and ``pos_embed`` is resampled to ``model``'s grid when the image size differs
    (the 384 px checkpoints into a 224 px model, say). The input is not modified.
    """
    return _resample_pos_embeds(_unwrap(state_dict), model)


def _create(variant: str, pretrained: bool, locs: tuple[int, ...], **kwargs) -> LVViT:
    return build(LVViT, variant, pretrained, checkpoint_filter_fn, [f"blocks.{i}" for i in locs], **kwargs)


# The official weights are GitHub release files, not on the HF hub: load one with
# pretrained_cfg_overlay=dict(file=path); checkpoint_filter_fn maps it.
default_cfgs = generate_default_cfgs(
    {
        "lvvit_t.in1k": _cfg(license="apache-2.0", crop_pct=0.9, first_conv="patch_embed.conv1"),
        "lvvit_s.in1k": _cfg(license="apache-2.0", crop_pct=0.9, first_conv="patch_embed.conv1"),
        "lvvit_m.in1k": _cfg(license="apache-2.0", crop_pct=1.0, first_conv="patch_embed.conv1"),
    }
)


def _zero_based(one_based: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i - 1 for i in one_based)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: dim 240, depth 12, 4 heads, skip_lam 1; 8.53 M params. Default sites: blocks 4, 7, 10
    (1-based, TPS supplement)."""
    args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0)
    return _create("lvvit_t", pretrained, _zero_based(PAPER_LOCS["lvvit_t"][0]), **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: dim 384, depth 16, 6 heads, skip_lam 2; 26.15 M params, 6.6 GMACs. Default sites:
    blocks 5, 9, 13 (1-based, TPS supplement)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_s", pretrained, _zero_based(PAPER_LOCS["lvvit_s"][0]), **dict(args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: dim 512, depth 20, 8 heads, skip_lam 2; 55.83 M params, 12.7 GMACs. Default sites:
    blocks 5, 10, 15 (0-based, DynamicViT's; not in the TPS supplement)."""
    args = dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_m", pretrained, (5, 10, 15), **dict(args, **kwargs))
