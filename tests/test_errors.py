"""Bad input fails early with a message that names the problem and the fix."""

import pytest
import timm
import torch
from handwritten_vit import TinyViT
from torch import nn

import tokenreduce


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval()


def test_out_of_range_locs_list_the_valid_ones(vit):
    with pytest.raises(
        ValueError, match=r"block index 12 is out of range; valid: block indices 0\.\.11 or paths 'blocks\.0'"
    ):
        tokenreduce.apply(vit, locs=[3, 12])


def test_unknown_path(vit):
    with pytest.raises(ValueError, match=r"no block at path 'block\.3'.*'blocks\.11'"):
        tokenreduce.apply(vit, locs=["block.3"])


def test_duplicate_locs(vit):
    with pytest.raises(ValueError, match=r"duplicate block\(s\) \['blocks\.3'\]"):
        tokenreduce.apply(vit, locs=[3, "blocks.3"])


def test_empty_locs_is_an_error_not_a_no_op(vit):
    with pytest.raises(ValueError, match="locs: empty; a reduction that inserts nothing is an error"):
        tokenreduce.apply(vit, locs=[])


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval(vit, ratio):
    with pytest.raises(ValueError, match=r"keep_ratio: every ratio must be in \(0, 1\]"):
        tokenreduce.apply(vit, keep_ratio=ratio)


def test_keep_ratio_list_length(vit):
    with pytest.raises(ValueError, match="keep_ratio: got 2 values for 3 sites"):
        tokenreduce.apply(vit, keep_ratio=[0.7, 0.5])


def test_cumulative_ratios_must_not_increase(vit):
    with pytest.raises(ValueError, match="cumulative fractions .* must not increase"):
        tokenreduce.apply(vit, method="dtps", keep_ratio=[0.5, 0.7, 0.3])


def test_bad_types(vit):
    with pytest.raises(TypeError, match="locs: each entry must be a block index"):
        tokenreduce.apply(vit, locs=[3.0])
    with pytest.raises(TypeError, match="keep_ratio: expected a float"):
        tokenreduce.apply(vit, keep_ratio="0.7")
    with pytest.raises(TypeError, match="apply: model must be an nn.Module"):
        tokenreduce.apply(lambda x: x)


def test_unknown_method_lists_the_known(vit):
    with pytest.raises(ValueError, match="unknown method 'tps'; known methods: dtps, .*dynamicvit, etps, .*evit"):
        tokenreduce.apply(vit, method="tps")


def test_no_class_token_suggests_dtps():
    gap = timm.create_model("vit_small_patch16_224", img_size=64, class_token=False, global_pool="avg")
    for method in ("etps", "evit"):
        with pytest.raises(tokenreduce.TokenReduceError, match="has no class token.*Use method='dtps'"):
            tokenreduce.apply(gap, method=method)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class GatedViT(TinyViT):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, img):
        return super().forward(self.gate(img))


def test_untraceable_module_is_named_with_the_fix():
    with pytest.raises(
        tokenreduce.TokenReduceError, match=r"could not trace module 'gate' \(Gate\).*register_leaf_module\(Gate\)"
    ):
        tokenreduce.apply(GatedViT(), example_input=torch.randn(1, 3, 32, 32))


def test_registering_the_leaf_fixes_it():
    from tokenreduce import capture

    tokenreduce.register_leaf_module(Gate)
    try:
        reduced = tokenreduce.apply(GatedViT().eval(), example_input=torch.randn(1, 3, 32, 32)).eval()
        assert reduced(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    finally:
        capture._LEAF_MODULES.discard(Gate)


def test_a_model_without_attention():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    cnn(torch.randn(1, 3, 16, 16))
    with pytest.raises(tokenreduce.TokenReduceError, match="no attention found in Sequential"):
        tokenreduce.apply(cnn, example_input=torch.randn(1, 3, 16, 16))


def test_missing_example_input():
    with pytest.raises(ValueError, match="example_input: TinyViT has no timm pretrained_cfg"):
        tokenreduce.apply(TinyViT())


def test_attention_scorer_before_the_block_is_refused():
    with pytest.raises(ValueError, match="reads the block's attention, which exists only after it has run"):
        tokenreduce.register_method(
            "early_cls", scorer="cls_attention", reducer="squeeze", placement="before", counts="per_site"
        )
