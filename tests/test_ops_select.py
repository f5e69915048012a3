"""Token selection (ops/select.py) and the baseline reducers (ops/reduce.py)."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from tokenreduce.ops import drop, fuse_one, gather_tokens, topk_split


@st.composite
def scores_and_k(draw):
    """(scores (B, n) float, k in 1..n); scores from a small integer set, so ties are common."""
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    values = draw(st.lists(st.integers(-3, 3), min_size=B * n, max_size=B * n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    scores = torch.tensor(values, dtype=dtype).reshape(B, n)
    return scores, draw(st.integers(1, n))


@settings(max_examples=100)
@given(scores_and_k())
def test_topk_split_partitions_in_raster_order(case):
    scores, k = case
    kept, pruned = topk_split(scores, k)
    B, n = scores.shape
    assert kept.dtype == pruned.dtype == torch.int64
    assert kept.shape == (B, k) and pruned.shape == (B, n - k)
    both = torch.cat([kept, pruned], dim=1)
    assert torch.equal(both.sort(dim=1).values, torch.arange(n).expand(B, n))  # a partition
    assert (kept.diff(dim=1) > 0).all() and (pruned.diff(dim=1) > 0).all()  # ascending
    if 0 < k < n:
        # Every kept score beats or ties every pruned one; ties go to the lower index.
        ks, ps = scores.gather(1, kept), scores.gather(1, pruned)
        assert (ks.amin(1) >= ps.amax(1)).all()
        for b in range(B):
            cut = ks[b].min()
            tied_kept = kept[b][ks[b] == cut]
            tied_pruned = pruned[b][ps[b] == cut]
            if len(tied_pruned):
                assert tied_kept.max() < tied_pruned.min()


def _split_by_sort(scores, k):
    """The plain definition: a stable descending sort, then each half sorted by index."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values


_SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30, 1.0, -1.0]


@settings(max_examples=100)
@given(st.integers(1, 3), st.integers(1, 700), st.data())
def test_topk_split_equals_a_stable_sort(B, n, data):
    """Against the sort-based definition, at sizes up to PVT's 28 x 28 grids, with signed zeros,
    infinities and many exact ties."""
    k = data.draw(st.integers(1, n))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(B, n, generator=gen).to(dtype)
    if data.draw(st.booleans()):  # only values from _SPECIAL: exact ties everywhere
        scores = torch.tensor(_SPECIAL, dtype=dtype)[torch.randint(0, len(_SPECIAL), (B, n), generator=gen)]
    for got, expected in zip(topk_split(scores, k), _split_by_sort(scores, k)):
        assert torch.equal(got, expected)


def _split_by_rule(scores, k):
    """The documented ranking, one row at a time in Python: NaN below every number, equal scores
    (and NaNs) by index, lower first; then each half sorted by index."""
    kept, pruned = [], []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda i: (math.isnan(row[i]), -row[i] if row[i] == row[i] else 0, i))
        kept.append(sorted(order[:k]))
        pruned.append(sorted(order[k:]))
    return torch.tensor(kept, dtype=torch.int64), torch.tensor(pruned, dtype=torch.int64).reshape(len(kept), -1)


@settings(max_examples=100)
@given(st.integers(2, 3), st.integers(1, 300), st.data())
def test_topk_split_nan_and_inf_in_one_image(B, n, data):
    """NaN, +-inf and huge scores in image 0 (a bad pixel): a valid partition by the rule there,
    and every other image split exactly as on its own."""
    k = data.draw(st.integers(1, n))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(B, n, generator=gen, dtype=torch.float64)
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 1e30, -1e30], dtype=torch.float64)
    where = torch.rand(n, generator=gen) < data.draw(st.sampled_from([0.1, 0.5, 1.0]))
    scores[0, where] = special[torch.randint(0, len(special), (int(where.sum()),), generator=gen)]
    scores = scores.to(dtype)
    kept, pruned = topk_split(scores, k)
    for got, expected in zip((kept, pruned), _split_by_rule(scores, k)):
        assert torch.equal(got, expected)
    for b in range(1, B):
        alone = topk_split(scores[b : b + 1], k)
        assert torch.equal(kept[b : b + 1], alone[0]) and torch.equal(pruned[b : b + 1], alone[1])


def test_topk_split_nan_example():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[0.1, nan, -inf, nan, 0.5, -inf]])
    assert [t.tolist() for t in topk_split(scores, 3)] == [[[0, 2, 4]], [[1, 3, 5]]]
    assert [t.tolist() for t in topk_split(scores, 5)] == [[[0, 1, 2, 4, 5]], [[3]]]
    assert [t.tolist() for t in topk_split(torch.full((1, 4), nan), 2)] == [[[0, 1]], [[2, 3]]]


def _keep_half(scores):
    return topk_split(scores, (scores.shape[1] + 1) // 2)


def test_topk_split_compiles_with_dynamic_k():
    torch._dynamo.reset()
    compiled = torch.compile(_keep_half, fullgraph=True, dynamic=True, backend="eager")
    for n in (5, 8):
        scores = torch.randn(2, n)
        for got, expected in zip(compiled(scores), _keep_half(scores)):
            assert torch.equal(got, expected)


def test_topk_split_keep_all_is_identity():
    scores = torch.randn(2, 7)
    kept, pruned = topk_split(scores, 7)
    assert torch.equal(kept, torch.arange(7).expand(2, 7)) and pruned.shape == (2, 0)


def test_topk_split_example():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2]])
    kept, pruned = topk_split(scores, 2)
    assert kept.tolist() == [[1, 3]] and pruned.tolist() == [[0, 2, 4]]


@settings(max_examples=50)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(0, 10), st.integers(1, 5), st.data())
def test_gather_tokens_picks_rows(B, n, m, C, data):
    x = torch.randn(B, n, C)
    flat = data.draw(st.lists(st.integers(0, n - 1), min_size=B * m, max_size=B * m))
    idx = torch.tensor(flat, dtype=torch.int64).reshape(B, m)
    out = gather_tokens(x, idx)
    assert out.shape == (B, m, C)
    for b in range(B):
        assert torch.equal(out[b], x[b, idx[b]])


@settings(max_examples=50)
@given(st.integers(1, 3), st.integers(0, 8), st.integers(1, 5))
def test_fuse_one_is_weighted_sum(B, Np, C):
    pruned = torch.randn(B, Np, C, dtype=torch.float64)
    weights = torch.rand(B, Np, dtype=torch.float64)
    out = fuse_one(pruned, weights)
    assert out.shape == (B, 1, C)
    expected = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for i in range(Np):
            expected[b] += weights[b, i] * pruned[b, i]
    torch.testing.assert_close(out[:, 0], expected)


def test_fuse_one_casts_weights_to_token_dtype():
    pruned = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    out = fuse_one(pruned, torch.rand(2, 5))  # float32 weights, as cls_attention returns
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4)


def test_fuse_one_gradcheck():
    pruned = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fuse_one, (pruned, weights))


@pytest.mark.parametrize("Np", [0, 3])
def test_drop_returns_reserved(Np):
    reserved = torch.randn(2, 4, 3)
    assert drop(reserved, torch.randn(2, Np, 3)) is reserved


def test_topk_split_exact_under_autocast():
    """The prefix counts are a matmul: autocast must not round them (bf16 holds integers only to
    256), so a 700-token split still equals the sort-based one."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 700, generator=g)
    scores[:, ::3] = 0.5  # 234 exact ties per row, straddling the cut
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = topk_split(scores, 300)
    for a, b in zip(got, _split_by_sort(scores, 300)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, n", [(torch.float16, 2048), (torch.float32, 3000)])
def test_prefix_counts_exact_in_their_dtype(dtype, n):
    """The counting GEMM's dtypes (float16 on CUDA up to n = 2048, else float32) hold every count:
    a dense mask counts up to n itself."""
    from tokenreduce.ops.select import _count_upto

    g = torch.Generator().manual_seed(n)
    mask = torch.rand(3, n, generator=g) > 0.3
    mask[0] = True  # the largest counts: 1 .. n
    upper = torch.ones(n, n, dtype=dtype).triu()
    assert torch.equal(_count_upto(mask, upper), mask.long().cumsum(dim=1))


def test_count_dtype_is_float16_only_where_exact():
    from tokenreduce.ops.select import _count_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _count_dtype(cuda, 2048) == torch.float16
    assert _count_dtype(cuda, 2049) == torch.float32
    assert _count_dtype(cpu, 196) == torch.float32
