"""dTPS's training-form squeeze (ops/squeeze.py ``squeeze_masked``) against the authors' formula.

The reference is ``oracle_train``: their training branch written out in float64 for one image.
Value and gradient (w.r.t. ``x``, ``keep`` and ``pruned_now``, by ``torch.autograd`` on both) must
agree wherever every token's host is clear; the kept rows must also equal the split form.
"""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings
from oracle_train import oracle_hosts, oracle_squeeze_masked

from tokenreduce.ops import squeeze, squeeze_masked
from tokenreduce.ops.squeeze import _training_hosts, cosine

GRAD_RTOL = 1e-6


def masked_tokens(seed, B=2, n=7, C=5, p_keep=0.4, p_now=0.35, dtype=torch.float64):
    """x (B, n, C) Gaussian; each token kept, pruned now, or dropped earlier (both masks 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, C, generator=g, dtype=torch.float64)
    u = torch.rand(B, n, 1, generator=g, dtype=torch.float64)
    keep = (u < p_keep).to(dtype)
    pruned_now = ((u >= p_keep) & (u < p_keep + p_now)).to(dtype)
    return x.to(dtype), keep, pruned_now


def host_gap(x, keep):
    """(B, n): best minus second-best similarity among each token's candidate hosts (inf with <= 1)."""
    cos = cosine(x.double(), x.double())
    n = x.shape[1]
    ok = (keep.transpose(1, 2) > 0.5) & ~torch.eye(n, dtype=torch.bool)
    masked = cos.masked_fill(~ok, -math.inf)
    if n < 2:
        return torch.full(x.shape[:2], math.inf, dtype=torch.float64)
    top = masked.topk(2, dim=-1).values
    return torch.where(torch.isinf(top[..., 1]), math.inf, top[..., 0] - top[..., 1])


def grads(fn, x, keep, pruned_now, upstream):
    """Value and (d/dx, d/dkeep, d/dpruned_now) of <fn(x, keep, pruned_now), upstream>; None -> 0."""
    inputs = [t.detach().clone().requires_grad_() for t in (x, keep, pruned_now)]
    out = fn(*inputs)
    got = torch.autograd.grad((out * upstream).sum(), inputs, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got)]


def assert_matches_oracle(x, keep, pruned_now, seed=0):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    out, ours = grads(squeeze_masked, x, keep, pruned_now, upstream)
    ref, theirs = grads(oracle_squeeze_masked, x, keep, pruned_now, upstream)
    scale = float(x.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * scale)
    # Absolute slack: relative to the gradient's size, plus rounding at the inputs' scale (a
    # gradient that is 0 in exact arithmetic, such as x_i - x_j for equal tokens, may read 1e-17).
    floor = 1e-12 * (1.0 + scale) * float(upstream.abs().max())
    for name, a, b in zip(("x", "keep", "pruned_now"), ours, theirs):
        torch.testing.assert_close(
            a,
            b,
            rtol=GRAD_RTOL,
            atol=GRAD_RTOL * float(b.abs().max()) + floor,
            msg=lambda m, name=name: f"d/d{name}: {m}",
        )


@pytest.mark.parametrize("seed", range(6))
def test_value_and_gradient_match_the_authors_formula(seed):
    x, keep, pruned_now = masked_tokens(seed)
    assert (host_gap(x, keep) > 1e-6).all()  # every host is clear: the comparison is meaningful
    assert keep.sum() > 1 and pruned_now.sum() > 0 and ((keep + pruned_now) == 0).any()
    assert_matches_oracle(x, keep, pruned_now, seed)


def test_gradient_paths_are_the_authors():
    """keep enters only as a boolean host mask; pruned_now's gradient reaches every token that has
    a host (kept and earlier-dropped ones too, through w = exp(c m) m at m = 0)."""
    x, keep, pruned_now = masked_tokens(3, B=1, n=9)
    xs, ks, ps = (t.clone().requires_grad_() for t in (x, keep, pruned_now))
    (squeeze_masked(xs, ks, ps) * torch.randn(x.shape, dtype=x.dtype)).sum().backward()
    assert ks.grad is None
    has_host = [h is not None for h in oracle_hosts(x, keep)[0]]
    for i in range(x.shape[1]):
        assert (ps.grad[0, i, 0] != 0) == has_host[i], i
    kept_with_host = [i for i in range(x.shape[1]) if keep[0, i, 0] == 1 and has_host[i]]
    dropped_earlier = [i for i in range(x.shape[1]) if keep[0, i, 0] + pruned_now[0, i, 0] == 0]
    assert kept_with_host and dropped_earlier and all(ps.grad[0, i, 0] != 0 for i in dropped_earlier)


@st.composite
def masked_inputs(draw, dtype=torch.float64):
    """Small images with duplicated, scaled and zero tokens among Gaussian ones, and random
    kept / pruned-now / dropped-earlier states."""
    B, n, C = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(B, n, C, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    for t in range(n):
        kind = draw(st.sampled_from(["fresh", "fresh", "fresh", "dup", "scaled", "zero"]))
        if kind == "zero":
            x[:, t] = 0.0
        elif kind in ("dup", "scaled") and t > 0:
            x[:, t] = x[:, draw(st.integers(0, t - 1))] * (3.0 if kind == "scaled" else 1.0)
    states = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, 2), min_size=n, max_size=n), min_size=B, max_size=B))
    ).unsqueeze(-1)
    return x.to(dtype), (states == 0).to(dtype), (states == 1).to(dtype)


@settings(max_examples=60)
@given(masked_inputs())
def test_matches_the_oracle_on_drawn_inputs(inputs):
    x, keep, pruned_now = inputs
    out = squeeze_masked(x, keep, pruned_now)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Rows that are not kept come back bit for bit, whatever the hosts.
    assert torch.equal(out[(keep == 0).expand_as(x)], x[(keep == 0).expand_as(x)])
    assume(bool((host_gap(x, keep) > 1e-9).all()))  # near-ties may be broken differently
    host, _, has_host = _training_hosts(x, keep)
    expected = oracle_hosts(x, keep)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            assert (int(host[b, i]) if has_host[b, i] else None) == expected[b][i]
    assert_matches_oracle(x, keep, pruned_now)


def test_ties_go_to_the_lowest_index():
    h = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    p = torch.tensor([1.0, 1.5, 0.0], dtype=torch.float64)
    x = torch.stack([p, h, h.clone(), p * -1]).unsqueeze(0)  # token 1 and 2: two equal hosts
    keep = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64).reshape(1, 4, 1)
    pruned_now = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 4, 1)
    out = squeeze_masked(x, keep, pruned_now)
    c = float(cosine(p.reshape(1, 1, 3), h.reshape(1, 1, 3)))
    fused = (math.e * h + math.exp(c) * p) / (math.e + math.exp(c))
    torch.testing.assert_close(out[0, 1], fused, rtol=1e-12, atol=0)
    assert torch.equal(out[0, [0, 2, 3]], x[0, [0, 2, 3]])
    assert oracle_hosts(x, keep)[0] == [1, 2, 1, 1]
    assert _training_hosts(x, keep)[0][0].tolist() == [1, 2, 1, 1]
    torch.testing.assert_close(oracle_squeeze_masked(x, keep, pruned_now), out, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_kept_rows_equal_the_split_form(seed):
    x, keep, pruned_now = masked_tokens(seed + 10, B=3, n=10)
    out = squeeze_masked(x, keep, pruned_now)
    for b in range(x.shape[0]):
        kept, now = keep[b, :, 0].bool(), pruned_now[b, :, 0].bool()
        assert kept.any()
        expected = squeeze(x[b : b + 1, kept], x[b : b + 1, now])
        torch.testing.assert_close(out[b : b + 1, kept], expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[b, ~kept], x[b, ~kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_cases_are_bit_exact(dtype):
    x, keep, pruned_now = masked_tokens(5, B=2, n=9, dtype=dtype)
    nothing = torch.zeros_like(keep)
    assert torch.equal(squeeze_masked(x, keep, nothing), x)  # nothing pruned now
    assert torch.equal(squeeze_masked(x, nothing, pruned_now), x)  # no host anywhere
    one = torch.zeros_like(keep)
    one[:, 4] = 1.0  # a single kept token: it has no host itself, but hosts every pruned one
    out = squeeze_masked(x, one, 1 - one)
    assert torch.equal(out[:, [i for i in range(9) if i != 4]], x[:, [i for i in range(9) if i != 4]])
    assert not torch.equal(out[:, 4], x[:, 4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_compute_in_float32(dtype):
    x, keep, pruned_now = masked_tokens(7, n=9, dtype=dtype)
    expected = squeeze_masked(x.float(), keep.float(), pruned_now.float()).to(dtype)
    assert torch.equal(squeeze_masked(x, keep, pruned_now), expected)


@pytest.mark.parametrize("seed", range(2))
def test_gradcheck(seed):
    x, keep, pruned_now = masked_tokens(seed + 20, B=1, n=6, C=4)
    assert (host_gap(x, keep) > 1e-3).all()
    inputs = tuple(t.clone().requires_grad_() for t in (x, keep, pruned_now))
    assert torch.autograd.gradcheck(squeeze_masked, inputs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    inputs = masked_tokens(2, n=9, dtype=torch.float32)
    eager = [t.clone().requires_grad_() for t in inputs]
    comp = [t.clone().requires_grad_() for t in inputs]
    fn = torch.compile(squeeze_masked, fullgraph=True, backend=backend)
    torch.testing.assert_close(fn(*comp), squeeze_masked(*eager))
    fn(*comp).square().sum().backward()
    squeeze_masked(*eager).square().sum().backward()
    for a, b in zip(comp, eager):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad)
