"""apply() over every supported model: identity, token counts, the original left untouched."""

import pytest
import torch
from models import CASES, DEIT_S, build

import tokenreduce


@pytest.mark.parametrize("mid,factory,shape,method", CASES)
def test_keep_ratio_one_reproduces_the_model_exactly(mid, factory, shape, method):
    model, x = build(factory, shape)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=1.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("mid,factory,shape,method", CASES)
def test_tokens_per_block_follow_the_plan(mid, factory, shape, method):
    model, x = build(factory, shape)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, example_input=x).eval()
    s = tokenreduce.summary(reduced)
    info = reduced.meta["tokenreduce"]
    sites = {site.block: site for site in info.plan.sites}
    prefix = info.model_map.blocks[0].num_prefix
    expected = info.model_map.blocks[0].num_tokens
    for block, _, attn_tokens, mlp_tokens in s.rows:
        site = sites.get(block)
        if site is not None and site.placement == "before":
            expected = prefix + site.n_out
        assert attn_tokens == expected, f"block {block}"
        if site is not None and site.placement == "after_attn":
            expected = prefix + site.n_out
        assert mlp_tokens == expected, f"block {block}"
    assert expected < info.model_map.blocks[0].num_tokens
    assert s.gflops_reduced < s.gflops_dense
    with torch.no_grad():
        out = reduced(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()


def test_paper_counts_on_deit_small():
    model, x = build(DEIT_S, (1, 3, 224, 224))
    for method, keeps in {"etps": (138, 97, 68), "dtps": (137, 96, 67), "evit": (138, 98, 70)}.items():
        plan = tokenreduce.apply(model, method=method, locs=[3, 6, 9], keep_ratio=0.7).meta["tokenreduce"].plan
        assert tuple(s.keep for s in plan.sites) == keeps, method
        assert [s.block for s in plan.sites] == [3, 6, 9]


def test_locs_accept_paths_and_default_to_the_paper_sites():
    model, x = build(DEIT_S, (1, 3, 224, 224))
    by_path = tokenreduce.apply(model, locs=["blocks.3", "blocks.6"]).meta["tokenreduce"].plan
    assert [s.block for s in by_path.sites] == [3, 6]
    default = tokenreduce.apply(model).meta["tokenreduce"].plan
    assert [s.block for s in default.sites] == [3, 6, 9]


def _snapshot(model):
    return {
        "modules": [
            (name, type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m)))
            for name, m in model.named_modules()
        ],
        "params": {name: (p, p.detach().clone()) for name, p in model.named_parameters()},
    }


@pytest.mark.parametrize("method", ["etps", "dtps"])
def test_the_original_model_is_untouched(method):
    model, x = build(DEIT_S, (2, 3, 224, 224))
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(x)
    reduced = tokenreduce.apply(model, method=method)
    reduced.train()
    reduced(x).sum().backward()
    reduced.eval()
    after = _snapshot(model)
    assert before["modules"] == after["modules"]
    for name, (p, value) in before["params"].items():
        q, _ = after["params"][name]
        assert p is q and torch.equal(q.detach(), value)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    # weights are shared, not copied
    shared = dict(reduced.named_parameters())
    assert shared["blocks.0.attn.qkv.weight"] is dict(model.named_parameters())["blocks.0.attn.qkv.weight"]


def test_a_second_input_size_recomputes_counts():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=224, dynamic_img_size=True).eval()
    reduced = tokenreduce.apply(model, method="dtps", aux=True).eval()
    with torch.no_grad():
        _, aux = reduced(torch.randn(1, 3, 256, 256))  # 256 patches
    assert [int(k.sum()) for k in aux.keeps] == [int(256 * 0.7), int(round(256 * 0.49, 6)), int(round(256 * 0.343, 6))]


def test_aux_masks_count_the_kept_tokens_in_eval():
    model, x = build(DEIT_S, (2, 3, 224, 224))
    for method in ("etps", "evit"):
        reduced = tokenreduce.apply(model, method=method, aux=True).eval()
        with torch.no_grad():
            _, aux = reduced(x)
        keeps = aux.keeps
        plan = reduced.meta["tokenreduce"].plan
        # each mask is over the 196 original patches; kept tokens of every site are alive
        for k, site in zip(keeps, plan.sites):
            assert k.shape == (2, 196)
            assert (k.sum(1) <= site.keep).all() and (k.sum(1) >= site.keep - site.extra * 3).all()
        alive = [k.sum(1) for k in keeps]
        assert all((a >= b).all() for a, b in zip(alive, alive[1:]))


def test_flops_of_deit_small_match_the_papers():
    """Multiply-adds at 224 px, locs [3, 6, 9], keep 0.7 (tps-reference Sec. 5), attention
    included on CPU (tokenreduce.flops registers the formula where torch lacks it)."""
    model, _ = build(DEIT_S, (1, 3, 224, 224))
    expected = {"dtps": 2.9, "dynamicvit": 2.9, "evit": 3.0, "etps": 3.0}
    for method, gflops in expected.items():
        s = tokenreduce.summary(tokenreduce.apply(model, method=method, locs=[3, 6, 9], keep_ratio=0.7))
        assert abs(s.gflops_dense - 4.6) / 4.6 < 0.01
        assert abs(s.gflops_reduced - gflops) / gflops < 0.03, (method, s.gflops_reduced)


def test_indexed_reducer_equals_its_plain_form():
    """Sites call squeeze's indexed form (one fused op); a reducer registered with only the plain
    form (gathered kept/pruned tensors) must give the same model output, bit for bit on CPU."""
    from tokenreduce import Reducer, get_reducer, register_method, register_reducer

    register_reducer(Reducer("squeeze_plain", lambda kept, pruned, scores: tokenreduce.ops.squeeze(kept, pruned)))
    method = register_method(
        "etps_plain", scorer="cls_attention", reducer="squeeze_plain", placement="after_attn", counts="per_site"
    )
    try:
        assert method.reducer.indexed is None and get_reducer("squeeze").indexed is not None
        model, x = build(DEIT_S, (2, 3, 224, 224))
        fused = tokenreduce.apply(model, method="etps", locs=[3, 6, 9], keep_ratio=0.5, example_input=x)
        plain = tokenreduce.apply(model, method="etps_plain", locs=[3, 6, 9], keep_ratio=0.5, example_input=x)
        with torch.no_grad():
            assert torch.equal(fused.eval()(x), plain.eval()(x))
    finally:
        tokenreduce.unregister_method("etps_plain")
        tokenreduce.unregister_reducer("squeeze_plain")
