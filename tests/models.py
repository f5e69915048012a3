"""The models every core test runs on: (id, factory, example input shape, methods that apply).

Models without a class token take only the learned-score methods (eTPS and EViT score tokens
by class-token attention and refuse them with an error, tested in test_errors.py).
"""

import pytest
import timm
import torch
from handwritten_vit import TinyViT

ALL = ("etps", "evit", "dtps", "dynamicvit")
LEARNED = ("dtps", "dynamicvit")


def timm_model(name, **kwargs):
    return lambda: timm.create_model(name, **kwargs)


def _registry(size, slow=False):
    """Every supported model family. The default suite runs them on small inputs (same
    architecture and graph, fewer patches); ``slow`` runs the released 224 px configurations."""
    s = size
    mark = (pytest.mark.slow,) if slow else ()
    rows = [
        ("vit_tiny_patch16_224", timm_model("vit_tiny_patch16_224", img_size=s), (2, 3, s, s), ALL),
        ("vit_small_patch16_224", timm_model("vit_small_patch16_224", img_size=s), (2, 3, s, s), ALL),
        ("vit_base_patch16_224", timm_model("vit_base_patch16_224", img_size=s), (1, 3, s, s), ALL),
        ("deit_tiny_patch16_224", timm_model("deit_tiny_patch16_224", img_size=s), (2, 3, s, s), ALL),
        ("deit_small_patch16_224", timm_model("deit_small_patch16_224", img_size=s), (2, 3, s, s), ALL),
        ("deit_tiny_distilled", timm_model("deit_tiny_distilled_patch16_224", img_size=s), (2, 3, s, s), ALL),
        ("deit3_small_patch16_224", timm_model("deit3_small_patch16_224", img_size=s), (2, 3, s, s), ALL),
        (
            "vit_small_reg4_dinov2",
            timm_model("vit_small_patch14_reg4_dinov2", img_size=s // 16 * 14),
            (2, 3, s // 16 * 14, s // 16 * 14),
            ALL,
        ),
        ("vit_base_reg4_gap", timm_model("vit_base_patch16_reg4_gap_256", img_size=s), (1, 3, s, s), LEARNED),
        ("vit_base_patch16_clip_224", timm_model("vit_base_patch16_clip_224", img_size=s), (1, 3, s, s), ALL),
        (
            "vit_small_gap",
            timm_model("vit_small_patch16_224", img_size=s, class_token=False, global_pool="avg"),
            (2, 3, s, s),
            LEARNED,
        ),
        ("handwritten", TinyViT, (2, 3, 32, 32), ALL),
    ]
    return [
        (mid + ("" if not slow else "@224"), f, shape, methods, mark)
        for mid, f, shape, methods in rows
        if not (slow and mid == "handwritten")
    ]


MODELS = _registry(96) + _registry(224, slow=True)

CASES = [
    pytest.param(mid, factory, shape, method, marks=mark, id=f"{mid}-{method}")
    for mid, factory, shape, methods, mark in MODELS
    for method in methods
]
DEIT_S = timm_model("deit_small_patch16_224")


def build(factory, shape):
    model = factory().eval()
    return model, torch.randn(*shape)
