"""The Triton split (``tokenreduce::split_order``, ops/select_triton.py) against the reference.

As in test_squeeze_triton.py: ``interp_`` tests run in a child pytest under Triton's
interpreter (CPU), the kernel is compiled ahead of time for sm_90, and ``gpu`` tests run it on
CUDA. The split is exact: every test compares for equality.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from triton_interp import HAVE_TRITON, INTERPRETING, driver, interp, needs_triton, run_interp_tests

from tokenreduce.ops import register_device_kernels
from tokenreduce.ops.select import split_order_reference

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")


@st.composite
def scores_and_k(draw, max_n=300):
    """(scores (B, n), k): values from a small integer set (many ties, -0 and +0 among them),
    or continuous; float32 / bfloat16 / float16; sometimes a transposed (strided) view; sometimes
    NaN (both signs) and infinities in one image."""
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        scores = torch.randint(-3, 4, (B, n), generator=g).float() * torch.where(
            torch.rand(B, n, generator=g) < 0.5, -1.0, 1.0
        )  # signed zeros too
    else:
        scores = torch.randn(B, n, generator=g)
    if draw(st.booleans()):  # non-finite scores in image 0: NaN of either sign bit, +-inf
        special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
        where = torch.rand(n, generator=g) < 0.3
        scores[0, where] = special[torch.randint(0, 4, (int(where.sum()),), generator=g)]
    scores = scores.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    if draw(st.booleans()):
        scores = scores.t().contiguous().t()  # (B, n) with strides (1, B)
    return scores, draw(st.integers(1, n))


@driver
def test_kernel_under_triton_interpreter():
    run_interp_tests(__file__)


# ------------------------------------------------------------ interpreter tests (child only)
@interp
@settings(max_examples=40)
@given(case=scores_and_k())
def test_interp_equals_reference(case):
    from tokenreduce.ops.select_triton import split_order_triton

    scores, k = case
    assert torch.equal(split_order_triton(scores, k), split_order_reference(scores, k))


@interp
def test_interp_ties_and_signed_zeros():
    from tokenreduce.ops.select_triton import split_order_triton

    scores = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, -1.0]])
    # 1.0 first, then the zeros by index: k = 3 keeps 2 (the one) and 0, 1 (the first zeros)
    assert split_order_triton(scores, 3).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert split_order_triton(scores, 2).tolist() == [[0, 2, 1, 3, 4, 5]]
    assert split_order_triton(scores, 6).tolist() == [[0, 1, 2, 3, 4, 5]]


@interp
def test_interp_nan_ranks_below_every_number():
    # NaN of either sign bit (torch's 0 * inf is a negative NaN on x86) after -inf, ties by index;
    # the other image of the batch is split as if alone.
    from tokenreduce.ops.select_triton import split_order_triton

    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[0.1, nan, -inf, -nan, 0.5, -inf], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    expected = {1: [4], 2: [0, 4], 3: [0, 2, 4], 4: [0, 2, 4, 5], 5: [0, 1, 2, 4, 5]}
    for k, kept in expected.items():
        order = split_order_triton(scores, k)
        assert order[0].tolist() == kept + sorted(set(range(6)) - set(kept))
        assert order[1].tolist() == list(range(6))
        assert torch.equal(order, split_order_reference(scores, k))
    all_nan = torch.full((1, 300), nan)
    assert split_order_triton(all_nan, 7).tolist() == [list(range(300))]


@interp
def test_interp_deit_site_sizes():
    from tokenreduce.ops.select_triton import split_order_triton

    g = torch.Generator().manual_seed(7)
    for n, k in ((196, 137), (137, 96), (96, 67), (784, 549)):  # DeiT sites; PVT stage 2 (larger: GPU tests)
        scores = torch.randn(4, n, generator=g)
        assert torch.equal(split_order_triton(scores, k), split_order_reference(scores, k))


# --------------------------------------------------------------------- plain (no kernel run)
@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the JIT function")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_hopper(dtype):
    """Ahead-of-time compile to sm_90 (no GPU needed): the sort, scan and scatter lower."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from tokenreduce.ops.select_triton import _split_order_kernel as kernel

    names = kernel.arg_names
    signature = {n: {"s_ptr": f"*{dtype}", "out_ptr": "*i64", "BLOCK_N": "constexpr"}.get(n, "i32") for n in names}
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index("BLOCK_N"),): 256})
    except TypeError as err:
        pytest.skip(f"this triton's ahead-of-time compile API differs: {err}")
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": True}
        )
    except FileNotFoundError as err:
        pytest.skip(f"cannot compile for sm_90 here: {err}")
    assert "st.global" in compiled.asm["ptx"]


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="checks behaviour outside the interpreter")
def test_argument_errors_name_the_problem():
    from tokenreduce.ops.select_triton import MAX_N, split_order_triton

    with pytest.raises(
        TypeError, match="split_order_triton: `scores` must have dtype float32, bfloat16, float16, got torch.float64"
    ):
        split_order_triton(torch.zeros(2, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"split_order_triton: `scores` must have 2 dims \(B, n\), got shape \(5,\)"):
        split_order_triton(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=rf"needs 1 <= k <= n <= {MAX_N}; got n = 5, k = 6"):
        split_order_triton(torch.zeros(2, 5), 6)
    if not HAVE_CUDA:
        with pytest.raises(ValueError, match="split_order_triton: tensors must be on a CUDA device"):
            split_order_triton(torch.zeros(2, 5), 2)


def test_register_device_kernels_rejects_unknown_operators():
    with pytest.raises(
        ValueError,
        match=r"unknown operator\(s\) \['split'\]; known: \['squeeze', "
        r"'squeeze_tokens', 'split_order'\]",
    ):
        register_device_kernels("cuda", split=lambda s, k: s)


# --------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(256, 196, 137), (64, 3136, 2195), (8, 5, 1), (3, 8192, 4000)])
def test_cuda_equals_reference(dtype, size):
    from tokenreduce.ops.select_triton import split_order_triton

    B, n, k = size
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(B, n, generator=g).to(dtype)
    scores[:, ::4] = 0.25  # exact ties straddling the cut
    scores[1, 1::5] = float("nan")  # NaN ranks below every number
    scores[2, 2::7] = -float("inf")
    got = split_order_triton(scores.cuda(), k)
    assert torch.equal(got.cpu(), split_order_reference(scores, k))


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_dispatches_to_triton_and_passes_opcheck():
    from tokenreduce.ops import enable_triton_kernels, select_triton, topk_split

    enable_triton_kernels(True)
    scores = torch.randn(16, 196, device="cuda")
    calls = []
    real = select_triton.split_order_triton
    try:
        select_triton.split_order_triton = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        kept, pruned = topk_split(scores, 137)
    finally:
        select_triton.split_order_triton = real
    assert calls, "topk_split did not reach the Triton kernel on CUDA"
    ref = split_order_reference(scores.cpu(), 137)
    assert torch.equal(kept.cpu(), ref[:, :137]) and torch.equal(pruned.cpu(), ref[:, 137:])
    torch.library.opcheck(torch.ops.tokenreduce.split_order.default, (scores, 137))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op: torch >= 2.6")
def test_compiled_split_launches_the_kernel_from_the_graph():
    from torch._inductor.utils import run_and_get_code

    from tokenreduce.ops import topk_split

    scores = torch.randn(8, 196, device="cuda")

    def split(s):
        return topk_split(s.softmax(dim=-1), 137)

    torch._dynamo.reset()
    (kept, pruned), codes = run_and_get_code(torch.compile(split, fullgraph=True), scores)
    code = "\n".join(codes)
    assert "_split_order_kernel" in code and "tokenreduce.split_order" not in code
    assert "topk" not in code, "the reference's top-k still runs in the compiled graph"
    ref = split_order_reference(scores.softmax(dim=-1).cpu(), 137)
    assert torch.equal(kept.cpu(), ref[:, :137]) and torch.equal(pruned.cpu(), ref[:, 137:])
