"""Hybrid vision-transformer backbones written for fx-based token reduction.

Importing this package registers the models with timm, so ``timm.create_model`` builds them:
``pvt_tiny``, ``pvt_small``, ``pvt_medium``, ``pvt_large`` (PVT v1) and ``cvt_13``, ``cvt_21``
(CvT), ``lvvit_t``, ``lvvit_s``, ``lvvit_m`` (LV-ViT) and ``psvit_ti_14``, ``psvit_b_14``,
``psvit_b_18`` (PS-ViT). Official PVT and CvT checkpoints load through ``checkpoint_filter_fn``;
LV-ViT and PS-ViT ones through their modules' own (``lvvit.checkpoint_filter_fn``,
``psvit.checkpoint_filter_fn``), which their timm entries use.
"""

from .checkpoint import checkpoint_filter_fn
from .cvt import ConvolutionalVisionTransformer, cvt_13, cvt_21
from .lvvit import LVViT, lvvit_m, lvvit_s, lvvit_t
from .psvit import PSViT, psvit_b_14, psvit_b_18, psvit_ti_14
from .pvt import PyramidVisionTransformer, pvt_large, pvt_medium, pvt_small, pvt_tiny

__all__ = [
    "ConvolutionalVisionTransformer",
    "LVViT",
    "PSViT",
    "PyramidVisionTransformer",
    "checkpoint_filter_fn",
    "cvt_13",
    "cvt_21",
    "lvvit_m",
    "lvvit_s",
    "lvvit_t",
    "psvit_b_14",
    "psvit_b_18",
    "psvit_ti_14",
    "pvt_large",
    "pvt_medium",
    "pvt_small",
    "pvt_tiny",
]

# The digit ViTs of the built-in fine-tuning data (vit_digits_*), so timm names them everywhere.
from ..train import teacher as _digit_teachers  # noqa: E402, F401
