"""Hybrid vision-transformer backbones written for fx-based token reduction.

Importing this package registers the models with timm, so ``timm.create_model`` builds them:
``pvt_tiny``, ``pvt_small``, ``pvt_medium``, ``pvt_large`` (PVT v1) and ``cvt_13``, ``cvt_21``
(CvT). Official checkpoints of both families load through ``checkpoint_filter_fn``.
"""
from .checkpoint import checkpoint_filter_fn
from .cvt import ConvolutionalVisionTransformer, cvt_13, cvt_21
from .pvt import PyramidVisionTransformer, pvt_large, pvt_medium, pvt_small, pvt_tiny

__all__ = [
    "ConvolutionalVisionTransformer",
    "PyramidVisionTransformer",
    "checkpoint_filter_fn",
    "cvt_13",
    "cvt_21",
    "pvt_large",
    "pvt_medium",
    "pvt_small",
    "pvt_tiny",
]
