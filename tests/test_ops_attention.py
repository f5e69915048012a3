"""Class-token scores and key-masked (policy) attention, ops/attention.py."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from tokenreduce.ops import cls_attention, policy_attention, policy_softmax


def qkv(B=2, H=3, N=6, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(3))


def policy_mask(B, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, generator=g) > 0.4).to(dtype)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cls_attention_is_class_row_of_full_attention(num_prefix, dtype):
    q, k, _ = qkv(N=7, dtype=dtype, seed=num_prefix)
    scale = 4**-0.5
    full = ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, N, N)
    expected = full[:, :, 0, num_prefix:].mean(dim=1)  # (B, N - P)
    out = cls_attention(q, k, scale, num_prefix)
    assert out.dtype == torch.float32 and out.shape == (2, 7 - num_prefix)
    # bf16: the q.k product is rounded to bf16 (fp32 accumulation), the softmax is float32
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_attention_compiled_form_matches(dtype):
    """Under torch.compile the scores are a fused multiply-sum over a strided K (no matmul): the
    same values, from K as a view of a qkv projection as in timm's Attention."""
    g = torch.Generator().manual_seed(3)
    B, H, N, d = 2, 3, 9, 8
    qkv_ = torch.randn(B, N, 3, H, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    q, k = qkv_[0], qkv_[1]  # (B, H, N, d) strided views
    scale = d**-0.5
    full = ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(dim=-1)
    expected = full[:, :, 0, 1:].mean(dim=1).float()
    torch._dynamo.reset()
    compiled = torch.compile(cls_attention, fullgraph=True)
    out = compiled(q, k, scale, 1)
    assert out.dtype == torch.float32 and out.shape == (B, N - 1)
    # fp32 products in both dtypes: bf16 inputs are exact in them, so only the sum rounds
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=50)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    N=st.integers(1, 9),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_policy_softmax_all_ones_is_softmax(B, H, N, d, seed):
    q, k, _ = qkv(B, H, N, d, dtype=torch.float32, seed=seed)
    scores = q @ k.transpose(-2, -1)
    out = policy_softmax(scores, torch.ones(B, N))
    # The eps terms move each entry by at most 1e-6; rtol covers float32 rounding on top.
    expected = scores.double().softmax(dim=-1).float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=50)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 8), st.integers(0, 2**31))
def test_policy_softmax_matches_formula(B, H, N, seed):
    q, k, _ = qkv(B, H, N, 3, dtype=torch.float64, seed=seed)
    s = (q @ k.transpose(-2, -1)).float()
    p = policy_mask(B, N, seed, torch.float32)
    out = policy_softmax(s, p)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                vis = torch.tensor([float(p[b, j]) if j != i else 1.0 for j in range(N)])
                a = (s[b, h, i] - s[b, h, i].max()).exp() * vis
                expected = (a + 1e-6 / N) / (a.sum() + 1e-6)
                torch.testing.assert_close(out[b, h, i], expected)
    # A dropped key gets only the eps share, (eps / N) / (rowsum(A) + eps): the same for every
    # dropped key of a row (not ~0: the row max includes dropped keys, so rowsum(A) can be small).
    dropped = ((p == 0).reshape(B, 1, 1, N) & ~torch.eye(N, dtype=torch.bool)).expand_as(out)
    for row, mask in zip(out.reshape(-1, N), dropped.reshape(-1, N)):
        assert (row[mask] == row[mask][:1]).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(B, H, N), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_policy_softmax_returns_input_dtype(dtype):
    scores = torch.randn(2, 2, 5, 5, dtype=dtype)
    assert policy_softmax(scores, torch.ones(2, 5)).dtype == dtype


def test_policy_attention_all_ones_matches_sdpa():
    q, k, v = qkv(dtype=torch.float32)
    scale = 0.37
    out = policy_attention(q, k, v, torch.ones(2, 6), scale)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_policy_attention_ignores_dropped_values():
    q, k, v = qkv()
    policy = torch.tensor([[1.0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.float64)
    out = policy_attention(q, k, v, policy, 0.5)
    # A dropped token's value reaches other tokens only through the eps share (<= 1e-6 / N of
    # rowsum(A)); it still reaches the token itself, which always sees itself.
    v2 = v.clone()
    v2[0, :, 2] += 1.0
    out2 = policy_attention(q, k, v2, policy, 0.5)
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out2[0, :, others], out[0, :, others], rtol=0, atol=1e-4)
    assert (out2[0, :, 2] - out[0, :, 2]).abs().amin() > 1e-3
    torch.testing.assert_close(out2[1], out[1], rtol=0, atol=0)


def test_policy_gradcheck():
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, N=4, d=3))
    policy = policy_mask(1, 4, seed=3).requires_grad_()

    def attention(q, k, v, p):
        return policy_attention(q, k, v, p, 0.6)

    assert torch.autograd.gradcheck(attention, (q, k, v, policy))
    scores = (torch.randn(1, 2, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(policy_softmax, (scores, policy))


def test_policy_softmax_for_the_first_queries_only():
    """Queries of the first Nq tokens only (a class token in front, CaiT's class attention): the
    rows of the full policy softmax for those tokens, each still seeing itself."""
    torch.manual_seed(4)
    scores = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    policy = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.float64)
    full = policy_softmax(scores, policy)
    for nq in (1, 3):
        torch.testing.assert_close(policy_softmax(scores[:, :, :nq], policy), full[:, :, :nq], rtol=0, atol=0)
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for n in (1, 7, 7))
    want = policy_softmax((q * 0.5) @ k.transpose(-2, -1), policy) @ v
    torch.testing.assert_close(policy_attention(q, k, v, policy, 0.5), want, rtol=0, atol=0)
