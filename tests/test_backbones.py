"""PVT v1 and CvT backbones: size, FLOPs, fx-traceability, graph conventions, checkpoints."""

import operator
import re

import pytest
import timm
import torch
import torch.fx

import tokenreduce.backbones  # noqa: F401  (registers the models with timm)
from tokenreduce.backbones import checkpoint_filter_fn
from tokenreduce.backbones._common import Mlp
from tokenreduce.backbones.cvt import ConvAttention
from tokenreduce.backbones.pvt import SpatialReductionAttention
from tokenreduce.flops import gflops

# name -> (params in M, GMACs at 224 px), as published (PVT Table 2; CvT Table 2).
PAPER = {
    "pvt_tiny": (13.2, 1.9),
    "pvt_small": (24.5, 3.8),
    "pvt_medium": (44.2, 6.7),
    "pvt_large": (61.4, 9.8),
    "cvt_13": (20.0, 4.5),
    "cvt_21": (32.0, 7.1),
}
SMALL = ["pvt_tiny", "cvt_13"]  # one per family, for tests that run real forwards
ATTENTION = (SpatialReductionAttention, ConvAttention)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are small CPU forwards; on a shared 2-core box intra-op threads spin against other
    processes and run several times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval(name, **kwargs):
    return timm.create_model(name, **kwargs).eval()


def _macs(model, img_size=224, device="cpu"):
    """Multiply-adds (FlopCounterMode total / 2) of one forward, in G. Through ``gflops``, which
    registers the CPU fused-attention formula torch < 2.6 lacks (else the count depends on
    whether another test called it first)."""
    return gflops(model, torch.randn(1, 3, img_size, img_size, device=device))


# --------------------------------------------------------------------------- registry, cfgs


@pytest.mark.parametrize("name", sorted(PAPER))
def test_registered_with_timm_without_clash(name):
    assert timm.is_model(name)
    assert timm.models.model_entrypoint(name).__module__.startswith("tokenreduce.backbones.")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    model = timm.create_model(name, device="meta")
    assert isinstance(model.get_submodule(cfg.first_conv), torch.nn.Conv2d)
    assert model.get_submodule(cfg.classifier) is model.get_classifier()


def test_timm_still_has_its_own_pvt_v2():
    assert {"pvt_v2_b0", "pvt_tiny", "pvt_large"} <= set(timm.list_models("pvt*"))
    assert timm.list_models("cvt*") == ["cvt_13", "cvt_21"]


@pytest.mark.parametrize("name", SMALL)
def test_num_classes_and_reset_classifier(name):
    model = _eval(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name", SMALL)
def test_bad_global_pool_is_rejected(name):
    with pytest.raises(ValueError, match="global_pool must be 'token' or ''"):
        timm.create_model(name, global_pool="avg", device="meta")


def test_pvt_class_token_needs_unreduced_attention():
    with pytest.raises(ValueError, match="class_token=True needs sr_ratio == 1"):
        timm.create_model("pvt_tiny", sr_ratios=(8, 4, 2, 2), device="meta")


# --------------------------------------------------------------------------- size and FLOPs


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_paper(name):
    """Within 2 % of the paper. Counted on the meta device: shapes only, no arithmetic."""
    params, macs = PAPER[name]
    model = _eval(name, device="meta")
    measured = sum(p.numel() for p in model.parameters()) / 1e6
    assert measured == pytest.approx(params, rel=0.02)
    assert _macs(model, device="meta") == pytest.approx(macs, rel=0.02)


@pytest.mark.parametrize("name", SMALL)
def test_flop_count_is_honest_on_cpu(name):
    """The CPU count (fused attention kernel) equals the meta count and the explicit-matmul count,
    so the meta numbers above include attention."""
    model = _eval(name)
    fused = _macs(model, img_size=112)
    assert fused == pytest.approx(_macs(_eval(name, device="meta"), 112, device="meta"), rel=1e-9)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        for m in model.modules():
            if isinstance(m, ATTENTION):
                m.fused_attn = False
        assert _macs(model, img_size=112) == pytest.approx(fused, rel=1e-9)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- fx


@pytest.mark.parametrize("name", sorted(PAPER))
def test_symbolic_trace(name):
    gm = torch.fx.symbolic_trace(_eval(name, device="meta"))
    gm.graph.lint()


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("batch,height,width", [(1, 224, 224), (1, 256, 256), (2, 96, 128)])
def test_traced_graph_matches_eager_at_any_size(name, batch, height, width):
    """One graph serves every input size: the grid comes from shapes, not from constants."""
    model = _eval(name)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (batch, 1000)
        torch.testing.assert_close(gm(x), out, rtol=0, atol=0)


def test_traced_in_train_mode_with_drop_path():
    model = timm.create_model("pvt_tiny", drop_path_rate=0.1).train()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_pvt_pos_embed_is_exact_at_default_size_and_resampled_otherwise():
    dynamic = _eval("pvt_tiny")
    fixed = _eval("pvt_tiny", dynamic_img_size=False)
    fixed.load_state_dict(dynamic.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert torch.equal(dynamic(x), fixed(x))
        feats, H, W = dynamic.stages[0](torch.randn(1, 3, 256, 256))
        assert (H, W) == (64, 64) and feats.shape == (1, 64 * 64, 64)
        with pytest.raises(RuntimeError):
            fixed(torch.randn(1, 3, 256, 256))


def _shape_source(node):
    """The module target whose output shape a ``getitem(getattr(t, 'shape'), i)`` node reads."""
    assert node.op == "call_function" and node.target is operator.getitem, node.format_node()
    shape = node.args[0]
    assert shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape"
    return shape.args[0].target


@pytest.mark.parametrize("name,spatial_inputs", [("pvt_tiny", 3 * 2 + 3), ("cvt_13", 13 + 2)])
def test_every_spatial_op_reads_a_token_grid(name, spatial_inputs):
    """Each conv fed by tokens is fed by ``x.transpose(1, 2).reshape(B, C, H, W)``, whose H and W
    are read from a patch-embed conv output: that stage's for attention convs, the previous
    stage's for the next embedding."""
    model = timm.create_model(name, device="meta")
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], torch.nn.Conv2d)]
    grid_inputs = set()
    for conv in convs:
        src = conv.args[0]
        if src.op == "placeholder":
            assert conv.target == "stages.0.patch_embed.proj"
            continue
        assert src.op == "call_method" and src.target == "reshape", conv.format_node()
        assert len(src.args) == 5, src.format_node()
        transpose = src.args[0]
        assert transpose.op == "call_method" and transpose.target == "transpose"
        assert tuple(transpose.args[1:]) == (1, 2)
        stage = int(re.match(r"stages\.(\d+)\.", conv.target).group(1))
        grid_stage = stage - 1 if conv.target.endswith("patch_embed.proj") else stage
        grid_from = {_shape_source(src.args[3]), _shape_source(src.args[4])}
        assert grid_from == {f"stages.{grid_stage}.patch_embed.proj"}, src.format_node()
        grid_inputs.add(src)
    assert len(grid_inputs) == spatial_inputs


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, ATTENTION + (Mlp,)) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", SMALL)
def test_blocks_are_pre_norm_residuals(name):
    """``x1 = x + drop_path1(attn(norm1(x), H, W))``; ``x2 = x1 + drop_path2(mlp(norm2(x1)))``."""
    model = timm.create_model(name, device="meta")
    graph = _LeafTracer().trace(model)
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    blocks = [k for k, m in model.named_modules() if k.count(".") == 3 and ".blocks." in k]
    assert len(blocks) == sum(len(s.blocks) for s in model.stages)
    for blk in blocks:
        for branch, norm in (("attn", "norm1"), ("mlp", "norm2")):
            node = by_target[f"{blk}.{branch}"]
            assert node.args[0] is by_target[f"{blk}.{norm}"]
            x_in = by_target[f"{blk}.{norm}"].args[0]
            (drop,) = node.users
            (add,) = drop.users
            assert add.target is operator.add and add.args == (x_in, drop), add.format_node()


@pytest.mark.parametrize("name", SMALL)
def test_class_token_comes_first_in_the_last_stage(name):
    model = _eval(name)
    last = model.stages[-1]
    seen = {}

    def record(key, value):
        seen[key] = value  # returns None: the hooks must not replace what they observe

    last.blocks[0].register_forward_pre_hook(lambda m, args: record("x", args[0]))
    last.patch_embed.register_forward_hook(lambda m, args, out: record("grid", out[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))  # default size: PVT's pos embed is used as stored
    x, grid = seen["x"], seen["grid"]
    pos = getattr(last, "pos_embed", torch.zeros(1, 1 + grid.shape[1], grid.shape[2]))
    assert x.shape[1] == 1 + grid.shape[1]
    torch.testing.assert_close(x[:, :1], (last.cls_token + pos[:, :1]).expand(2, -1, -1))
    torch.testing.assert_close(x[:, 1:], grid + pos[:, 1:])


# --------------------------------------------------------------------------- checkpoints


def _official_pvt_name(k):
    """Key naming of github.com/whai362/PVT: 1-based stages, flat per-stage attributes."""
    k = re.sub(r"^stages\.(\d+)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
    k = re.sub(r"^stages\.(\d+)\.pos_embed$", lambda m: f"pos_embed{int(m[1]) + 1}", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", k)
    return re.sub(r"^stages\.\d+\.cls_token$", "cls_token", k)


def _official_cvt_name(k):
    """Key naming of github.com/microsoft/CvT: 0-based ``stage{i}`` attributes."""
    return re.sub(r"^stages\.(\d+)\.", r"stage\1.", k)


OFFICIAL = {
    "pvt_tiny": (
        _official_pvt_name,
        {
            "patch_embed1.proj.weight",
            "patch_embed1.norm.bias",
            "patch_embed4.proj.weight",
            "pos_embed1",
            "pos_embed4",
            "cls_token",
            "norm.weight",
            "head.weight",
            "head.bias",
            "block1.0.norm1.weight",
            "block1.0.attn.q.weight",
            "block1.0.attn.q.bias",
            "block1.0.attn.kv.weight",
            "block1.0.attn.sr.weight",
            "block1.0.attn.sr.bias",
            "block1.0.attn.norm.weight",
            "block1.0.attn.proj.weight",
            "block1.1.mlp.fc1.weight",
            "block4.1.mlp.fc2.bias",
            "block4.1.norm2.weight",
        },
        {"block4.0.attn.sr.weight"},
    ),
    "cvt_13": (
        _official_cvt_name,
        {
            "stage0.patch_embed.proj.weight",
            "stage0.patch_embed.norm.weight",
            "stage2.cls_token",
            "stage0.blocks.0.attn.conv_proj_q.conv.weight",
            "stage0.blocks.0.attn.conv_proj_q.bn.weight",
            "stage0.blocks.0.attn.conv_proj_k.bn.running_mean",
            "stage1.blocks.1.attn.conv_proj_v.bn.running_var",
            "stage2.blocks.9.attn.conv_proj_v.bn.num_batches_tracked",
            "stage1.blocks.0.attn.proj_q.weight",
            "stage2.blocks.9.attn.proj_k.bias",
            "stage2.blocks.9.attn.proj_v.weight",
            "stage2.blocks.9.attn.proj.weight",
            "stage2.blocks.9.mlp.fc1.weight",
            "norm.weight",
            "head.bias",
        },
        {"stage0.blocks.0.attn.conv_proj_q.conv.bias", "stage0.cls_token", "stage2.pos_embed"},
    ),
}


def _official_state_dict(name, model):
    rename, must_have, must_not_have = OFFICIAL[name]
    sd = {rename(k): v.clone() for k, v in model.state_dict().items()}
    assert len(sd) == len(model.state_dict())
    assert must_have <= set(sd), sorted(must_have - set(sd))
    assert not must_not_have & set(sd)
    return dict(reversed(list(sd.items())))  # no reliance on key order


def _perturb_bn_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", SMALL)
def test_official_checkpoint_loads_strictly_and_reproduces(name):
    source = _eval(name)
    _perturb_bn_stats(source)
    official = _official_state_dict(name, source)
    if name == "pvt_tiny":
        assert official["pos_embed4"].shape == (1, 1 + 7 * 7, 512)
    wrapped = {"model": {f"module.{k}": v for k, v in official.items()}}
    torch.manual_seed(1)
    target = _eval(name)
    target.load_state_dict(checkpoint_filter_fn(wrapped, target), strict=True)
    assert set(official) == set(OFFICIAL[name][0](k) for k in target.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("name", SMALL)
def test_our_own_checkpoint_passes_through(name):
    model = timm.create_model(name, device="meta")
    sd = model.state_dict()
    assert checkpoint_filter_fn(sd, model).keys() == sd.keys()


@pytest.mark.parametrize("name", SMALL)
def test_pretrained_path_through_build_model_with_cfg(name):
    source = _eval(name)
    _perturb_bn_stats(source)
    official = _official_state_dict(name, source)
    model = _eval(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=official))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        few = _eval(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(state_dict=official))
        torch.testing.assert_close(few.forward_features(x), source.forward_features(x), rtol=0, atol=0)


def test_pvt_checkpoint_pos_embed_resampled_for_other_image_size():
    official = _official_state_dict("pvt_tiny", _eval("pvt_tiny"))
    model = _eval("pvt_tiny", img_size=256, pretrained=True, pretrained_cfg_overlay=dict(state_dict=official))
    assert model.stages[0].pos_embed.shape == (1, 64 * 64, 64)
    assert model.stages[3].pos_embed.shape == (1, 1 + 8 * 8, 512)
    torch.testing.assert_close(model.stages[3].pos_embed[:, :1], official["pos_embed4"][:, :1])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
