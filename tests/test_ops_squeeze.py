"""Properties of the split-form squeeze (tps-reference.md, Sec. 1) against the float64 oracle.

Host choice is an argmax, so two implementations can legitimately disagree only where two
similarities are closer than their rounding. Tests that compare host choices first check that
every host is *decided*: each competitor within ``TIE_TOL`` of the winner is either a
bit-identical copy of the winning reserved row (an exact tie, which both sides break to the
lowest index) or the pruned token is the zero vector (cosine exactly 0 with everything, host 0).
"""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, event, given, settings
from oracle import oracle_cosine, oracle_host, oracle_squeeze, top2_gap

from tokenreduce.ops import squeeze, squeeze_assign, squeeze_masked, squeeze_op, squeeze_reference
from tokenreduce.ops.squeeze import cosine, squeeze_tokens, squeeze_tokens_op

FLOATS = (torch.float32, torch.float64)
TIE_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@st.composite
def token_pairs(
    draw,
    dtypes=FLOATS,
    reserved_kinds=("fresh", "fresh", "fresh", "dup", "scaled", "zero"),
    pruned_kinds=("fresh", "fresh", "dup", "scaled", "zero"),
    max_nr=6,
    max_np=9,
):
    """(reserved (B, Nr, C), pruned (B, Np, C)): Gaussian tokens from a drawn seed and scale,
    where a token may instead copy an earlier one exactly ("dup"), copy one times a positive
    factor ("scaled"), or be the zero vector. Np ranges over 0..max_np, so Np > Nr occurs."""
    B = draw(st.integers(1, 3))
    Nr = draw(st.integers(1, max_nr))
    Np = draw(st.integers(0, max_np))
    C = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(B, Nr + Np, C, generator=g, dtype=torch.float64) * scale
    for t in range(Nr + Np):
        kind = draw(st.sampled_from(reserved_kinds if t < Nr else pruned_kinds))
        if kind == "zero":
            x[:, t] = 0.0
        elif kind in ("dup", "scaled") and t > 0:
            src = draw(st.integers(0, t - 1))
            factor = draw(st.sampled_from([0.5, 3.0])) if kind == "scaled" else 1.0
            x[:, t] = x[:, src] * factor
    x = x.to(dtype)
    return x[:, :Nr].contiguous(), x[:, Nr:].contiguous()


def decided_tokens(reserved, pruned, tol):
    """(B, Np) bool: the float64 host of the pruned token is unambiguous at tolerance ``tol``."""
    cos = oracle_cosine(reserved, pruned)  # (B, Np, Nr)
    host = oracle_host(reserved, pruned)  # (B, Np)
    best = cos.gather(-1, host.unsqueeze(-1))  # (B, Np, 1)
    near = best - cos <= tol
    host_rows = reserved.gather(1, host.unsqueeze(-1).expand(-1, -1, reserved.shape[2]))
    identical = (reserved.unsqueeze(1) == host_rows.unsqueeze(2)).all(-1)  # (B, Np, Nr)
    zero = (pruned == 0).all(-1)  # (B, Np)
    return (~near | identical).all(-1) | zero


def decided(reserved, pruned, tol):
    """True when every pruned token's host is unambiguous (see the module docstring)."""
    return bool(decided_tokens(reserved, pruned, tol).all())


def clearly_decided(reserved, pruned, tol):
    """Stricter: a unique winner by more than ``tol`` (needed where the index itself matters)."""
    return bool((top2_gap(oracle_cosine(reserved, pruned)) > tol).all())


def close(actual, expected, *inputs):
    """The dtype's relative tolerance; absolute tolerance scaled to the inputs' magnitude (the
    outputs are convex combinations of them, so that is the scale of rounding errors)."""
    rtol = RTOL[actual.dtype]
    scale = max((float(t.abs().max()) for t in inputs if t.numel()), default=0.0)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=rtol * scale)


def test_torch_argmax_returns_first_maximum():
    # The lowest-index tie rule rests on this documented torch behaviour.
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert x.argmax(dim=-1).tolist() == [1, 0]


@settings(max_examples=100)
@given(token_pairs())
def test_matches_oracle(pair):
    reserved, pruned = pair
    out = squeeze(reserved, pruned)
    assert out.dtype == reserved.dtype and out.shape == reserved.shape
    assert torch.isfinite(out).all()
    assume(decided(reserved, pruned, TIE_TOL[reserved.dtype]))
    assert torch.equal(squeeze_assign(reserved, pruned).host, oracle_host(reserved, pruned))
    close(out, oracle_squeeze(reserved, pruned), reserved, pruned)


@settings(max_examples=60)
@given(token_pairs(dtypes=FLOATS + (torch.bfloat16, torch.float16)))
def test_finite_and_dtype_preserving(pair):
    reserved, pruned = pair
    out = squeeze(reserved, pruned)
    assert out.dtype == reserved.dtype and out.shape == reserved.shape
    assert torch.isfinite(out).all()


@settings(max_examples=40)
@given(token_pairs(dtypes=(torch.bfloat16, torch.float16)))
def test_half_types_compute_in_float32(pair):
    reserved, pruned = pair
    expected = squeeze_reference(reserved.float(), pruned.float()).to(reserved.dtype)
    assert torch.equal(squeeze(reserved, pruned), expected)


@settings(max_examples=30)
@given(token_pairs())
def test_no_pruned_tokens_is_identity(pair):
    reserved, _ = pair
    empty = reserved[:, :0]
    assert squeeze(reserved, empty) is reserved
    # The op and the reference agree bit for bit too (the op must return a fresh tensor).
    direct = torch.ops.tokenreduce.squeeze(reserved, empty)
    assert torch.equal(direct, reserved) and direct.data_ptr() != reserved.data_ptr()
    assert torch.equal(squeeze_reference(reserved, empty), reserved)


@settings(max_examples=80)
@given(token_pairs(dtypes=FLOATS + (torch.bfloat16,)))
def test_rows_hosting_nothing_are_bit_exact(pair):
    reserved, pruned = pair
    out = squeeze(reserved, pruned)
    host = squeeze_assign(reserved, pruned).host
    hosted = torch.zeros(reserved.shape[:2], dtype=torch.bool).scatter(1, host, True)  # (B, Nr)
    assert torch.equal(out[~hosted], reserved[~hosted])


@settings(max_examples=80)
@given(token_pairs())
def test_hosts_are_lowest_index_maxima(pair):
    reserved, pruned = pair
    host = squeeze_assign(reserved, pruned).host
    cos = cosine(pruned, reserved)  # the similarities the op itself computed, (B, Np, Nr)
    best = cos.amax(dim=-1, keepdim=True)
    first = (cos == best).int().argmax(dim=-1)  # index of the first maximum
    assert torch.equal(host, first)


@pytest.mark.parametrize("dtype", FLOATS)
def test_duplicate_reserved_tokens_tie_to_lowest_index(dtype):
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    b = torch.tensor([-1.0, 0.0, 2.0, 1.0], dtype=dtype)
    reserved = torch.stack([b, a, b, a]).unsqueeze(0)  # (1, 4, 4)
    pruned = torch.stack([a, b, 2 * a, torch.zeros(4, dtype=dtype)]).unsqueeze(0)  # (1, 4, 4)
    assert squeeze_assign(reserved, pruned).host.tolist() == [[1, 0, 1, 0]]


@settings(max_examples=80)
@given(token_pairs())
def test_outputs_are_convex_combinations(pair):
    reserved, pruned = pair
    out = squeeze(reserved, pruned)
    host = squeeze_assign(reserved, pruned).host
    for b in range(reserved.shape[0]):
        for j in range(reserved.shape[1]):
            group = torch.cat([reserved[b, j : j + 1], pruned[b][host[b] == j]])  # (1 + m, C)
            slack = 1e-5 * float(group.abs().max()) if reserved.dtype == torch.float32 else 1e-12
            assert (out[b, j] >= group.amin(0) - slack).all()
            assert (out[b, j] <= group.amax(0) + slack).all()


@settings(max_examples=80)
@given(token_pairs())
def test_weights_positive_and_sum_to_one(pair):
    reserved, pruned = pair
    a = squeeze_assign(reserved, pruned)
    assert a.host.dtype == torch.int64 and a.host.shape == pruned.shape[:2]
    assert (a.weight > 0).all() and (a.self_weight > 0).all()
    total = a.self_weight.scatter_add(1, a.host, a.weight)  # (B, Nr)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=RTOL[reserved.dtype])
    # The weights reproduce the op: y_j = self_j xr_j + sum_{host(i)=j} w_i xp_i.
    rebuilt = (a.self_weight.unsqueeze(-1) * reserved).scatter_add(
        1, a.host.unsqueeze(-1).expand_as(pruned), a.weight.unsqueeze(-1) * pruned
    )
    close(squeeze(reserved, pruned), rebuilt, reserved, pruned)


@settings(max_examples=60)
@given(token_pairs(), st.randoms(use_true_random=False))
def test_permuting_pruned_changes_nothing(pair, rnd):
    reserved, pruned = pair
    assume(decided(reserved, pruned, TIE_TOL[reserved.dtype]))
    perm = list(range(pruned.shape[1]))
    rnd.shuffle(perm)
    out = squeeze(reserved, pruned[:, perm])
    close(out, squeeze(reserved, pruned), reserved, pruned)


@settings(max_examples=60)
@given(
    token_pairs(reserved_kinds=("fresh",), pruned_kinds=("fresh", "dup", "scaled")),
    st.randoms(use_true_random=False),
)
def test_permuting_reserved_permutes_output(pair, rnd):
    reserved, pruned = pair
    assume(clearly_decided(reserved, pruned, TIE_TOL[reserved.dtype]))
    perm = list(range(reserved.shape[1]))
    rnd.shuffle(perm)
    out = squeeze(reserved[:, perm], pruned)
    close(out, squeeze(reserved, pruned)[:, perm], reserved, pruned)


@settings(max_examples=60)
@given(token_pairs(), st.data())
def test_positive_scaling_keeps_the_host(pair, data):
    reserved, pruned = pair
    assume(pruned.shape[1] > 0)
    i = data.draw(st.integers(0, pruned.shape[1] - 1))
    assume(bool(decided_tokens(reserved, pruned, TIE_TOL[reserved.dtype])[:, i].all()))
    factor = data.draw(st.sampled_from([1e-2, 0.5, 7.0, 100.0]))
    scaled = pruned.clone()
    scaled[:, i] *= factor
    before = squeeze_assign(reserved, pruned).host[:, i]
    assert torch.equal(squeeze_assign(reserved, scaled).host[:, i], before)


def separated_pair(seed, B=2, Nr=3, Np=4, C=3, dtype=torch.float64):
    """Pruned tokens close to a chosen host and far from the others: no near ties."""
    g = torch.Generator().manual_seed(seed)
    reserved = torch.randn(B, Nr, C, generator=g, dtype=dtype)
    host = torch.randint(0, Nr, (B, Np), generator=g)
    near = reserved.gather(1, host.unsqueeze(-1).expand(-1, -1, C))
    pruned = near * (1 + torch.rand(B, Np, 1, generator=g, dtype=dtype)) + 0.2 * torch.randn(
        B, Np, C, generator=g, dtype=dtype
    )
    return reserved, pruned


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_through_custom_op(seed):
    reserved, pruned = separated_pair(seed)
    assert clearly_decided(reserved, pruned, 1e-3)
    reserved.requires_grad_()
    pruned.requires_grad_()
    assert torch.autograd.gradcheck(squeeze, (reserved, pruned))
    assert torch.autograd.gradcheck(lambda r: squeeze(r, pruned.detach()), (reserved,))
    assert torch.autograd.gradcheck(lambda p: squeeze(reserved.detach(), p), (pruned,))


def test_backward_matches_autograd_of_reference():
    reserved, pruned = separated_pair(7, dtype=torch.float32)
    grad = torch.randn_like(reserved)
    r1, p1 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    r2, p2 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    squeeze(r1, p1).backward(grad)
    squeeze_reference(r2, p2).backward(grad)
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


# opcheck costs ~2 s a case (it traces with AOTAutograd), so the cases cover each dtype, each
# requires_grad pattern and the Np > Nr, Np < Nr and Nr = C = 1 shapes without the full product.
@pytest.mark.parametrize(
    "dtype, grads, shape",
    [
        pytest.param(torch.float32, (True, True), (2, 4, 6, 5), id="fp32-grad-both-Np>Nr"),
        pytest.param(torch.float64, (True, True), (3, 5, 2, 4), id="fp64-grad-both-Np<Nr"),
        pytest.param(torch.float32, (False, False), (1, 1, 3, 1), id="fp32-no-grad-Nr=C=1"),
        pytest.param(torch.float64, (True, False), (2, 4, 6, 5), id="fp64-grad-reserved"),
        pytest.param(torch.float64, (False, True), (1, 1, 3, 1), id="fp64-grad-pruned"),
    ],
)
def test_opcheck(dtype, grads, shape):
    B, Nr, Np, C = shape
    reserved = torch.randn(B, Nr, C, dtype=dtype).requires_grad_(grads[0])
    pruned = torch.randn(B, Np, C, dtype=dtype).requires_grad_(grads[1])
    torch.library.opcheck(squeeze_op, (reserved, pruned))


# ---------------------------------------------------------------- indexed form (squeeze_tokens)
def _stream_and_split(B, P, n, k, C, seed, dtype=torch.float64):
    """x (B, P + n, C) and a random unsorted partition (kept (B, k), pruned (B, n - k))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P + n, C, generator=g, dtype=dtype)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    return x, order[:, :k], order[:, k:]


def _gather_rows(x, idx):
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))


@settings(max_examples=60)
@given(st.integers(1, 3), st.integers(0, 2), st.integers(1, 12), st.data())
def test_squeeze_tokens_is_gather_squeeze_cat(B, P, n, data):
    """Bit for bit the composition it names, for any partition (also k == n: nothing pruned)."""
    k = data.draw(st.integers(1, n))
    C = data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    x, kept, pruned = _stream_and_split(B, P, n, k, C, data.draw(st.integers(0, 2**31 - 1)), dtype)
    patches = x[:, P:]
    expected = torch.cat([x[:, :P], squeeze(_gather_rows(patches, kept), _gather_rows(patches, pruned))], 1)
    got = squeeze_tokens(x, kept, pruned, P)
    assert got.shape == (B, P + k, C) and got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(2))
def test_squeeze_tokens_gradcheck(seed):
    reserved, pruned_tokens = separated_pair(seed)  # clearly decided hosts, float64
    B, Nr, C = reserved.shape
    x = torch.cat([torch.randn(B, 1, C, dtype=torch.float64), reserved, pruned_tokens], dim=1)
    kept = torch.arange(Nr).expand(B, Nr)
    pruned = torch.arange(Nr, Nr + pruned_tokens.shape[1]).expand(B, -1)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: squeeze_tokens(t, kept, pruned, 1), (x,))


@pytest.mark.parametrize("seed", range(2))
def test_double_backward(seed):
    """Second-order terms survive: gradgradcheck through both operators (their backward
    recomputes the reference with create_graph), against finite differences in float64."""
    reserved, pruned = separated_pair(seed)
    assert clearly_decided(reserved, pruned, 1e-3)
    reserved.requires_grad_()
    pruned.requires_grad_()
    assert torch.autograd.gradgradcheck(squeeze, (reserved, pruned))
    B, Nr, C = reserved.shape
    x = torch.cat([torch.randn(B, 1, C, dtype=torch.float64), reserved.detach(), pruned.detach()], dim=1)
    kept, rest = torch.arange(Nr).expand(B, Nr), torch.arange(Nr, Nr + pruned.shape[1]).expand(B, -1)
    assert torch.autograd.gradgradcheck(lambda t: squeeze_tokens(t, kept, rest, 1), (x.requires_grad_(),))


def test_double_backward_of_a_loss_on_the_gradient():
    """The gradient's own gradient (a gradient-penalty loss) equals the reference's: the
    operator's second order is not silently zero."""
    reserved, pruned = separated_pair(3)
    grads = []
    for fn in (squeeze, squeeze_reference):
        r = reserved.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(r, pruned).square().sum(), r, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), r)
        grads.append(gg)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", FLOATS + (torch.bfloat16,))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_token_stays_in_its_image(dtype, bad):
    """A NaN / inf token in image 1 of 3 (reserved or pruned): that image may become NaN, images
    0 and 2 equal the per-image float64 oracle, and no finite token picks the bad one."""
    g = torch.Generator().manual_seed(11)
    reserved, pruned = torch.randn(3, 6, 5, generator=g), torch.randn(3, 9, 5, generator=g)
    for where in ("reserved", "pruned", "both"):
        r, p = reserved.clone().to(dtype), pruned.clone().to(dtype)
        if where != "pruned":
            r[1, 2, 1] = bad
        if where != "reserved":
            p[1, 4, 0] = bad
        out = squeeze(r, p)
        host = squeeze_assign(r, p).host
        assert host.min() >= 0 and host.max() < r.shape[1]
        if where == "reserved":  # the bad reserved token hosts nothing and stays as it was
            assert not (host[1] == 2).any()
            torch.testing.assert_close(out[1, 2], r[1, 2], rtol=0, atol=0, equal_nan=True)
        good = [0, 2]
        expected = oracle_squeeze(r[good].double(), p[good].double())
        close(out[good], expected, r[good], p[good]) if dtype in FLOATS else torch.testing.assert_close(
            out[good].double(), expected, rtol=2**-7, atol=2**-7
        )
        # The indexed form, as a reduction site calls it.
        x = torch.cat([r, p], dim=1)
        kept, rest = torch.arange(6).expand(3, 6), torch.arange(6, 15).expand(3, 9)
        assert torch.equal(squeeze_tokens(x, kept, rest, 0)[good], out[good])


@pytest.mark.parametrize("dtype", FLOATS)
def test_huge_norms_pick_the_float64_host(dtype):
    """Tokens whose squared norms overflow float32 (1e25 to 1e30; the threshold is ~1.8e19)
    pick the float64 oracle's host, and the output is the oracle's to float32 precision."""
    reserved, pruned = separated_pair(5, B=3, Nr=5, Np=7, C=6)
    reserved[0] *= 1e25
    pruned[0] *= 1e25
    reserved[1, [1, 3]] *= 1e30  # mixed magnitudes in one image
    pruned[1, :3] *= 1e28
    reserved, pruned = reserved.to(dtype), pruned.to(dtype)
    assert torch.equal(squeeze_assign(reserved, pruned).host, oracle_host(reserved, pruned))
    out, expected = squeeze(reserved, pruned), oracle_squeeze(reserved, pruned)
    rel = (out.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert rel.max() < RTOL[dtype]


def test_unit_rows_keeps_the_eps_rule():
    """The overflow-safe normalisation equals x / (|x| + 1e-6) wherever that is representable:
    tiny tokens (where the 1e-6 matters) and zero tokens (which stay zero) included."""
    from tokenreduce.ops.squeeze import unit_rows

    g = torch.Generator().manual_seed(2)
    x = (
        torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
        * torch.tensor([1e-9, 1e-6, 1e-3, 1, 1e3, 0.0], dtype=torch.float64)[:, None]
    )
    torch.testing.assert_close(unit_rows(x), x / (x.norm(dim=-1, keepdim=True) + 1e-6), rtol=1e-14, atol=0)
    assert torch.equal(unit_rows(x)[:, 5], torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("grad", [False, True])
def test_squeeze_tokens_opcheck(grad):
    x, kept, pruned = _stream_and_split(2, 1, 9, 5, 4, seed=3)
    torch.library.opcheck(squeeze_tokens_op, (x.requires_grad_(grad), kept, pruned, 1))


def test_squeeze_tokens_compiles_without_graph_breaks():
    torch._dynamo.reset()
    x, kept, pruned = _stream_and_split(2, 1, 9, 5, 4, seed=4, dtype=torch.float32)
    compiled = torch.compile(squeeze_tokens, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, kept, pruned, 1), squeeze_tokens(x, kept, pruned, 1))


def _loss(reserved, pruned):
    return squeeze(reserved, pruned).square().sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    reserved, pruned = separated_pair(3, dtype=torch.float32)
    r1, p1 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    r2, p2 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    compiled(r1, p1).backward()
    _loss(r2, p2).backward()
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)
    # The identity case is a Python branch on a static shape: it compiles too.
    empty = pruned[:, :0]
    identity = torch.compile(squeeze, fullgraph=True, backend=backend)
    assert torch.equal(identity(reserved, empty), reserved)


def test_compiles_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(squeeze, fullgraph=True, dynamic=True, backend="aot_eager")
    for Nr, Np in [(3, 5), (4, 7), (6, 2)]:
        reserved, pruned = separated_pair(Nr + Np, Nr=Nr, Np=Np, dtype=torch.float32)
        assert torch.equal(compiled(reserved, pruned), squeeze(reserved, pruned))


@pytest.mark.slow
def test_compiles_with_inductor():
    # A cold inductor cache costs ~40 s of C++ compilation on a small CPU, hence `slow`.
    torch._dynamo.reset()
    reserved, pruned = separated_pair(5, dtype=torch.float32)
    r1, p1 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    r2, p2 = reserved.clone().requires_grad_(), pruned.clone().requires_grad_()
    torch.compile(_loss, fullgraph=True)(r1, p1).backward()
    _loss(r2, p2).backward()
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_self_weight_is_euler():
    # One pruned token equal to its host: c = 1 (up to the 1e-6 norm rule), weights 1/2, 1/2.
    reserved = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    a = squeeze_assign(reserved, reserved.clone())
    assert math.isclose(float(a.weight), 0.5, rel_tol=1e-6)
    assert math.isclose(float(a.self_weight), 0.5, rel_tol=1e-6)


# --- training form -------------------------------------------------------------------------


@st.composite
def masked_inputs(draw, dtypes=FLOATS):
    """(x (B, n, C), keep (B, n, 1), pruned_now (B, n, 1)): tokens as in ``token_pairs``, each
    token of each image independently kept, pruned now, or dropped earlier (both masks 0)."""
    reserved, pruned = draw(token_pairs(dtypes=dtypes, max_nr=5, max_np=5))
    x = torch.cat([reserved, pruned], dim=1)  # (B, n, C)
    B, n, _ = x.shape
    states = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, 2), min_size=n, max_size=n), min_size=B, max_size=B))
    ).unsqueeze(-1)  # (B, n, 1): 0 kept, 1 pruned now, 2 dropped earlier
    return x, (states == 0).to(x.dtype), (states == 1).to(x.dtype)


@settings(max_examples=80)
@given(masked_inputs())
def test_training_form_equals_split_form(inputs):
    x, keep, pruned_now = inputs
    out = squeeze_masked(x, keep, pruned_now)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    for b in range(x.shape[0]):
        kept = keep[b, :, 0].bool()
        # Every row that is not kept comes back bit for bit, pruned-now rows included.
        assert torch.equal(out[b, ~kept], x[b, ~kept])
        if not kept.any():
            continue
        reserved = x[b : b + 1, kept]  # (1, Nr, C), raster order
        pruned = x[b : b + 1, pruned_now[b, :, 0].bool()]  # (1, Np, C)
        if not decided(reserved, pruned, TIE_TOL[x.dtype]):
            event("image skipped: near-tie host")  # the forms may break it differently
            continue
        event("image compared with the split form")
        expected = squeeze(reserved, pruned)
        close(out[b : b + 1, kept], expected, reserved, pruned)
        hosted = torch.zeros(reserved.shape[1], dtype=torch.bool)
        hosted[squeeze_assign(reserved, pruned).host[0]] = True
        assert torch.equal(out[b, kept][~hosted], reserved[0, ~hosted])


@settings(max_examples=30)
@given(masked_inputs())
def test_training_form_identity_cases(inputs):
    x, keep, _ = inputs
    nothing = torch.zeros_like(keep)
    assert torch.equal(squeeze_masked(x, keep, nothing), x)  # nothing pruned now
    assert torch.equal(squeeze_masked(x, nothing, 1 - keep), x)  # no host anywhere


@settings(max_examples=30)
@given(masked_inputs(dtypes=(torch.bfloat16, torch.float16)))
def test_training_form_half_types_compute_in_float32(inputs):
    x, keep, pruned_now = inputs
    expected = squeeze_masked(x.float(), keep.float(), pruned_now.float()).to(x.dtype)
    assert torch.equal(squeeze_masked(x, keep, pruned_now), expected)


def masked_from_pair(reserved, pruned):
    """x = [reserved, pruned, one dropped token]; keep marks reserved, pruned_now the pruned."""
    B, Nr, C = reserved.shape
    Np = pruned.shape[1]
    x = torch.cat([reserved, pruned, reserved[:, :1] * -2.0], dim=1)  # (B, Nr + Np + 1, C)
    keep = torch.zeros(B, Nr + Np + 1, 1, dtype=x.dtype)
    keep[:, :Nr] = 1.0
    pruned_now = torch.zeros_like(keep)
    pruned_now[:, Nr : Nr + Np] = 1.0
    return x, keep, pruned_now


@pytest.mark.parametrize("seed", range(3))
def test_training_form_gradcheck(seed):
    x, keep, pruned_now = masked_from_pair(*separated_pair(seed))
    inputs = tuple(t.requires_grad_() for t in (x, keep, pruned_now))
    assert torch.autograd.gradcheck(squeeze_masked, inputs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_training_form_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    inputs = masked_from_pair(*separated_pair(2, dtype=torch.float32))
    eager = [t.clone().requires_grad_() for t in inputs]
    comp = [t.clone().requires_grad_() for t in inputs]
    fn = torch.compile(squeeze_masked, fullgraph=True, backend=backend)
    fn(*comp).square().sum().backward()
    squeeze_masked(*eager).square().sum().backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad)
