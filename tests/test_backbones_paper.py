"""LV-ViT and PS-ViT backbones (the TPS supplement's other families): size, FLOPs, tracing,
checkpoints, the token labeling head and PS-ViT's sampling, and token reduction on both."""

import math
import re

import pytest
import timm
import torch
import torch.fx
from counting_compile import counting_compile

import tokenreduce
import tokenreduce.backbones
from tokenreduce.backbones import lvvit, psvit
from tokenreduce.flops import gflops

# name -> (params in M, GMACs at 224 px or None, source). LV-ViT params: the official README
# (github.com/zihangJiang/TokenLabeling); LV-ViT GMACs: DynamicViT (Rao et al. 2021, Table 3:
# 6.6 / 12.7), which counts the released architecture; LV-ViT-T has no published figure that
# counts it (see docs/backbones.md). PS-ViT: the official README (github.com/yuexy/PS-ViT).
PAPER = {
    "lvvit_t": (8.53, None),
    "lvvit_s": (26.15, 6.6),
    "lvvit_m": (55.83, 12.7),
    "psvit_ti_14": (4.8, 1.6),
    "psvit_b_14": (21.3, 5.4),
    "psvit_b_18": (21.3, 8.8),
}
SMALL = ["lvvit_t", "psvit_ti_14"]  # one per family, for tests that run real forwards
METHODS = ("etps", "evit", "dtps", "dynamicvit")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small CPU forwards on a shared box run faster on one thread
    yield
    torch.set_num_threads(before)


def _eval(name, **kwargs):
    return timm.create_model(name, **kwargs).eval()


def _published_match(measured, published):
    """Within 2 %, or equal to the figure at the precision it was published with (one decimal)."""
    return measured == pytest.approx(published, rel=0.02) or round(measured, 1) == published


# --------------------------------------------------------------------------- registry, size


@pytest.mark.parametrize("name", sorted(PAPER))
def test_registered_with_timm(name):
    assert timm.is_model(name)
    assert timm.models.model_entrypoint(name).__module__.startswith("tokenreduce.backbones.")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
    model = timm.create_model(name, device="meta")
    first = model.get_submodule(cfg.first_conv)
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == 3
    assert model.get_submodule(cfg.classifier) is model.get_classifier()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_the_papers(name):
    params, macs = PAPER[name]
    model = _eval(name, device="meta")
    measured = sum(p.numel() for p in model.parameters()) / 1e6
    assert _published_match(measured, params), measured
    if macs is not None:
        got = gflops(model, torch.randn(1, 3, 224, 224, device="meta"))
        assert _published_match(got, macs), got


def test_lvvit_t_flops_as_counted():
    """No published figure counts LV-ViT-T; this pins our count (docs/backbones.md): stem 1.24,
    blocks 1.58, heads 0.05 GMACs."""
    assert gflops(_eval("lvvit_t", device="meta"), torch.randn(1, 3, 224, 224, device="meta")) == pytest.approx(
        2.868, abs=0.001
    )


@pytest.mark.parametrize("name", SMALL)
def test_num_classes_and_reset_classifier(name):
    model = _eval(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)


# --------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("name", sorted(PAPER))
def test_symbolic_trace(name):
    torch.fx.symbolic_trace(_eval(name, device="meta")).graph.lint()


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("batch,height,width", [(1, 224, 224), (2, 96, 128)])
def test_traced_graph_matches_eager_at_any_size(name, batch, height, width):
    model = _eval(name)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_lvvit_pos_embed_is_exact_at_default_size():
    dynamic, fixed = _eval("lvvit_t"), _eval("lvvit_t", dynamic_img_size=False)
    fixed.load_state_dict(dynamic.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))


def test_inspect_finds_every_block_and_the_class_token():
    """LV-ViT: the skip_lam-scaled residuals are blocks, the class token is seen. PS-ViT: only the
    blocks after the sampling module (its iterations are a registered leaf)."""
    x = torch.randn(2, 3, 64, 64)
    lv = tokenreduce.inspect(_eval("lvvit_t"), example_input=x)
    assert [b.path for b in lv.blocks] == [f"blocks.{i}" for i in range(12)]
    assert all(b.num_prefix == 1 for b in lv.blocks) and "yes" in str(lv)
    ps = tokenreduce.inspect(_eval("psvit_ti_14"), example_input=x)
    assert [b.path for b in ps.blocks] == [f"blocks.{i}" for i in range(8)]
    assert all(b.num_prefix == 1 for b in ps.blocks)


# --------------------------------------------------------------------------- LV-ViT's token labeling head


def test_prediction_is_class_head_plus_half_the_max_token_logit():
    model = _eval("lvvit_t")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).max(dim=1).values
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        cls, dense = model.forward_dense(x)
    assert cls.shape == (2, 1000) and dense.shape == (2, 16, 1000)
    with pytest.raises(ValueError, match="no token labeling head"):
        _eval("lvvit_t", aux_head=False).forward_dense(x)


@pytest.mark.parametrize("method", METHODS)
def test_after_a_reduction_the_token_head_reads_the_surviving_tokens(method):
    model = _eval("lvvit_t")
    x = torch.randn(2, 3, 96, 96)  # 36 patch tokens
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, example_input=x).eval()
    seen = {}
    reduced.get_submodule("norm").register_forward_hook(lambda m, args, out: seen.update(tokens=out))
    with torch.no_grad():
        out = reduced(x)
    tokens = seen["tokens"]  # (B, 1 + N_final, C)
    last = reduced.meta["tokenreduce"].plan.sites[-1]  # EViT's appended token joins the max too
    assert tokens.shape[1] == 1 + last.keep + last.extra < 37 and last.extra == (method == "evit")
    with torch.no_grad():
        expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).amax(dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- PS-ViT's sampling


def _kernel_bilinear(feat, y, x):
    """The authors' CUDA rule for one channel map (H, W) at (y, x), float64, as a loop."""
    H, W = feat.shape
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                total += wy * wx * float(feat[yy, xx])
    return total


def test_sampling_matches_the_authors_bilinear_rule():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    points = torch.rand(2, 40, 2, generator=g, dtype=torch.float64) * torch.tensor([8.0, 10.0]) - 1.5
    points[0, :4] = torch.tensor([[0.0, 0.0], [4.0, 6.0], [2.0, 3.0], [-1.0, 2.0]], dtype=torch.float64)
    got = psvit.sample_points(feat, points)  # (B, n, C)
    for b in range(2):
        for i in range(40):
            y, x = float(points[b, i, 0]), float(points[b, i, 1])
            for c in range(3):
                assert got[b, i, c].item() == pytest.approx(_kernel_bilinear(feat[b, c], y, x), abs=1e-12)
    assert torch.equal(got[0, 0], feat[0, :, 0, 0]) and torch.equal(got[0, 1], feat[0, :, 4, 6])


def test_sampling_is_differentiable_in_the_points():
    feat = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    points = (torch.rand(1, 5, 2, dtype=torch.float64) * 4 + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: psvit.sample_points(feat, p), (points,))


def test_initial_points_are_grid_centres_in_raster_order():
    pts = psvit.grid_points(torch.zeros(2, 1, 56, 28), 14, 7)
    assert pts.shape == (2, 98, 2)
    assert pts[0, 0].tolist() == [2.0, 2.0] and pts[0, 1].tolist() == [2.0, 6.0] and pts[0, 7].tolist() == [6.0, 2.0]


def test_point_order_does_not_change_the_prediction(monkeypatch):
    """The official code numbers points column by column; ours row by row: same logits."""
    model = _eval("psvit_ti_14")
    for layer in model.ps_layers:  # give the offsets something to do
        if layer.offset_layer is not None:
            torch.nn.init.normal_(layer.offset_layer.weight, std=0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raster = model(x)
        raster_points = psvit.grid_points

        def column_major(feat, ph, pw):
            return raster_points(feat, ph, pw).reshape(-1, ph, pw, 2).transpose(1, 2).reshape(-1, ph * pw, 2)

        monkeypatch.setattr(psvit, "grid_points", column_major)
        torch.testing.assert_close(model(x), raster, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- token reduction


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("method", METHODS)
def test_keep_ratio_one_reproduces_the_model(name, method):
    model = _eval(name)
    x = torch.randn(2, 3, 64, 64)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=1.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("method", METHODS)
def test_flops_drop_at_the_default_sites(name, method):
    model = _eval(name)
    x = torch.randn(1, 3, 224, 224)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, example_input=x).eval()
    s = tokenreduce.summary(reduced)
    assert s.gflops_reduced < 0.9 * s.gflops_dense
    with torch.no_grad():
        out = reduced(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_default_sites_follow_the_supplement():
    x = torch.randn(1, 3, 224, 224)
    cases = {
        "lvvit_t": ["blocks.3", "blocks.6", "blocks.9"],  # 1-based 4, 7, 10
        "lvvit_s": ["blocks.4", "blocks.8", "blocks.12"],  # 1-based 5, 9, 13
        "lvvit_m": ["blocks.5", "blocks.10", "blocks.15"],
        "psvit_b_14": ["blocks.3", "blocks.6", "blocks.9"],
    }
    for name, paths in cases.items():
        plan = (
            tokenreduce.apply(_eval(name, device="meta"), method="dtps", keep_ratio=0.5, example_input=x.to("meta"))
            .meta["tokenreduce"]
            .plan
        )
        assert [s.path for s in plan.sites] == paths, name
        assert [s.keep for s in plan.sites] == [98, 49, 24], name
    assert lvvit.PAPER_LOCS["lvvit_s"][1] == (3, 6, 9, 12)


@pytest.mark.parametrize("name", SMALL)
def test_train_mode_runs_and_reaches_the_score_heads(name):
    reduced = tokenreduce.apply(_eval(name), method="dtps", keep_ratio=0.5, example_input=torch.randn(2, 3, 64, 64))
    out = reduced.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    grads = [p.grad for n, p in reduced.named_parameters() if "reduce_sites" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.slow  # ~10 s each: dynamo traces the whole model
@pytest.mark.parametrize("name", SMALL)
def test_reduced_model_compiles_to_one_graph(name):
    x = torch.randn(1, 3, 64, 64)
    reduced = tokenreduce.apply(_eval(name), method="dtps", keep_ratio=0.5, example_input=x).eval()
    compiled, graphs = counting_compile(reduced)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x))
    assert len(graphs) == 1


# --------------------------------------------------------------------------- checkpoints


def _perturb_bn_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


LVVIT_OFFICIAL = {
    "patch_embed.conv1.weight",
    "patch_embed.bn1.running_mean",
    "patch_embed.conv3.weight",
    "patch_embed.bn3.num_batches_tracked",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "cls_token",
    "pos_embed",
    "blocks.0.norm1.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.bias",
    "blocks.11.mlp.fc1.weight",
    "blocks.11.mlp.fc2.bias",
    "norm.weight",
    "head.weight",
    "aux_head.weight",
    "aux_head.bias",
}


def test_lvvit_official_checkpoint_loads_strictly_and_reproduces():
    source = _eval("lvvit_t")
    _perturb_bn_stats(source)
    official = {k: v.clone() for k, v in source.state_dict().items()}  # the official names are ours
    assert LVVIT_OFFICIAL <= set(official) and "blocks.0.attn.qkv.bias" not in official
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reversed(list(official.items()))}}
    target = _eval("lvvit_t", pretrained=True, pretrained_cfg_overlay=dict(state_dict=wrapped))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_lvvit_384_checkpoint_into_a_224_model():
    source = _eval("lvvit_t", img_size=384)
    sd = lvvit.checkpoint_filter_fn(source.state_dict(), _eval("lvvit_t"))
    assert sd["pos_embed"].shape == (1, 1 + 14 * 14, 240)
    torch.testing.assert_close(sd["pos_embed"][:, :1], source.pos_embed[:, :1])
    assert source.pos_embed.shape == (1, 1 + 24 * 24, 240)


def _official_psvit(model):
    """Key naming of github.com/yuexy/PS-ViT: ``trans_layers``, plus the ``point_coord`` buffer."""
    sd = {re.sub(r"^blocks\.", "trans_layers.", k): v.clone() for k, v in model.state_dict().items()}
    ph, pw = model.points
    sd["point_coord"] = torch.rand(1, ph * pw, 2)
    return sd


def test_psvit_official_checkpoint_loads_strictly_and_reproduces():
    source = _eval("psvit_ti_14")
    _perturb_bn_stats(source)
    for layer in source.ps_layers:
        if layer.offset_layer is not None:
            torch.nn.init.normal_(layer.offset_layer.weight, std=0.05)
    official = _official_psvit(source)
    must = {
        "stem.0.weight",
        "stem.1.running_var",
        "stem.4.conv1.weight",
        "stem.4.downsample.0.weight",
        "stem.5.bn3.bias",
        "pos_layer.weight",
        "ps_layers.0.position_layer.weight",
        "ps_layers.0.transformer_layer.attn.qkv.weight",
        "ps_layers.2.offset_layer.bias",
        "trans_layers.7.mlp.fc2.weight",
        "cls_token",
        "norm.weight",
        "head.bias",
        "point_coord",
    }
    assert must <= set(official), sorted(must - set(official))
    assert "ps_layers.3.offset_layer.weight" not in official and "stem.5.downsample.0.weight" not in official
    target = _eval(
        "psvit_ti_14",
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict={"model": {f"module.{k}": v for k, v in official.items()}}),
    )
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("name", SMALL)
def test_our_own_checkpoint_passes_through(name):
    model = timm.create_model(name, device="meta")
    module = lvvit if name.startswith("lvvit") else psvit
    sd = model.state_dict()
    assert module.checkpoint_filter_fn(sd, model).keys() == sd.keys()
