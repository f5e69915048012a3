"""Hybrid ViTs (PVT, CvT, timm's PVT-v2 and Twins): spatial sites served by padding/masking."""

import pytest
import timm
import torch
from counting_compile import counting_compile

import tokenreduce
import tokenreduce.backbones  # noqa: F401  (registers pvt_* and cvt_* with timm)
from tokenreduce.runtime import ReductionSite

LEARNED = ("dtps", "dynamicvit")
HYBRIDS = [
    ("pvt_tiny", 0.7, 224),
    ("cvt_13", 0.5, 224),
    pytest.param("pvt_v2_b0", 0.7, 224, marks=pytest.mark.slow),
    pytest.param("twins_pcpvt_small", 0.7, 224, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # convolutions on 2 busy cores run faster on one
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,ratio,size", HYBRIDS)
@pytest.mark.parametrize("method", LEARNED)
def test_keep_ratio_one_reproduces_the_model(name, ratio, size, method):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=1.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("name,ratio,size", HYBRIDS)
def test_flops_fall_as_planned(name, ratio, size):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=ratio, example_input=x).eval()
    s = tokenreduce.summary(reduced)
    assert s.gflops_reduced < 0.9 * s.gflops_dense
    plan = reduced.meta["tokenreduce"].plan
    tokens = {block: attn for block, _, attn, _ in s.rows}
    blocks = reduced.meta["tokenreduce"].model_map.blocks
    for site in plan.sites:
        assert tokens[site.block] == blocks[site.block].num_prefix + site.keep
    with torch.no_grad():
        assert reduced(x).shape == model(x).shape


def test_default_sites_follow_the_paper():
    pvt = tokenreduce.apply(timm.create_model("pvt_tiny"), method="dtps").meta["tokenreduce"].plan
    assert [s.path for s in pvt.sites] == ["stages.1.blocks.0", "stages.2.blocks.0", "stages.3.blocks.0"]
    assert [s.keep for s in pvt.sites] == [548, 137, 34]  # 0.7 of each stage's 784, 196, 49
    cvt = tokenreduce.apply(timm.create_model("cvt_13"), method="dtps", keep_ratio=0.5).meta["tokenreduce"].plan
    assert [s.path for s in cvt.sites] == ["stages.2.blocks.3", "stages.2.blocks.6", "stages.2.blocks.9"]
    assert [s.keep for s in cvt.sites] == [98, 49, 24]


def test_inspect_lists_the_spatial_sites():
    table = str(tokenreduce.inspect(timm.create_model("pvt_tiny")))
    assert "9 spatial site(s)" in table and "stages.3.blocks.1" in table


@pytest.mark.parametrize("name,ratio,locs", [("pvt_tiny", 0.7, None), ("cvt_13", 0.5, ["stages.2.blocks.3"])])
def test_mask_path_equals_pad_path_on_the_same_decisions(name, ratio, locs, monkeypatch):
    """Training form (masks before spatial ops) and inference form (pad into the grid) agree
    when both make the same keep decisions: the Gumbel sampler is replaced by top-k."""

    def top_k_keep(log_probs, tau=1.0):
        n = log_probs.shape[1]
        idx = log_probs[..., 0].topk(int(round(n * ratio, 6)), dim=1).indices
        return torch.zeros_like(log_probs[..., :1]).scatter(1, idx.unsqueeze(-1), 1.0)

    monkeypatch.setattr(tokenreduce.ops, "gumbel_keep", top_k_keep)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    reduced = tokenreduce.apply(model, method="dynamicvit", locs=locs, keep_ratio=ratio).eval()
    with torch.no_grad():
        padded = reduced(x)
        for m in reduced.modules():  # sites in their training form; the rest (BatchNorm) in eval
            if isinstance(m, ReductionSite):
                m.train()
        masked = reduced(x)
    assert not torch.allclose(padded, model(x), atol=1e-3)
    # masked attention leaves dropped keys an eps share (tps-reference Sec. 2): close, not equal
    torch.testing.assert_close(masked, padded, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["pvt_tiny", "cvt_13"])
def test_a_larger_input_works(name):
    model = timm.create_model(name).eval()
    reduced = tokenreduce.apply(model, method="dtps").eval()
    with torch.no_grad():
        out = reduced(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["pvt_tiny", "cvt_13"])
def test_train_mode_runs_and_reaches_the_heads(name):
    model = timm.create_model(name)
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=0.5, aux=True).train()
    out, aux = reduced(torch.randn(2, 3, 224, 224))
    (out.sum() + sum(k.sum() for k in aux.keeps)).backward()
    grads = [p.grad for n, p in reduced.named_parameters() if n.startswith("reduce_sites")]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["pvt_tiny", "cvt_13"])
def test_compiles_without_graph_breaks(name):
    model = timm.create_model(name).eval()
    reduced = tokenreduce.apply(model, method="dtps").eval()
    compiled, compiles = counting_compile(reduced)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x))
    assert len(compiles) == 1


def test_an_appended_token_is_refused_where_a_grid_follows():
    # EViT's fuse reducer appends a token with no grid position; PVT's stage 2 has grids
    tokenreduce.register_method("fuse_random", scorer="random", reducer="fuse", placement="before", counts="per_site")
    try:
        with pytest.raises(tokenreduce.TokenReduceError, match="appended token has no grid position"):
            tokenreduce.apply(timm.create_model("pvt_tiny"), method="fuse_random", locs=["stages.1.blocks.0"])
    finally:
        tokenreduce.unregister_method("fuse_random")
