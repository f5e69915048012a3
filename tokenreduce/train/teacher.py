"""Small ViTs for the built-in digit sets, registered with timm (``timm.create_model(name)``).

| name | input | patch | tokens | depth | width | heads | for |
|---|---|---|---|---|---|---|---|
| ``vit_digits_mnist`` | 1 x 28 x 28 | 2 | 196 (DeiT at 224/16) | 12 | 96 | 3 | ``mnist5k``, sites [3, 6, 9] |
| ``vit_digits_8px`` | 1 x 8 x 8 | 1 | 64 | 12 | 48 | 3 | ``digits`` |
| ``vit_digits_tiny`` | 1 x 8 x 8 | 2 | 16 | 4 | 32 | 2 | ``digits``, CPU tests, sites [1, 2, 3] |

They are timm ``VisionTransformer``s (class token, pre-norm blocks, SDPA), so every method
applies. No weights are published: train one with
``tokenreduce finetune --dataset mnist5k --model vit_digits_mnist --method none`` and pass the
checkpoint as ``--initial-checkpoint`` to a reduced run.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..errors import TokenReduceError
from .data import MNIST_MEAN, MNIST_STD

__all__ = ["vit_digits_mnist", "vit_digits_8px", "vit_digits_tiny", "TEACHERS"]

TEACHERS = {"mnist5k": "vit_digits_mnist", "digits": "vit_digits_8px"}


def _cfg(size: int) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, size, size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": True,
    }


default_cfgs = generate_default_cfgs(
    {"vit_digits_mnist": _cfg(28), "vit_digits_8px": _cfg(8), "vit_digits_tiny": _cfg(8)}
)


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    if pretrained:
        raise TokenReduceError(
            f"{variant}: no published weights; train it with `tokenreduce finetune --model {variant} --method none` "
            f"and load the checkpoint with --initial-checkpoint (or pretrained=False)"
        )
    return build_model_with_cfg(VisionTransformer, variant, False, **kwargs)


@register_model
def vit_digits_mnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """28 px, patch 2 (196 tokens), 12 blocks of width 96: 1.3 M params."""
    args = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=12, num_heads=3)
    return _create("vit_digits_mnist", pretrained, **dict(args, **kwargs))


@register_model
def vit_digits_8px(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """8 px, patch 1 (64 tokens), 12 blocks of width 48."""
    args = dict(img_size=8, patch_size=1, in_chans=1, num_classes=10, embed_dim=48, depth=12, num_heads=3)
    return _create("vit_digits_8px", pretrained, **dict(args, **kwargs))


@register_model
def vit_digits_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """8 px, patch 2 (16 tokens), 4 blocks of width 32: for tests on CPU."""
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2)
    return _create("vit_digits_tiny", pretrained, **dict(args, **kwargs))
