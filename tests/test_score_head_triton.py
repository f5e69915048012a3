"""The fused score head (``tokenreduce::score_head_keep``, ops/score_head_triton.py) against an
unbatched float64 oracle of ``ScoreHead`` and against the reference operator.

As in test_squeeze_triton.py: ``interp_`` tests run in a child pytest under Triton's interpreter
(CPU), the kernels are compiled ahead of time for sm_90, and ``gpu`` tests run them on CUDA.
fp32 operands must agree with the oracle to fp32 accuracy; bf16 operands round the stored
activations as the unfused head does under autocast, so they get a bf16 tolerance.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from tokenreduce.ops import ScoreHead
from tokenreduce.ops.score_head import score_head_keep_reference

from triton_interp import HAVE_TRITON, INTERPRETING, driver, interp, needs_triton, run_interp_tests

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
EPS = 1e-5
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # absolute, on log-probabilities of size ~1


def head_params(C: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A ScoreHead's parameters with random (not default) norm affine: (ln_w, ..., b4)."""
    torch.manual_seed(seed)
    head = ScoreHead(C)
    with torch.no_grad():
        head.embed[0].weight.uniform_(0.5, 1.5)
        head.embed[0].bias.normal_(0, 0.1)
    e, c = head.embed, head.classify
    return tuple(p.detach() for p in (e[0].weight, e[0].bias, e[1].weight, e[1].bias, c[0].weight,
                                      c[0].bias, c[2].weight, c[2].bias, c[4].weight, c[4].bias))


def oracle64(x: torch.Tensor, params: tuple[torch.Tensor, ...], P: int) -> torch.Tensor:
    """(B, n) float64 keep log-probabilities, one image at a time, written from the module's
    description: norm -> Linear(C, C) -> GELU; local half, mean of the global half; C -> C/2 ->
    C/4 -> 2 with GELUs between; log-softmax, channel 0."""
    ln_w, ln_b, w1, b1, w2, b2, w3, b3, w4, b4 = (p.double() for p in params)
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    half = x.shape[-1] // 2
    out = []
    for xb in x.double():  # (P + n, C)
        mu = xb.mean(dim=-1, keepdim=True)
        var = ((xb - mu) ** 2).mean(dim=-1, keepdim=True)
        h = gelu(((xb - mu) / torch.sqrt(var + EPS) * ln_w + ln_b) @ w1.T + b1)[P:]
        feat = torch.cat([h[:, :half], h[:, half:].mean(dim=0, keepdim=True).expand(h.shape[0], -1)], dim=1)
        z = gelu(gelu(feat @ w2.T + b2) @ w3.T + b3) @ w4.T + b4  # (n, 2)
        out.append(z[:, 0] - torch.logsumexp(z, dim=1))
    return torch.stack(out)


@st.composite
def head_case(draw):
    """(x (B, P + n, C), P, C): any even C >= 4 (halves and quarters off the tile sizes too)."""
    B = draw(st.integers(1, 3))
    P = draw(st.integers(0, 2))
    n = draw(st.integers(1, 150))
    C = draw(st.sampled_from([4, 6, 10, 32, 50, 64, 66, 96, 130, 192]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P + n, C, generator=g) * draw(st.sampled_from([0.5, 3.0])) + draw(st.sampled_from([0.0, 2.0]))
    return x, P, C, seed


@driver
def test_kernels_under_triton_interpreter():
    run_interp_tests(__file__)


# ------------------------------------------------------------ interpreter tests (child only)
@interp
@settings(max_examples=12, deadline=None)
@given(case=head_case(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_interp_agrees_with_oracle(case, dtype):
    from tokenreduce.ops.score_head_triton import score_head_keep_triton

    x, P, C, seed = case
    params = head_params(C, seed % 1000)
    got = score_head_keep_triton(x, params, P, EPS, dtype)
    assert got.shape == (x.shape[0], x.shape[1] - P) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), oracle64(x, params, P), atol=TOL[dtype], rtol=0)


@interp
def test_interp_strided_input_and_other_tilings():
    """A non-contiguous x (channels strided) and the benchmark's other tilings give the same."""
    from tokenreduce.ops.score_head_triton import _config, score_head_keep_triton

    x = torch.randn(2, 1 + 70, 2 * 96)[..., ::2]  # C = 96, channel stride 2
    params = head_params(96, 3)
    want = oracle64(x, params, 1)
    for overrides in ({}, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_N": 16}):
        cfg = dict(_config(96), **overrides)
        got = score_head_keep_triton(x, params, 1, EPS, torch.float32, config=cfg)
        torch.testing.assert_close(got.double(), want, atol=TOL[torch.float32], rtol=0)


# --------------------------------------------------------------------- plain (no kernel run)
def test_reference_equals_module_and_oracle():
    """The reference operator is the module's own math (bit for bit in fp32) and the oracle's."""
    torch.manual_seed(0)
    head = ScoreHead(66)
    x = torch.randn(3, 2 + 40, 66) * 2
    params = tuple(p.detach() for p in (head.embed[0].weight, head.embed[0].bias, head.embed[1].weight,
                                        head.embed[1].bias, head.classify[0].weight, head.classify[0].bias,
                                        head.classify[2].weight, head.classify[2].bias,
                                        head.classify[4].weight, head.classify[4].bias))
    with torch.no_grad():
        got = score_head_keep_reference(x, *params, 2, head.embed[0].eps, torch.float32)
        assert torch.equal(got, head(x, None, 2)[..., 0])
        assert torch.equal(head.keep_log_prob(x, 2), got)  # CPU: the module itself
    torch.testing.assert_close(got.double(), oracle64(x, params, 2), atol=1e-5, rtol=0)


def test_operator_gradient_is_the_references():
    """The operator's autograd recomputes with the reference: same gradients as the module."""
    torch.manual_seed(1)
    head = ScoreHead(32)
    x = torch.randn(2, 1 + 9, 32, requires_grad=True)
    params = [p for p in (head.embed[0].weight, head.embed[0].bias, head.embed[1].weight, head.embed[1].bias,
                          head.classify[0].weight, head.classify[0].bias, head.classify[2].weight,
                          head.classify[2].bias, head.classify[4].weight, head.classify[4].bias)]
    out = torch.ops.tokenreduce.score_head_keep(x, *params, 1, EPS, torch.float32)
    grads = torch.autograd.grad(out.sum(), [x, params[2], params[-1]])
    want = torch.autograd.grad(head(x, None, 1)[..., 0].sum(), [x, params[2], params[-1]])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="checks behaviour outside the interpreter")
def test_argument_errors_name_the_problem():
    from tokenreduce.ops.score_head_triton import score_head_keep_triton

    params = head_params(8, 0)
    with pytest.raises(ValueError, match=r"score_head_keep_triton: x must be a \(B, P \+ n, C\) float32"):
        score_head_keep_triton(torch.zeros(2, 5, 8, dtype=torch.float64), params, 1, EPS, torch.float32)
    with pytest.raises(ValueError, match=r"needs 0 <= num_prefix < N and an even C >= 4; got x \(2, 5, 8\), num_prefix 5"):
        score_head_keep_triton(torch.zeros(2, 5, 8), params, 5, EPS, torch.float32)
    with pytest.raises(ValueError, match=r"params must be the 10 tensors"):
        score_head_keep_triton(torch.zeros(2, 5, 8), params[:9], 1, EPS, torch.float32)
    if not HAVE_CUDA:
        with pytest.raises(ValueError, match="score_head_keep_triton: tensors must be on a CUDA device"):
            score_head_keep_triton(torch.zeros(2, 5, 8), params, 1, EPS, torch.float32)


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the JIT function")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_hopper(dtype):
    """Ahead-of-time compile of both kernels to sm_90 (no GPU needed) at DeiT-S's tiling."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from tokenreduce.ops import score_head_triton as sht

    cfg = sht._config(384)
    precision = "tf32x3" if dtype == "fp32" else "tf32"
    operand = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for kernel in (sht._head_embed_kernel, sht._head_classify_kernel):
        names = kernel.arg_names
        consts = dict(DT=sht._TL_DTYPES[operand], PRECISION=precision, DOT_F32=False,
                      **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
        if "BLOCK_Q" in names:
            consts["BLOCK_Q"] = cfg["BLOCK_Q"]
        signature = {}
        for name in names:
            if name in consts:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):  # the stream, parameters and sums fp32; h in the operand dtype
                signature[name] = f"*{dtype}" if name == "h_ptr" else "*fp32"
            elif name == "eps":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        try:
            src = ASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
        except TypeError as err:
            pytest.skip(f"this triton's ahead-of-time compile API differs: {err}")
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True})
        except FileNotFoundError as err:
            pytest.skip(f"cannot compile for sm_90 here: {err}")
        assert "st.global" in compiled.asm["ptx"]
        assert "mma" in compiled.asm["ptx"], f"{kernel.__name__}: no tensor-core product in the PTX"


# --------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(256, 1, 196, 384), (8, 1, 137, 768), (3, 0, 784, 128), (5, 2, 1, 10), (4, 0, 49, 320)])
def test_cuda_agrees_with_oracle(dtype, size):
    from tokenreduce.ops.score_head_triton import score_head_keep_triton

    B, P, n, C = size
    g = torch.Generator().manual_seed(n + C)
    x = torch.randn(B, P + n, C, generator=g) * 2 + 0.5
    params = head_params(C, C)
    got = score_head_keep_triton(x.cuda(), tuple(p.cuda() for p in params), P, EPS, dtype).cpu()
    torch.testing.assert_close(got.double(), oracle64(x, params, P), atol=TOL[dtype], rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_module_dispatches_to_triton_and_passes_opcheck():
    from tokenreduce.ops import score_head_triton

    assert score_head_triton.register_cuda_kernel() is True
    torch.manual_seed(0)
    head = ScoreHead(384).cuda()
    x = torch.randn(16, 1 + 196, 384, device="cuda")
    calls = []
    real = score_head_triton.score_head_keep_triton
    try:
        score_head_triton.score_head_keep_triton = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got = head.keep_log_prob(x, 1)
            unfused = head(x, None, 1)[..., 0].float()
    finally:
        score_head_triton.score_head_keep_triton = real
    assert calls, "ScoreHead.keep_log_prob did not reach the Triton kernels on CUDA"
    torch.testing.assert_close(got, unfused, atol=TOL[torch.bfloat16], rtol=0)
    e, c = head.embed, head.classify
    params = (e[0].weight, e[0].bias, e[1].weight, e[1].bias, c[0].weight, c[0].bias, c[2].weight,
              c[2].bias, c[4].weight, c[4].bias)
    op = torch.ops.tokenreduce.score_head_keep.default
    torch.library.opcheck(op, (x, *params, 1, EPS, torch.float32))
    torch.library.opcheck(op, (x[:4].clone().requires_grad_(), *params, 1, EPS, torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
def test_compiled_head_is_the_module_under_inductor():
    """Under torch.compile ``keep_log_prob`` is the module's math (Inductor's fusion measured
    faster than the two kernels, benchmarks.md): no kernel of the operator in the graph."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    head = ScoreHead(192).cuda().eval()
    x = torch.randn(8, 1 + 196, 192, device="cuda")

    def score(t):
        return head.keep_log_prob(t * 2.0 + 1.0, 1)

    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, codes = run_and_get_code(torch.compile(score, fullgraph=True), x)
        want = head(x * 2.0 + 1.0, None, 1)[..., 0].float()
    code = "\n".join(codes)
    assert "_head_embed_kernel" not in code and "score_head_keep" not in code
    torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=0)
