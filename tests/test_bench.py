"""tokenreduce.bench: the exact limit, the timers, the protocol records and the report (CPU, tiny models)."""

import copy
import json

import pytest
import timm
import torch

import tokenreduce
from tokenreduce import bench
from tokenreduce.bench.limit import TruncateSite, cut_positions
from tokenreduce.bench.protocol import Protocol, Result, Row, Timing, Variant
from tokenreduce.bench.report import derived
from tokenreduce.bench.table import format_table
from tokenreduce.methods import Scorer
from tokenreduce.runtime.state import TokenState

X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64).eval()


@pytest.mark.parametrize("method", ["etps", "evit", "dtps", "dynamicvit"])
def test_limit_has_the_reduced_models_token_counts(tiny, method):
    reduced = tokenreduce.apply(tiny, method=method, keep_ratio=0.6, example_input=X).eval()
    limit = bench.limit_of(tokenreduce.apply(tiny, method=method, keep_ratio=0.6, example_input=X)).eval()
    assert all(isinstance(s, TruncateSite) for s in limit.reduce_sites)
    assert tokenreduce.summary(limit).rows == tokenreduce.summary(reduced).rows  # tokens per block, every block
    with torch.no_grad():
        assert limit(X).shape == reduced(X).shape


def test_limit_sites_are_the_first_tokens_and_identity_at_keep_1(tiny):
    seen = []
    limit = bench.limit_of(tokenreduce.apply(tiny, method="evit", keep_ratio=0.5, example_input=X)).eval()
    limit.reduce_sites[0].register_forward_hook(lambda m, args, out: seen.append((args[0], out[0])))
    with torch.no_grad():
        limit(X)
    ((x_in, x_out),) = seen
    assert x_in.shape[1] == 17 and x_out.shape[1] == 1 + 8 + 1  # P + ceil(0.5 * 16) + EViT's fused token
    assert torch.equal(x_out, x_in[:, :10])
    full = bench.limit_of(tokenreduce.apply(tiny, method="etps", keep_ratio=1.0, example_input=X)).eval()
    with torch.no_grad():
        assert torch.equal(full(X), tiny(X))


# Small members of the families whose position tables follow the tokens: 1 class token + 16 patches.
POSITIONED = {
    "rope": ("vit_small_patch16_rope_224", dict(img_size=64, embed_dim=96, depth=6, num_heads=2)),  # rotary
    "beit": ("beit_base_patch16_224", dict(img_size=64, embed_dim=96, depth=6, num_heads=2)),  # rel. pos. bias
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=6)),  # rotary, patches only
}
LOCS = [1, 3]


@pytest.fixture(scope="module", params=sorted(POSITIONED))
def positioned(request):
    name, kwargs = POSITIONED[request.param]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()  # pooled features: O(1)
    with torch.no_grad():
        for key, p in m.named_parameters():
            if key.rsplit(".", 1)[-1].startswith("gamma_"):
                p.fill_(1.0)  # layer scale 1e-5 (RoPE ViT) would leave every block near the identity
            if key.endswith("relative_position_bias_table"):
                p.normal_()  # BEiT starts at zeros: a bias cut at the wrong rows would go unseen
    return m, torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])


def _expected_rows(reduced) -> list[tuple[int, int, int]]:
    """(block, attention tokens, MLP tokens) of every block, from the plan's sites by hand."""
    info = reduced.meta["tokenreduce"]
    P, n = info.plan.sites[0].num_prefix, info.plan.sites[0].n_in
    rows, now, sites = [], P + n, list(info.plan.sites)
    for b in range(len(info.model_map.blocks)):
        here = [s for s in sites if s.block == b]
        if here and here[0].placement == "before":
            now = P + here[0].n_out
        attn = now
        if here and here[0].placement == "after_attn":
            now = P + here[0].n_out
        rows.append((b, attn, now))
    return rows


@pytest.mark.parametrize("method", ["etps", "evit", "dtps"])
def test_limit_of_positioned_models_cuts_the_tables_and_has_the_planned_counts(positioned, method):
    model, x = positioned
    reduced = tokenreduce.apply(model, method=method, locs=LOCS, keep_ratio=0.6, example_input=x).eval()
    limit = bench.limit_of(tokenreduce.apply(model, method=method, locs=LOCS, keep_ratio=0.6, example_input=x)).eval()
    targets = [n.target for n in limit.graph.nodes if n.op == "call_function"]
    assert cut_positions in targets  # the tables follow the tokens: each read is cut, none gathered
    assert not any(getattr(t, "__name__", "") == "follow_positions" for t in targets)
    rows = [(b, na, nm) for b, _, na, nm in tokenreduce.summary(limit).rows]  # counted by running the graph
    assert rows == [(b, na, nm) for b, _, na, nm in tokenreduce.summary(reduced).rows] == _expected_rows(reduced)
    with torch.no_grad():
        assert limit(x).shape == reduced(x).shape


class _FirstTokens(Scorer):
    """Scores that fall with the position: the top k are the first k patches."""

    learned = True

    def forward(self, patches, prev_keep, attn):
        B, n = patches.shape[:2]
        return -torch.arange(n, dtype=patches.dtype, device=patches.device).expand(B, n)


def test_limit_of_positioned_models_equals_the_reduced_model_keeping_the_first_tokens(positioned):
    """DynamicViT drops what it does not keep: with scores that keep the first k patches, the
    reduced model (its tokens and tables gathered by position) computes the limit's model."""
    model, x = positioned
    reduced = tokenreduce.apply(model, method="dynamicvit", locs=LOCS, keep_ratio=0.5, example_input=x).eval()
    limit = bench.limit_of(copy.deepcopy(reduced)).eval()
    for site in reduced.reduce_sites:
        site.scorer = _FirstTokens(1, site.num_prefix)
    with torch.no_grad():
        want, got = reduced(x), limit(x)
        assert want.abs().mean() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, model(x), atol=1e-2)  # the sites did remove tokens


def test_cut_positions_is_a_view_of_the_first_rows():
    state = TokenState(pos=torch.arange(5).expand(2, 5), keep=None, n_ref=16)
    rope = torch.randn(16, 8)  # (n_ref, d) against q (B, H, n, d): token axis 2, patches only
    assert torch.equal(cut_positions(rope, state, (2,), 4, 1, False, False, 1.0), rope[:5])
    bias = torch.randn(1, 3, 17, 17)  # against logits (B, H, P + n, P + n)
    cut = cut_positions(bias, state, (2, 3), 4, 1, True, True)
    assert torch.equal(cut, bias[:, :, :6, :6]) and cut.data_ptr() == bias.data_ptr()
    full = TokenState(pos=torch.arange(16).expand(2, 16), keep=None, n_ref=16)
    assert cut_positions(bias, full, (2, 3), 4, 1, True, False) is bias


def test_build_variants_shares_limits_and_records_refusals(tiny):
    modules, rows = bench.build_variants("tiny", tiny, methods=("dtps", "dynamicvit", "nope"), ratios=(0.7,), example=X)
    assert [r.variant for r in rows] == ["dense", "limit[dtps]@0.7", "dtps@0.7", "dynamicvit@0.7", "nope@0.7"]
    assert rows[2].limit == rows[3].limit == "limit[dtps]@0.7"
    assert rows[4].note.startswith("unsupported: ") and "unknown method 'nope'" in rows[4].note
    assert set(modules) == {"dense", "limit[dtps]@0.7", "dtps@0.7", "dynamicvit@0.7"}
    assert rows[2].tokens == [1 + 11, 1 + 7, 1 + 5]


def test_round_robin_interleaves_and_counts_calls():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    per_call = bench.round_robin(fns, "cpu", iters=2, warmup=1, repeats=3)
    assert {k: len(v) for k, v in per_call.items()} == {"a": 3, "b": 3}
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then a repeat is every fn in turn
    assert all(ms >= 0 for v in per_call.values() for ms in v)


def test_protocol_refuses_bad_requests():
    with pytest.raises(ValueError, match="amp: expected one of bf16, fp16, none, got 'fp8'"):
        Protocol(amp="fp8")
    with pytest.raises(ValueError, match="timings: mode must be one of eager, default"):
        Protocol(timings=((8, "fast"),))
    with pytest.raises(ValueError, match="timings: batch must be an int >= 1, got 0"):
        Protocol(timings=((0, "eager"),))
    with pytest.raises(ValueError, match="repeats: must be >= 1"):
        Protocol(repeats=0)
    assert Variant.parse("limit[etps]@0.7") == Variant("limit", "etps", 0.7)
    assert Variant.parse("dynamicvit@0.5").name == "dynamicvit@0.5"
    with pytest.raises(ValueError, match="variant: expected 'dense'"):
        Variant.parse("etps")


def _result() -> Result:
    def row(name, kind, ms, kernel_us=None, limit=None):
        return Row(
            model="m",
            variant=name,
            kind=kind,
            limit=limit,
            timings=[Timing(batch=10, mode="default", ms=ms, kernel_us=kernel_us, host_ms=1.0)],
        )

    return Result(
        meta={"device_type": "cuda", "protocol": {"amp": "bf16", "img_size": 224}},
        rows=[
            row("dense", "dense", [10.0, 10.0, 12.0], 9000.0),
            row("limit[etps]@0.7", "limit", [5.0, 6.0, 7.0], 5000.0),
            row("etps@0.7", "reduced", [8.0, 7.5, 9.0], 6250.0, limit="limit[etps]@0.7"),
        ],
    )


def test_report_ratios_from_medians():
    result = _result()
    d = derived(result, result.rows[2], 10, "default")
    assert d["img_s"] == pytest.approx(10 * 1e3 / 8.0)
    assert d["vs_dense"] == pytest.approx(10.0 / 8.0)  # medians 10 and 8 ms
    assert d["vs_limit"] == pytest.approx(6.0 / 8.0)
    assert d["vs_limit_gpu"] == pytest.approx(5000 / 6250)
    assert result.rows[1].timings[0].spread == pytest.approx(2 / 6)
    text = bench.screen(result)
    assert "b10 compiled img/s" in text and "0.750" in text and "0.800" in text
    md = bench.markdown(result)
    assert "| etps@0.7 |  | — | 1,250 | 1.25 | 0.750 | 6.25 | 1.00 | 0.800 | — |" in md


def test_result_json_round_trip():
    result = _result()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rows"][0]["timings"][0]["median_ms"] == 10.0
    assert bench.screen(Result.from_dict(data)) == bench.screen(result)
    with pytest.raises(ValueError, match="expected a dict with 'meta' and 'rows'"):
        Result.from_dict({"rows": []})


def test_launch_bound_rows_are_marked():
    t = Timing(batch=256, mode="default", ms=[5.0], host_ms=6.0)
    assert t.launch_bound and not Timing(batch=256, mode="default", ms=[5.0], host_ms=2.0).launch_bound


def test_format_table():
    assert format_table([("a", "n"), ("xyz", "1")], right=(False, True)) == "a    n\n---  -\nxyz  1"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table([("a", "b"), ("c",)])


@pytest.mark.slow
def test_measure_compiled_cpu(tiny):
    protocol = Protocol(device="cpu", amp="none", img_size=64, timings=((2, "default"),), iters=1, warmup=0, repeats=1)
    result = bench.measure("tiny", protocol, dense=tiny, methods=("etps",))
    for row in result.rows:
        (t,) = row.timings
        assert t.graphs == 1 and t.graph_breaks == 0 and t.img_s > 0


def test_img_size_builds_the_model_and_plans_at_that_size():
    from tokenreduce.bench.models import load_model, native_img_size

    assert native_img_size("deit_base_patch16_384") == 384 and native_img_size("pvt_tiny") == 224
    dense = load_model("deit_tiny_patch16_224", img_size=96).dense  # timm's img_size=96: 6 x 6 patches
    x = torch.randn(2, 3, 96, 96)
    modules, rows = bench.build_variants("tiny@96", dense, methods=("etps",), ratios=(0.7,), example=x)
    assert rows[1].tokens == rows[2].tokens == [1 + 26, 1 + 19, 1 + 14]  # ceil(0.7 * 36) = 26, then 19, 14
    with torch.no_grad():
        assert modules["limit[etps]@0.7"](x).shape == modules["etps@0.7"](x).shape == (2, 1000)
