"""Properties of ``apply`` over generated small ViTs x methods x sites x ratios x batch sizes.

Built on the public API only (apply, summary, inspect, list_methods). For every generated case:

* ``apply`` returns, or raises TokenReduceError / ValueError / TypeError with a message;
* the reduced output has the dense output's shape and is finite for finite input;
* keep ratio 1 reproduces the dense model exactly in eval;
* the token counts ``summary`` reports equal the counts measured at run time (an
  ``fx.Interpreter`` over the reduced graph, at the nodes analysis marked), match the plan, and
  never grow from block to block;
* NaN in one image stays in that image.

The default run is bounded (few examples, tiny models; derandomised under CI by the profile in
conftest.py); the hybrids (PVT, CvT) run the same checks under ``-m slow``.
"""

import itertools
import math

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

import tokenreduce

ALLOWED = (tokenreduce.TokenReduceError, ValueError, TypeError)
BUILTIN = ("etps", "evit", "dtps", "dynamicvit")


def _roles(node):
    """(role, block) marks analysis left on ``node``: anchors, or the older ``tags`` form."""
    meta = node.meta.get("tokenreduce", {})
    found = set(meta.get("anchors", ()))
    if "role" in meta and "block" in meta:
        found.add((meta["role"], meta["block"]))
    return found


class _Counter(fx.Interpreter):
    """Runs the reduced graph and records token counts at the marked nodes: the queries of every
    block's attention (B, H, N, d) and every block's output (B, N, C)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.attn, self.exit = {}, {}

    def run_node(self, n):
        out = super().run_node(n)
        for role, block in _roles(n):
            if role in ("q", "query") and isinstance(out, torch.Tensor):
                self.attn[block] = out.shape[-2]
            elif role == "exit" and isinstance(out, torch.Tensor):
                self.exit[block] = out.shape[1]
        return out


def make_vit(depth, heads, head_dim, patch, grid, class_token, reg_tokens, fused):
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=patch * grid,
        patch_size=patch,
        embed_dim=heads * head_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=2.0,
        num_classes=3,
        class_token=class_token,
        reg_tokens=reg_tokens,
        global_pool="token" if class_token else "avg",
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused  # False: explicit softmax(q @ k^T) attention
    return model


def check_properties(model, x, method, locs, ratio):
    """Every property above for one case; returns the reduced model (None when apply refused)."""
    try:
        reduced = tokenreduce.apply(model, method=method, locs=locs, keep_ratio=ratio, example_input=x)
    except ALLOWED as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None
    reduced.eval()
    with torch.no_grad():
        dense_out = model(x)
        out = reduced(x)
    assert out.shape == dense_out.shape
    assert torch.isfinite(out).all()

    # reported counts == run-time counts == plan, never growing
    rows = tokenreduce.summary(reduced).rows
    counter = _Counter(reduced)
    with torch.no_grad():
        counter.run(x)
    blocks = [b for b, _, _, _ in rows]
    assert {b: a for b, _, a, _ in rows} == {b: counter.attn[b] for b in blocks}
    assert {b: m for b, _, _, m in rows} == {b: counter.exit[b] for b in blocks}
    info = reduced.meta["tokenreduce"]
    by_block = {b: (a, m) for b, _, a, m in rows}
    for site in info.plan.sites:
        after = by_block[site.block][1 if site.placement == "after_attn" else 0]
        assert after == site.num_prefix + site.n_out, f"site {site.index} at {site.path}"
    stage = {b.index: b.stage for b in info.model_map.blocks}
    for (b0, _, a0, m0), (b1, _, a1, _) in itertools.pairwise(rows):
        assert m0 <= a0, f"block {b0}: the MLP sees more tokens than the attention"
        if stage[b0] == stage[b1]:
            assert a1 <= m0, f"block {b1} sees more tokens than block {b0} put out"
    if rows:
        assert rows[-1][3] <= rows[-1][2]

    # keep 1 == dense, exactly, in eval
    same = tokenreduce.apply(model, method=method, locs=locs, keep_ratio=1.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(same(x), dense_out), "keep_ratio=1.0 changed the output"

    # NaN in one image stays in that image
    if x.shape[0] >= 2:
        poisoned = x.clone()
        poisoned[0, :, : x.shape[2] // 2] = float("nan")
        with torch.no_grad():
            out_p = reduced(poisoned)
            alone = reduced(x[1:])
        assert torch.isfinite(out_p[1:]).all(), "NaN in image 0 reached another image"
        torch.testing.assert_close(out_p[1:], alone, rtol=1e-4, atol=1e-5)
    return reduced


@st.composite
def cases(draw):
    depth = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    patch = draw(st.sampled_from([4, 8]))
    grid = draw(st.integers(1, 4))
    class_token = draw(st.booleans())
    reg_tokens = draw(st.sampled_from([0, 0, 1, 2]))
    fused = draw(st.booleans())
    methods = [m for m in tokenreduce.list_methods() if m in BUILTIN]
    method = draw(st.sampled_from(methods))
    locs = sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1, max_size=depth)))
    ratio = draw(st.one_of(st.sampled_from([1.0, 0.9, 0.7, 0.5, 0.3]), st.floats(0.05, 1.0)))
    batch = draw(st.integers(1, 3))
    model_args = (depth, heads, head_dim, patch, grid, class_token, reg_tokens, fused)
    return model_args, method, locs, ratio, batch


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_generated_vits(case):
    model_args, method, locs, ratio, batch = case
    model = make_vit(*model_args)
    patch, grid = model_args[3], model_args[4]
    x = torch.randn(batch, 3, patch * grid, patch * grid)
    check_properties(model, x, method, locs, ratio)


@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(
    locs=st.one_of(st.lists(st.integers(-3, 6), max_size=3), st.just([1.5]), st.just(["blocks.9"]), st.none()),
    ratio=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.floats(-1, 2), max_size=3),
        st.sampled_from(["0.5", True, None]),
    ),
    method=st.sampled_from(["etps", "dtps", "nope", ""]),
)
def test_bad_requests_raise_a_clear_error(locs, ratio, method):
    model = make_vit(3, 1, 8, 8, 2, True, 0, True)
    x = torch.randn(1, 3, 16, 16)
    try:
        reduced = tokenreduce.apply(model, method=method, locs=locs, keep_ratio=ratio, example_input=x)
    except ALLOWED as exc:
        assert str(exc).strip()
        return
    # accepted: it must then be a valid request, and the reduced model must run
    assert method in tokenreduce.list_methods()
    flat = ratio if isinstance(ratio, list) else [ratio]
    assert all(isinstance(r, float) and 0 < r <= 1 and not math.isnan(r) for r in flat)
    with torch.no_grad():
        assert reduced.eval()(x).shape == (1, 3)


def test_the_reported_evit_bug_case():
    """The case once reported (depth 2, one patch token, evit, locs [0], keep 1.0)."""
    model = make_vit(2, 1, 8, 8, 1, True, 0, True)
    check_properties(model, torch.randn(2, 3, 8, 8), "evit", [0], 1.0)


HYBRIDS = [("pvt_tiny", 64), ("pvt_tiny", 96), ("cvt_13", 64), ("cvt_13", 96)]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", HYBRIDS)
@pytest.mark.parametrize("method", BUILTIN)
@pytest.mark.parametrize("ratio", [0.7, 0.5])
def test_hybrids(name, size, method, ratio):
    import tokenreduce.backbones  # noqa: F401  (registers pvt_* and cvt_* with timm)

    sized = {"img_size": size} if name.startswith("pvt") else {}  # CvT takes any size as it is
    model = timm.create_model(name, num_classes=5, **sized).eval()
    check_properties(model, torch.randn(2, 3, size, size), method, None, ratio)
