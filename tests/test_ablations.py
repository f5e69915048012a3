"""The ablation reducers (1:1 matching, average fusing) against float64 references, and the six
ablation methods through ``tokenreduce.apply``.

Host choices are argmaxes, so an implementation may legitimately disagree with the reference only
where two similarities are within rounding; comparisons first check that every choice is decided
(each near-winner is a bit-identical copy of the winner, or the querying token is zero).
"""

import math

import hypothesis.strategies as st
import pytest
import timm
import torch
from hypothesis import assume, event, given, settings

from tokenreduce.ops.ablations import (
    average_fuse,
    average_fuse_assign,
    average_fuse_masked,
    match_one_to_one,
    match_one_to_one_assign,
    match_one_to_one_masked,
)

FLOATS = (torch.float32, torch.float64)
TIE_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
EPS = 1e-6


# --------------------------------------------------------------------------- float64 references
# One image, as literally as the formulas read (loops over tokens); no code shared with the ops.


def _cos(a, b):
    """(Na, C), (Nb, C) -> (Na, Nb) list of lists of float64 cosines with the +1e-6 norm rule."""
    return [
        [float((a[i] * b[j]).sum() / ((a[i].norm() + EPS) * (b[j].norm() + EPS))) for j in range(len(b))]
        for i in range(len(a))
    ]


def _first_max(row):
    best, arg = row[0], 0
    for j in range(1, len(row)):
        if row[j] > best:
            best, arg = row[j], j
    return arg


def ref_match_one_to_one(reserved, pruned):
    """(Nr, C), (Np, C) float64 -> (Nr, C): reserved j fuses its nearest pruned token."""
    if len(pruned) == 0:
        return reserved.clone()
    cos = _cos(reserved, pruned)
    out = []
    for j in range(len(reserved)):
        g = _first_max(cos[j])
        w = math.exp(cos[j][g])
        out.append((math.e * reserved[j] + w * pruned[g]) / (math.e + w))
    return torch.stack(out)


def ref_average_fuse(reserved, pruned):
    """(Nr, C), (Np, C) float64 -> (Nr, C): N:1 hosts, equal weights."""
    hosts = [_first_max(row) for row in _cos(pruned, reserved)]
    out = []
    for j in range(len(reserved)):
        group = [reserved[j]] + [pruned[i] for i in range(len(pruned)) if hosts[i] == j]
        out.append(sum(group) / len(group) if len(group) > 1 else reserved[j])
    return torch.stack(out)


def batched(ref, reserved, pruned):
    return torch.stack([ref(r.double(), p.double()) for r, p in zip(reserved, pruned)])


def decided(queries, candidates, tol):
    """Every query's nearest candidate is unambiguous at ``tol`` (per image, float64)."""
    for q_img, c_img in zip(queries.double(), candidates.double()):
        if len(c_img) == 0:
            continue
        for qi, row in zip(q_img, _cos(q_img, c_img)):
            best = row[_first_max(row)]
            winner = c_img[_first_max(row)]
            near = [j for j in range(len(row)) if best - row[j] <= tol]
            if not (qi == 0).all() and not all(torch.equal(c_img[j], winner) for j in near):
                return False
    return True


# --------------------------------------------------------------------------- strategies


@st.composite
def token_pairs(draw, dtypes=FLOATS, max_nr=6, max_np=8):
    """(reserved (B, Nr, C), pruned (B, Np, C)): Gaussian tokens; a token may instead copy an
    earlier one, copy it scaled by a positive factor, or be zero. Np in 0..max_np."""
    B, Nr, Np, C = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, max_nr)),
        draw(st.integers(0, max_np)),
        draw(st.integers(1, 5)),
    )
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(B, Nr + Np, C, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    for t in range(1, Nr + Np):
        kind = draw(st.sampled_from(["fresh", "fresh", "fresh", "dup", "scaled", "zero"]))
        if kind == "zero":
            x[:, t] = 0.0
        elif kind in ("dup", "scaled"):
            x[:, t] = x[:, draw(st.integers(0, t - 1))] * (3.0 if kind == "scaled" else 1.0)
    x = x.to(dtype)
    return x[:, :Nr].contiguous(), x[:, Nr:].contiguous()


@st.composite
def masked_inputs(draw, dtypes=FLOATS):
    """(x (B, n, C), keep, pruned_now (B, n, 1)): each token kept, pruned now or dropped earlier."""
    reserved, pruned = draw(token_pairs(dtypes=dtypes, max_nr=5, max_np=5))
    x = torch.cat([reserved, pruned], dim=1)
    B, n, _ = x.shape
    states = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, 2), min_size=n, max_size=n), min_size=B, max_size=B))
    ).unsqueeze(-1)
    return x, (states == 0).to(x.dtype), (states == 1).to(x.dtype)


def close(actual, expected, *inputs):
    rtol = RTOL[actual.dtype]
    scale = max((float(t.abs().max()) for t in inputs if t.numel()), default=0.0)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=rtol * scale)


def separated_pair(seed, B=2, Nr=3, Np=4, C=3):
    """float64 pruned tokens near chosen reserved ones: no near ties in either direction."""
    g = torch.Generator().manual_seed(seed)
    reserved = torch.randn(B, Nr, C, generator=g, dtype=torch.float64)
    host = torch.randint(0, Nr, (B, Np), generator=g)
    near = reserved.gather(1, host.unsqueeze(-1).expand(-1, -1, C))
    pruned = near * (1 + torch.rand(B, Np, 1, generator=g, dtype=torch.float64))
    return reserved, pruned + 0.2 * torch.randn(B, Np, C, generator=g, dtype=torch.float64)


def as_masked(reserved, pruned):
    """x = [reserved, pruned, one dropped token]; keep marks reserved, pruned_now the pruned."""
    B, Nr, _ = reserved.shape
    Np = pruned.shape[1]
    x = torch.cat([reserved, pruned, reserved[:, :1] * -2.0], dim=1)
    keep = torch.zeros(B, Nr + Np + 1, 1, dtype=x.dtype)
    keep[:, :Nr] = 1.0
    pruned_now = torch.zeros_like(keep)
    pruned_now[:, Nr : Nr + Np] = 1.0
    return x, keep, pruned_now


# --------------------------------------------------------------------------- against the references


@settings(max_examples=80)
@given(token_pairs())
def test_one_to_one_matches_reference(pair):
    reserved, pruned = pair
    out = match_one_to_one(reserved, pruned)
    assert out.shape == reserved.shape and out.dtype == reserved.dtype and torch.isfinite(out).all()
    assume(decided(reserved, pruned, TIE_TOL[reserved.dtype]))  # each reserved token's choice
    close(out, batched(ref_match_one_to_one, reserved, pruned), reserved, pruned)


@settings(max_examples=80)
@given(token_pairs())
def test_average_fuse_matches_reference(pair):
    reserved, pruned = pair
    out = average_fuse(reserved, pruned)
    assert out.shape == reserved.shape and out.dtype == reserved.dtype and torch.isfinite(out).all()
    assume(decided(pruned, reserved, TIE_TOL[reserved.dtype]))  # each pruned token's host
    close(out, batched(ref_average_fuse, reserved, pruned), reserved, pruned)


def test_references_on_a_hand_computed_case():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[2.0, 0.1], [3.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    # average fuse: p0, p1 join r0; p2 (cosine -1 with r1, 0 with r0) joins r0 too: lowest index
    assert torch.allclose(ref_average_fuse(r, p), torch.stack([(r[0] + p[0] + p[1] + p[2]) / 4, r[1]]))
    # 1:1: r0 takes p1 (cosine 1), r1 takes p0 (the only positive cosine)
    c = 0.1 / math.hypot(2.0, 0.1)
    expected = torch.stack(
        [
            (math.e * r[0] + math.exp(1.0) * p[1]) / (2 * math.e),
            (math.e * r[1] + math.exp(c) * p[0]) / (math.e + math.exp(c)),
        ]
    )
    assert torch.allclose(ref_match_one_to_one(r, p), expected, atol=1e-6)
    assert torch.allclose(match_one_to_one(r[None], p[None])[0], expected, atol=1e-6)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("op", [match_one_to_one, average_fuse])
@settings(max_examples=30)
@given(pair=token_pairs())
def test_no_pruned_tokens_is_identity(op, pair):
    reserved, _ = pair
    assert op(reserved, reserved[:, :0]) is reserved


@settings(max_examples=60)
@given(token_pairs())
def test_average_fuse_outputs_are_convex_combinations(pair):
    reserved, pruned = pair
    out = average_fuse(reserved, pruned)
    host = average_fuse_assign(reserved, pruned)  # (B, Np)
    for b in range(reserved.shape[0]):
        for j in range(reserved.shape[1]):
            group = torch.cat([reserved[b, j : j + 1], pruned[b][host[b] == j]])  # (1 + m, C)
            slack = 1e-5 * float(group.abs().max()) if reserved.dtype == torch.float32 else 1e-12
            assert (out[b, j] >= group.amin(0) - slack).all() and (out[b, j] <= group.amax(0) + slack).all()


@settings(max_examples=60)
@given(token_pairs())
def test_one_to_one_outputs_lie_between_each_token_and_its_partner(pair):
    reserved, pruned = pair
    assume(pruned.shape[1] > 0 and decided(reserved, pruned, TIE_TOL[reserved.dtype]))
    out = match_one_to_one(reserved, pruned).double()
    taken = torch.tensor(
        [[_first_max(row) for row in _cos(r.double(), p.double())] for r, p in zip(reserved, pruned)]
    )  # (B, Nr), the float64 choice
    partner = pruned.double().gather(1, taken.unsqueeze(-1).expand(-1, -1, pruned.shape[2]))
    lo, hi = torch.minimum(reserved.double(), partner), torch.maximum(reserved.double(), partner)
    slack = RTOL[reserved.dtype] * float(torch.cat([reserved, pruned], 1).abs().max().double()) + 1e-12
    assert (out >= lo - slack).all() and (out <= hi + slack).all()


@settings(max_examples=60)
@given(token_pairs(dtypes=FLOATS + (torch.bfloat16,)))
def test_average_fuse_rows_hosting_nothing_are_bit_exact(pair):
    reserved, pruned = pair
    out = average_fuse(reserved, pruned)
    hosted = torch.zeros(reserved.shape[:2], dtype=torch.bool).scatter(1, average_fuse_assign(reserved, pruned), True)
    assert torch.equal(out[~hosted], reserved[~hosted])


@pytest.mark.parametrize("op", [match_one_to_one, average_fuse])
@settings(max_examples=30)
@given(pair=token_pairs(dtypes=(torch.bfloat16, torch.float16)))
def test_half_types_compute_in_float32(op, pair):
    reserved, pruned = pair
    assert torch.equal(op(reserved, pruned), op(reserved.float(), pruned.float()).to(reserved.dtype))


@settings(max_examples=60)
@given(token_pairs())
def test_average_fuse_hosts_are_the_squeezes(pair):
    from tokenreduce.ops import squeeze_assign

    reserved, pruned = pair
    assert torch.equal(average_fuse_assign(reserved, pruned), squeeze_assign(reserved, pruned).host)


@settings(max_examples=60)
@given(token_pairs())
def test_one_to_one_assign_names_the_lowest_taker(pair):
    reserved, pruned = pair
    taker = match_one_to_one_assign(reserved, pruned)  # (B, Np)
    assert taker.shape == pruned.shape[:2] and taker.dtype == torch.int64
    assume(decided(reserved, pruned, TIE_TOL[reserved.dtype]))
    for b in range(reserved.shape[0]):
        choice = [_first_max(row) for row in _cos(reserved[b].double(), pruned[b].double())] if pruned.shape[1] else []
        for i in range(pruned.shape[1]):
            takers = [j for j, g in enumerate(choice) if g == i]
            want = takers[0] if takers else -1
            got = int(taker[b, i])
            # a decided choice may still name an identical copy of the pruned token
            assert got == want or (want >= 0 and got >= 0 and torch.equal(pruned[b, choice[got]], pruned[b, i]))


def test_one_to_one_can_lose_a_pruned_token():
    """Two reserved tokens near p0 both take it; p1 is taken by nobody (supplement Table 1a's point)."""
    r = torch.tensor([[[1.0, 0.0], [1.0, 0.1]]], dtype=torch.float64)
    p = torch.tensor([[[1.0, 0.05], [-1.0, 1.0]]], dtype=torch.float64)
    assert match_one_to_one_assign(r, p).tolist() == [[0, -1]]
    out = match_one_to_one(r, p)
    assert not torch.equal(out[0, 0], r[0, 0]) and not torch.equal(out[0, 1], r[0, 1])  # both absorbed p0
    assert (average_fuse_assign(r, p) >= 0).all()  # N:1 matching keeps every pruned token


# --------------------------------------------------------------------------- training forms


@pytest.mark.parametrize(
    "masked,split,queries",
    [
        (match_one_to_one_masked, match_one_to_one, "reserved"),
        (average_fuse_masked, average_fuse, "pruned"),
    ],
)
@settings(max_examples=60)
@given(inputs=masked_inputs())
def test_training_form_equals_split_form(masked, split, queries, inputs):
    x, keep, pruned_now = inputs
    out = masked(x, keep, pruned_now)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    for b in range(x.shape[0]):
        kept = keep[b, :, 0].bool()
        assert torch.equal(out[b, ~kept], x[b, ~kept])  # every row not kept comes back bit for bit
        if not kept.any():
            continue
        reserved, pruned = x[b : b + 1, kept], x[b : b + 1, pruned_now[b, :, 0].bool()]
        ok = (
            decided(reserved, pruned, TIE_TOL[x.dtype])
            if queries == "reserved"
            else decided(pruned, reserved, TIE_TOL[x.dtype])
        )
        if not ok:
            event("image skipped: near tie")
            continue
        close(out[b : b + 1, kept], split(reserved, pruned), reserved, pruned)


@pytest.mark.parametrize("masked", [match_one_to_one_masked, average_fuse_masked])
@settings(max_examples=30)
@given(inputs=masked_inputs())
def test_training_form_identity_cases(masked, inputs):
    x, keep, _ = inputs
    nothing = torch.zeros_like(keep)
    assert torch.equal(masked(x, keep, nothing), x)  # nothing pruned now
    assert torch.equal(masked(x, nothing, 1 - keep), x)  # no host anywhere


@pytest.mark.parametrize("op", [match_one_to_one, average_fuse])
@pytest.mark.parametrize("seed", range(2))
def test_gradcheck_split_forms(op, seed):
    reserved, pruned = (t.requires_grad_() for t in separated_pair(seed))
    assert torch.autograd.gradcheck(op, (reserved, pruned))


@pytest.mark.parametrize("op", [match_one_to_one_masked, average_fuse_masked])
@pytest.mark.parametrize("seed", range(2))
def test_gradcheck_training_forms(op, seed):
    inputs = tuple(t.requires_grad_() for t in as_masked(*separated_pair(seed)))
    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("op", [match_one_to_one_masked, average_fuse_masked])
def test_training_form_sends_gradient_to_pruned_now(op):
    reserved, pruned = separated_pair(5)
    x, keep, pruned_now = as_masked(reserved, pruned)
    pruned_now.requires_grad_()
    op(x, keep, pruned_now).square().sum().backward()
    assert pruned_now.grad[:, reserved.shape[1] : reserved.shape[1] + pruned.shape[1]].abs().sum() > 0


@pytest.mark.parametrize("op", [match_one_to_one, average_fuse])
def test_compiles_without_graph_breaks(op):
    torch._dynamo.reset()
    reserved, pruned = (t.float() for t in separated_pair(3))
    assert torch.equal(torch.compile(op, fullgraph=True, backend="aot_eager")(reserved, pruned), op(reserved, pruned))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("op", [match_one_to_one, average_fuse, match_one_to_one_assign, average_fuse_assign])
def test_split_forms_reject_bad_pairs(op):
    r = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="`pruned` must have 3 dims"):
        op(r, torch.randn(2, 4))
    with pytest.raises(ValueError, match="must have the same channels"):
        op(r, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"at least one token \(Nr >= 1\)"):
        op(r[:, :0], torch.randn(2, 3, 4))


@pytest.mark.parametrize("op", [match_one_to_one_masked, average_fuse_masked])
def test_training_forms_reject_bad_masks(op):
    x = torch.randn(2, 5, 4)
    keep = torch.ones(2, 5, 1)
    with pytest.raises(ValueError, match=r"`pruned_now` must have shape \(B, n, 1\) = \(2, 5, 1\)"):
        op(x, keep, torch.ones(2, 4, 1))
    with pytest.raises(TypeError, match="`keep` must be a floating-point tensor"):
        op(x, keep.bool(), keep)


# --------------------------------------------------------------------------- through apply

ABLATIONS = ("etps_match1to1", "dtps_match1to1", "etps_avgfuse", "dtps_avgfuse", "etps_random", "dtps_random")


@pytest.fixture(scope="module")
def tiny():
    import tokenreduce.ablations  # noqa: F401  (registers the methods)

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval(), torch.randn(2, 3, 64, 64)


def test_the_methods_are_registered_with_their_parts():
    import tokenreduce
    import tokenreduce.ablations

    assert set(ABLATIONS) <= set(tokenreduce.list_methods())
    m = tokenreduce.get_method("dtps_match1to1")
    assert m.reducer.name == "match1to1" and m.placement == "before" and m.counts == "cumulative"
    assert tokenreduce.get_method("etps_avgfuse").reducer.name == "avgfuse"
    random = tokenreduce.get_method("dtps_random")
    assert random.reducer.name == "squeeze" and random.placement == "before" and random.counts == "cumulative"
    assert random.scorer is tokenreduce.get_scorer("random")


@pytest.mark.parametrize("method", ABLATIONS)
def test_keep_ratio_one_reproduces_the_model(tiny, method):
    import tokenreduce

    model, x = tiny
    reduced = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=1.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("method", ABLATIONS)
def test_flops_drop_and_shapes_are_right(tiny, method):
    import tokenreduce

    model, x = tiny
    reduced = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=0.5, example_input=x).eval()
    s = tokenreduce.summary(reduced)
    assert s.gflops_reduced < 0.8 * s.gflops_dense
    # eTPS reduces after a block's attention (its MLP sees the reduced count), dTPS before the block
    tokens = {block: (mlp if method.startswith("etps") else attn) for block, _, attn, mlp in s.rows}
    counts = [tokens[i] - 1 for i in (1, 2)]  # patch tokens after the two sites (16 before)
    assert counts == [8, 4]  # ceil(0.5 * 16), ceil(0.5 * 8) per site; int(16 * 0.5 ** s) cumulative
    with torch.no_grad():
        out = reduced(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x))


@pytest.mark.parametrize("method", ["dtps_match1to1", "dtps_avgfuse"])
def test_learned_variants_train_and_backpropagate(tiny, method):
    import tokenreduce

    model, x = tiny
    reduced = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=0.5).train()
    out = reduced(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    grads = [p.grad for n, p in reduced.named_parameters() if "reduce_sites" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_random_division_draws_different_splits(tiny):
    import tokenreduce

    model, x = tiny
    reduced = tokenreduce.apply(model, method="etps_random", locs=[1], keep_ratio=0.5, example_input=x).eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = reduced(x)
        torch.manual_seed(2)
        b = reduced(x)
        torch.manual_seed(1)
        c = reduced(x)
    assert not torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("method", ["etps_match1to1", "etps_avgfuse"])
def test_aux_host_maps_follow_the_matching(tiny, method):
    """N:1 (avgfuse) keeps every original patch in some token; 1:1 may lose some (host -1)."""
    import tokenreduce

    model, x = tiny
    reduced = tokenreduce.apply(model, method=method, locs=[1], keep_ratio=0.5, example_input=x, aux=True).eval()
    with torch.no_grad():
        _, aux = reduced(x)
    (hosts,) = aux.hosts  # (B, 16): the original position of the token each patch ended up in
    kept = [set(h[h >= 0].tolist()) for h in hosts]
    for b in range(hosts.shape[0]):
        assert len(kept[b]) == 8 and all(int(hosts[b, p]) == p for p in kept[b])  # kept tokens host themselves
    if method == "etps_avgfuse":
        assert (hosts >= 0).all()
    else:
        for b in range(hosts.shape[0]):
            assert ((hosts[b] == -1) | torch.isin(hosts[b], torch.tensor(sorted(kept[b])))).all()
