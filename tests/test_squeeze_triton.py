"""The Triton squeeze kernel against a float64 oracle written from tps-reference Sec. 1.

Four groups:
  * interpreter tests (CPU): Triton's interpreter must be switched on before triton is
    imported, so ``test_kernels_under_triton_interpreter`` runs this file's ``interp_`` tests in
    a child pytest with ``TRITON_INTERPRET=1``.  In the main process they are skipped.
  * ahead-of-time compilation of the three kernels for sm_90 (no GPU needed).
  * plain tests (no triton needed): argument validation and the ``enable_triton_kernels`` switch.
  * ``gpu`` tests: the compiled kernels on CUDA against the oracle and the project reference,
    dispatch through ``torch.ops.tokenreduce.squeeze`` and ``torch.library.opcheck``.

Host assignment is compared "host-aware": the kernel's host for each pruned token must reach the
maximal cosine within a tolerance (a near-tie may legitimately go either way in another
precision), and the output must equal the formula evaluated with the kernel's own hosts.  Rows
that no near-tied pruned token can reach must also match the oracle's own argmax outright.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from triton_interp import HAVE_TRITON, INTERPRETING, driver, interp, needs_triton, run_interp_tests

HAVE_CUDA = torch.cuda.is_available()

# Two candidate hosts closer than this in cosine may swap between precisions: their rows are
# compared with the oracle's own argmax only when no pruned token is torn between them.
NEAR_TIE = 1e-5


# ---------------------------------------------------------------------------------- oracle
def cosine64(reserved: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """c[b, i, j] in float64: (B, Np, Nr)."""
    r = reserved.double()
    p = pruned.double()
    rn = r / (r.norm(dim=-1, keepdim=True) + 1e-6)
    pn = p / (p.norm(dim=-1, keepdim=True) + 1e-6)
    return pn @ rn.transpose(1, 2)


def formula64(reserved, pruned, hosts=None):
    """(y (B, Nr, C) float64, matched (B, Nr) bool) from Sec. 1; ``hosts`` (B, Np) overrides argmax."""
    B, Nr, C = reserved.shape
    c = cosine64(reserved, pruned)  # (B, Np, Nr)
    h = c.argmax(dim=-1) if hosts is None else hosts.long()  # argmax: first maximal index
    w = c.gather(-1, h[..., None]).exp()  # (B, Np, 1)
    num = math.e * reserved.double()
    num = num.scatter_add(1, h[..., None].expand(-1, -1, C), w * pruned.double())
    den = torch.full((B, Nr), math.e, dtype=torch.float64).scatter_add(1, h, w[..., 0])
    matched = torch.zeros(B, Nr, dtype=torch.bool).scatter(1, h, True)
    return num / den[..., None], matched


def settled_rows(reserved, pruned) -> torch.Tensor:
    """(B, Nr) bool: reserved rows that no near-tied pruned token could move to or from."""
    c = cosine64(reserved, pruned)  # (B, Np, Nr)
    if c.shape[1] == 0:
        return torch.ones(reserved.shape[:2], dtype=torch.bool)
    near = c >= c.max(-1, keepdim=True).values - NEAR_TIE  # (B, Np, Nr): candidate hosts
    torn = near.sum(-1, keepdim=True) > 1  # (B, Np, 1)
    return ~(near & torn).any(dim=1)


def check(reserved, pruned, y, hosts, *, rtol, atol, host_tol):
    """Host-aware comparison of the kernel output ``y`` (and its ``hosts``) with the oracle."""
    assert y.shape == reserved.shape and y.dtype == reserved.dtype
    r, p, y, hosts = reserved.cpu(), pruned.cpu(), y.cpu(), hosts.cpu().long()
    if p.shape[1] > 0:
        assert hosts.min() >= 0 and hosts.max() < r.shape[1], "host index out of range"
        c = cosine64(r, p)
        shortfall = c.max(-1).values - c.gather(-1, hosts[..., None])[..., 0]
        assert shortfall.max() <= host_tol, f"kernel host is not a best match: {shortfall.max()}"
    expected, matched = formula64(r, p, hosts)
    # Rows that host nothing: the input, bit for bit.
    assert torch.equal(y[~matched], r[~matched]), "unmatched reserved rows changed"
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
    # Against the oracle's own argmax wherever no near-tie makes the host ambiguous.
    settled = settled_rows(r, p)
    oracle, oracle_matched = formula64(r, p)
    torch.testing.assert_close(y.double()[settled], oracle[settled], rtol=rtol, atol=atol)
    unmatched = settled & ~oracle_matched
    assert torch.equal(y[unmatched], r[unmatched]), "rows the oracle leaves alone changed"


def randn(*shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


# ------------------------------------------------------------------- driver (main process)
@driver
def test_kernels_under_triton_interpreter():
    run_interp_tests(__file__)


# ------------------------------------------------------------ interpreter tests (child only)
# Every (Np, C) pair of B {1, 3} x Nr {1, 5, 17} x Np {0, 1, 7, 33} x C {1, 3, 64, 100}, with Nr
# cycling so that every (Nr, Np) and (Nr, C) pair occurs too: each interpreted launch costs
# 0.1-0.3 s, so the full product (96 cases) would take minutes on a busy 2-core machine.
SIZES = [
    (1 + 2 * ((i + j) % 2), (1, 5, 17)[(i + j) % 3], Np, C)
    for i, Np in enumerate((0, 1, 7, 33))
    for j, C in enumerate((1, 3, 64, 100))
]
# Several tiles along every loop: Nr > 64 (reserved tiles), C > 64 (channel chunks and channel
# grid); Np > 128 (the fuse kernel's loop over pruned blocks) and P + Nr > 128 (row groups).
# > 128 pruned tokens: fewer than reserved (the update kernel), then more (the fuse kernel's loop over
# pruned blocks).  DeiT-S's (137, 59, 384) is in test_interp_matches_project_reference.
SIZES += [(2, 80, 70, 130), (1, 150, 140, 20), (1, 100, 140, 20)]


@interp
def test_interp_sizes_fp32():
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    for k, (B, Nr, Np, C) in enumerate(SIZES):
        r = randn(B, Nr, C, seed=2 * k)
        p = randn(B, Np, C, seed=2 * k + 1)
        y, hosts = _squeeze_with_hosts(r, p)
        try:
            check(r, p, y, hosts, rtol=1e-5, atol=1e-6, host_tol=1e-6)
        except AssertionError as err:
            raise AssertionError(f"B={B} Nr={Nr} Np={Np} C={C}: {err}") from err
        if Np == 0:
            assert torch.equal(y, r) and y.data_ptr() != r.data_ptr()


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interp_half_precision(dtype):
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    for k, (B, Nr, Np, C) in enumerate([(2, 5, 7, 3), (3, 17, 33, 100), (2, 80, 70, 130)]):
        r = randn(B, Nr, C, seed=100 + k, dtype=dtype)
        p = randn(B, Np, C, seed=200 + k, dtype=dtype)
        y, hosts = _squeeze_with_hosts(r, p)
        # The fp32 result is rounded once to the 16-bit output: half an ulp (2^-8 or 2^-11 rel).
        check(r, p, y, hosts, rtol=2**-7, atol=1e-3, host_tol=1e-6)


@interp
def test_interp_ties_pick_lowest_index():
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    # Small integers: every dot product is exact in any summation order, so duplicated reserved
    # tokens tie exactly (random floats could differ in the last bit between BLAS lanes).
    B, Nr, C = 2, 80, 24
    g = torch.Generator().manual_seed(7)
    r = torch.randint(-3, 4, (B, Nr, C), generator=g).float()
    r[:, 70] = r[:, 5]  # exact duplicates in different reserved tiles (BLOCK_R = 64)
    r[:, 9] = r[:, 3]  # and within one tile
    p = torch.stack([2.0 * r[:, 5], 0.5 * r[:, 3], r[:, 70]], dim=1)  # (B, 3, C)
    y, hosts = _squeeze_with_hosts(r, p)
    assert hosts.tolist() == [[5, 3, 5]] * B
    assert torch.equal(y[:, 70], r[:, 70]) and torch.equal(y[:, 9], r[:, 9])
    check(r, p, y, hosts, rtol=1e-5, atol=1e-6, host_tol=0.0)


@interp
def test_interp_negative_cosines_order_and_tie():
    # Every cosine negative: the packed host keys must order negative floats correctly and still
    # prefer the lowest index between tiles (rows 10 and 75 tie at the maximum, -0.447).
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    r = torch.ones(1, 80, 2)  # cos -0.949 with the pruned token
    r[0, 3] = torch.tensor([1.0, 0.0])  # -0.894
    r[0, 10] = r[0, 75] = torch.tensor([0.0, 1.0])  # -0.447
    p = torch.tensor([[[-1.0, -0.5]]])
    y, hosts = _squeeze_with_hosts(r, p)
    assert hosts.tolist() == [[10]]
    check(r, p, y, hosts, rtol=1e-5, atol=1e-6, host_tol=0.0)


@interp
def test_interp_zero_tokens():
    # A zero token normalises to zero: cosine 0 with everything, so a zero pruned token joins
    # reserved token 0 (first index among equal cosines) with weight exp(0) = 1.
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    r = randn(1, 6, 10, seed=21)
    r[:, 2] = 0.0
    p = randn(1, 4, 10, seed=22)
    p[:, 1] = 0.0
    y, hosts = _squeeze_with_hosts(r, p)
    assert hosts[0, 1] == 0
    check(r, p, y, hosts, rtol=1e-5, atol=1e-6, host_tol=1e-6)
    y, hosts = _squeeze_with_hosts(r, torch.zeros(1, 3, 10))
    assert hosts.tolist() == [[0, 0, 0]]
    torch.testing.assert_close(y[:, 0], r[:, 0] * math.e / (math.e + 3), rtol=1e-6, atol=0)
    assert torch.equal(y[:, 1:], r[:, 1:])


@interp
def test_interp_strided_inputs():
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    x = randn(3, 40, 50, seed=11)
    r = x[:, ::2]  # (3, 20, 50), token stride 100
    p = x[:, 1:34:3]  # (3, 11, 50), token stride 150
    r2 = randn(3, 50, 17, seed=12).transpose(1, 2)  # (3, 17, 50), channel stride != 1
    for rr, pp in ((r, p), (r2, p)):
        y, hosts = _squeeze_with_hosts(rr, pp)
        assert y.is_contiguous()
        check(rr, pp, y, hosts, rtol=1e-5, atol=1e-6, host_tol=1e-6)


@interp
def test_interp_matches_project_reference():
    ref = pytest.importorskip("tokenreduce.ops.squeeze", reason="ops/squeeze.py not written yet")
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    for k, (B, Nr, Np, C) in enumerate([(2, 17, 33, 100), (2, 137, 59, 384), (1, 5, 0, 8)]):
        r, p = randn(B, Nr, C, seed=300 + k), randn(B, Np, C, seed=400 + k)
        settled = settled_rows(r, p)
        assert settled.float().mean() > 0.9
        y, expected = squeeze_triton(r, p), ref.squeeze_reference(r, p)
        torch.testing.assert_close(y[settled], expected[settled], rtol=1e-5, atol=1e-6)


def split_indices(B, n, k, seed):
    """(kept (B, k), pruned (B, n - k)) int64: a random partition of 0..n-1 per image, unsorted,
    both views of one (B, n) tensor (token stride n, as ``topk_split`` returns them)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    return order[:, :k], order[:, k:]


def check_indexed(x, kept, pruned, P, y, hosts, **tol):
    """``squeeze_tokens`` output against the oracle on the gathered rows; prefix rows exact."""
    B, _, C = x.shape
    assert y.shape == (B, P + kept.shape[1], C) and y.dtype == x.dtype
    assert torch.equal(y[:, :P].cpu(), x[:, :P].cpu()), "prefix rows changed"
    patches = x[:, P:].cpu()
    r = patches.gather(1, kept.cpu()[..., None].expand(-1, -1, C))
    p = patches.gather(1, pruned.cpu()[..., None].expand(-1, -1, C))
    check(r, p, y[:, P:], hosts, **tol)


INDEXED_SIZES = [
    (2, 1, 20, 13, 24),
    (3, 0, 9, 4, 100),
    (2, 2, 90, 70, 70),
    (1, 1, 5, 5, 8),
    (2, 1, 66, 1, 16),
    (1, 1, 300, 140, 20),  # > 128 pruned (the fuse kernel's blocks of 64) and output rows
    (1, 1, 300, 160, 20),
]  # 128 < Np < Nr: the update kernel


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_indexed(dtype):
    from tokenreduce.ops.squeeze_triton import _squeeze_tokens_with_hosts

    tol = (
        dict(rtol=1e-5, atol=1e-6, host_tol=1e-6)
        if dtype == torch.float32
        else dict(rtol=2**-7, atol=1e-3, host_tol=1e-6)
    )
    for i, (B, P, n, k, C) in enumerate(INDEXED_SIZES):
        x = randn(B, P + n, C, seed=900 + i, dtype=dtype)
        kept, pruned = split_indices(B, n, k, seed=950 + i)
        y, hosts = _squeeze_tokens_with_hosts(x, kept, pruned, P)
        try:
            check_indexed(x, kept, pruned, P, y, hosts, **tol)
        except AssertionError as err:
            raise AssertionError(f"B={B} P={P} n={n} k={k} C={C}: {err}") from err


@interp
@pytest.mark.parametrize("one_block", [True, False], ids=["one-pruned-block", "pruned-blocks"])
def test_interp_merge_other_tilings(one_block):
    # The interpreter runs each kernel's first config only; the other tilings of both merges
    # (several row tiles per program; pruned blocks of other sizes) must give the same rows.
    import triton

    from tokenreduce.ops import squeeze_triton as st

    B, P, n, k, C = 2, 1, 90, 40, 40
    x = randn(B, P + n, C, seed=41)
    kept, pruned = split_indices(B, n, k, seed=42)
    y, keys = st._squeeze_tokens_keys(x, kept, pruned, P)
    Nr, Np = k, n - k
    args = (x, x, kept, pruned, keys)
    sizes = (Nr, Np, C, P, *x.stride()[:2], *x.stride()[:2], *kept.stride(), *pruned.stride())
    for block_r, block_c, row_tiles in ((16, 32, 4), (8, 16, 2)):
        y2 = torch.empty_like(y)
        grid = (triton.cdiv(C, block_c), triton.cdiv(P + Nr, block_r * row_tiles), B)
        st._squeeze_fuse_kernel[grid](
            *args,
            y2,
            *sizes,
            *y2.stride()[:2],
            E=math.e,
            DOT_F32=True,
            HAS_IDX=True,
            ONE_P=one_block,
            BLOCK_R=block_r,
            BLOCK_P=st._block_p(Np) if one_block else 16,
            BLOCK_C=block_c,
            ROW_TILES=row_tiles,
        )
        torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)
    for block_r, block_c, block_p in ((16, 32, 16), (8, 16, 64)) if one_block else ((32, 64, 32),):
        y2 = torch.empty_like(y)
        st._squeeze_update_kernel[(triton.cdiv(C, block_c), B)](
            *args,
            y2,
            *sizes,
            *y2.stride()[:2],
            E=math.e,
            DOT_F32=True,
            HAS_IDX=True,
            BLOCK_R=block_r,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
        )
        torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_small_grid_tiling(monkeypatch, dtype):
    # Small batches take the host search's finer tiling (16-row pruned blocks, 32-row reserved
    # tiles). Off CUDA it never would: pretend the device has more SMs than any grid here.
    from tokenreduce.ops import squeeze_triton as st

    class Spy:  # counts the launches of the small-grid kernel
        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    monkeypatch.setattr(st, "_sm_count", lambda device: 10**9)
    spy = Spy(st._hosts_small)
    monkeypatch.setattr(st, "_hosts_small", spy)
    assert st._small_grid(1, 70, 40, st._block_p(40), torch.device("cpu"))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    # the last two: the fuse kernel's loop over pruned blocks (Np > 128), the update kernel (128 < Np < Nr)
    shapes = [(2, 70, 40, 40), (1, 33, 17, 24), (1, 137, 59, 48), (1, 100, 140, 20), (1, 150, 140, 20)]
    for i, (B, Nr, Np, C) in enumerate(shapes):
        r, p = randn(B, Nr, C, seed=60 + i, dtype=dtype), randn(B, Np, C, seed=70 + i, dtype=dtype)
        y, hosts = st._squeeze_with_hosts(r, p)
        check(r, p, y, hosts, host_tol=1e-6, **tol)
    for i, (B, P, n, k, C) in enumerate([(2, 1, 90, 50, 40), (1, 2, 60, 30, 20)]):
        x = randn(B, P + n, C, seed=80 + i, dtype=dtype)
        kept, pruned = split_indices(B, n, k, seed=90 + i)
        y, hosts = st._squeeze_tokens_with_hosts(x, kept, pruned, P)
        check_indexed(x, kept, pruned, P, y, hosts, host_tol=1e-6, **tol)
    assert spy.launches == len(shapes) + 2  # every host search above ran the small-grid tiling


@needs_triton
def test_small_grid_rule(monkeypatch):
    # The finer tiling exactly when the default one would launch fewer programs than there are SMs.
    from tokenreduce.ops import squeeze_triton as st

    monkeypatch.setattr(st, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # DeiT-S's first site at keep 0.7: 137 reserved (3 tiles of 64), 59 pruned (one block of 64).
    assert st._small_grid(1, 137, 59, st._block_p(59), cuda)
    assert st._small_grid(43, 137, 59, st._block_p(59), cuda)  # 129 programs
    assert not st._small_grid(44, 137, 59, st._block_p(59), cuda)  # 132
    assert not st._small_grid(256, 137, 59, st._block_p(59), cuda)
    monkeypatch.undo()
    assert not st._small_grid(1, 137, 59, st._block_p(59), torch.device("cpu"))  # no SMs to fill


@interp
def test_interp_indexed_strided_stream():
    from tokenreduce.ops.squeeze_triton import _squeeze_tokens_with_hosts

    x = randn(2, 30, 40, seed=31).transpose(1, 2)  # (2, 40, 30): channel stride 40
    kept, pruned = split_indices(2, 39, 25, seed=32)
    y, hosts = _squeeze_tokens_with_hosts(x, kept, pruned, 1)
    assert y.is_contiguous()
    check_indexed(x, kept, pruned, 1, y, hosts, rtol=1e-5, atol=1e-6, host_tol=1e-6)


def huge_pair(seed):
    """(reserved (2, 70, 24), pruned (2, 20, 24)) whose squared norms overflow float32: image 0
    scaled by 1e25 throughout; image 1 ordinary but for reserved rows 3 and 66 (1e30, in two
    tiles) and pruned rows 5, 6 (1e28), which point near rows 3 and 66."""
    r, p = randn(2, 70, 24, seed=seed), randn(2, 20, 24, seed=seed + 1)
    r[0] *= 1e25
    p[0] *= 1e25
    p[1, 5] = r[1, 3] + 0.3 * p[1, 5]
    p[1, 6] = r[1, 66] + 0.3 * p[1, 6]
    r[1, [3, 66]] *= 1e30
    p[1, [5, 6]] *= 1e28
    return r, p


def check_rows_relative(reserved, pruned, y, hosts, rtol):
    """Hosts where no near-tie makes them ambiguous equal float64's argmax, and every row of
    ``y`` is within ``rtol`` (relative, per row) of the formula with the kernel's hosts."""
    c = cosine64(reserved, pruned)  # (B, Np, Nr)
    top = c.topk(2, dim=-1).values
    clear = top[..., 0] - top[..., 1] > NEAR_TIE
    assert clear.float().mean() > 0.9
    assert torch.equal(hosts.long()[clear], c.argmax(-1)[clear]), "a huge-norm token chose another host"
    expected, _ = formula64(reserved, pruned, hosts)
    rel = (y.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert rel.max() < rtol, rel.max()


@interp  # numpy's warnings in the interpreter: the squared norms overflow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_interp_huge_norms_keep_every_host_in_range():
    """The kernels' documented limit (docs/kernels.md): fp32 squared norms above ~1.8e19 overflow
    and those cosines rank last, so hosts may differ from float64's, but every host is a valid
    index and both forms agree (the reference rescales and picks float64's host)."""
    from tokenreduce.ops.squeeze_triton import _squeeze_tokens_with_hosts, _squeeze_with_hosts

    r, p = huge_pair(seed=71)
    y, hosts = _squeeze_with_hosts(r, p)
    assert hosts.min() >= 0 and hosts.max() < r.shape[1]
    x = torch.cat([torch.ones(2, 1, 24), r, p], dim=1)  # (2, 1 + 90, 24)
    kept, pruned = torch.arange(70).expand(2, 70), torch.arange(70, 90).expand(2, 20)
    y2, hosts2 = _squeeze_tokens_with_hosts(x, kept, pruned, 1)
    assert torch.equal(hosts2, hosts) and torch.equal(y2[:, 1:], y) and torch.equal(y2[:, :1], x[:, :1])


@interp
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_interp_non_finite_token_stays_in_its_image(bad):
    # Image 1 of 3 holds a NaN / inf in one reserved and one pruned token: it may become NaN, but
    # every host is a valid index (nothing written outside the image) and images 0 and 2 equal
    # the float64 formula. Both merges: the fuse kernel, then the update kernel (128 < Np < Nr).
    from tokenreduce.ops.squeeze_triton import _squeeze_tokens_with_hosts, _squeeze_with_hosts

    for B, Nr, Np, C in ((3, 17, 33, 24), (3, 150, 140, 20)):
        r, p = randn(B, Nr, C, seed=61), randn(B, Np, C, seed=62)
        r[1, 4, 3] = bad
        p[1, 2, 0] = bad
        y, hosts = _squeeze_with_hosts(r, p)
        assert hosts.min() >= 0 and hosts.max() < Nr
        good = [0, 2]
        check(r[good], p[good], y[good], hosts[good], rtol=1e-5, atol=1e-6, host_tol=1e-6)
        x = torch.cat([r, p], dim=1)  # the indexed form, no prefix
        kept, pruned = torch.arange(Nr).expand(B, Nr), torch.arange(Nr, Nr + Np).expand(B, Np)
        y2, hosts2 = _squeeze_tokens_with_hosts(x, kept, pruned, 0)
        assert torch.equal(hosts2[good], hosts[good]) and torch.equal(y2[good], y[good])
        assert hosts2.min() >= 0 and hosts2.max() < Nr


# ------------------------------------------------------------------ plain tests (any machine)
@pytest.mark.skipif(INTERPRETING, reason="checks behaviour outside the interpreter")
def test_cpu_tensors_need_cuda_or_the_interpreter():
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    r, p = randn(1, 3, 4, seed=0), randn(1, 2, 4, seed=1)
    if HAVE_TRITON:
        with pytest.raises(ValueError, match="must be on a CUDA device.*TRITON_INTERPRET=1"):
            squeeze_triton(r, p)
    else:
        with pytest.raises(RuntimeError, match="triton is not installed"):
            squeeze_triton(r, p)


def test_argument_errors_name_the_argument():
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    r = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"squeeze_triton: `pruned` must have 3 dims \(B, Np, C\), got shape \(2, 4\)"):
        squeeze_triton(r, torch.zeros(2, 4))
    with pytest.raises(
        TypeError,
        match="squeeze_triton: `reserved` must have dtype float32, bfloat16, float16, got "
        "torch.float64; other dtypes are served by the reference",
    ):
        squeeze_triton(r.double(), torch.zeros(2, 1, 4, dtype=torch.float64))
    with pytest.raises(
        TypeError, match="`reserved` and `pruned` must have the same dtype, got torch.float32 and torch.bfloat16"
    ):
        squeeze_triton(r, torch.zeros(2, 1, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="`reserved` and `pruned` must have the same channels, got 4 and 5"):
        squeeze_triton(r, torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match="`reserved` and `pruned` must have the same batch size, got 2 and 3"):
        squeeze_triton(r, torch.zeros(3, 1, 4))
    with pytest.raises(TypeError, match="`reserved` must be a torch.Tensor"):
        squeeze_triton([[1.0]], r)


def test_indexed_argument_errors_name_the_argument():
    from tokenreduce.ops.squeeze_triton import squeeze_tokens_triton

    x = torch.zeros(2, 5, 4)
    kept, pruned = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(TypeError, match="squeeze_tokens_triton: `x` must have dtype float32, bfloat16, float16"):
        squeeze_tokens_triton(x.double(), kept, pruned, 1)
    with pytest.raises(TypeError, match="`pruned_idx` must be an int64 index tensor, got dtype torch.int32"):
        squeeze_tokens_triton(x, kept, pruned.int(), 1)
    with pytest.raises(ValueError, match=r"`kept_idx` must have 2 dims \(B, k\), got shape \(2, 3, 1\)"):
        squeeze_tokens_triton(x, kept[..., None], pruned, 1)
    with pytest.raises(ValueError, match="`x` and `pruned_idx` must have the same batch size, got 2 and 1"):
        squeeze_tokens_triton(x, kept, pruned[:1], 1)
    with pytest.raises(ValueError, match=r"`num_prefix` must be an int in \[0, 5\] \(x of shape \(2, 5, 4\)\), got 6"):
        squeeze_tokens_triton(x, kept, pruned, 6)


def test_identity_cases_copy_reserved():
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    r = randn(2, 3, 4, seed=3)
    y = squeeze_triton(r, torch.zeros(2, 0, 4))  # Np == 0: no kernel launch, any device
    assert torch.equal(y, r) and y.data_ptr() != r.data_ptr()
    assert squeeze_triton(torch.zeros(2, 0, 4), r).shape == (2, 0, 4)


@pytest.fixture
def restore_kernels():
    """Leaves the CUDA kernel registry as the test found it."""
    from tokenreduce.ops import _kernels

    saved = dict(_kernels._DEVICE_KERNELS.get("cuda", {}))
    yield
    _kernels._DEVICE_KERNELS["cuda"] = saved


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="checks the registry of the main process")
def test_enable_triton_kernels_switches_the_registry(restore_kernels):
    from tokenreduce.ops import (
        _kernels,
        enable_triton_kernels,
        register_device_kernels,
        select_triton,
        squeeze_triton,
        triton_kernels_enabled,
    )

    ours = {**squeeze_triton.CUDA_KERNELS, **select_triton.CUDA_KERNELS}
    assert sorted(ours) == sorted(_kernels.OPERATORS)
    for _ in range(2):  # idempotent
        enable_triton_kernels(True)
        assert triton_kernels_enabled()
        assert all(_kernels.device_kernel("cuda", name) is fn for name, fn in ours.items())
    for _ in range(2):
        enable_triton_kernels(False)
        assert not triton_kernels_enabled()
        assert all(_kernels.device_kernel("cuda", name) is None for name in ours)
    mine = lambda scores, k: scores  # noqa: E731  a user's kernel survives the switch
    register_device_kernels("cuda", split_order=mine)
    enable_triton_kernels(False)
    assert _kernels.device_kernel("cuda", "split_order") is mine
    enable_triton_kernels()  # True re-registers over it
    assert _kernels.device_kernel("cuda", "split_order") is ours["split_order"]
    with pytest.raises(TypeError, match="enable_triton_kernels: `enabled` must be a bool, got str"):
        enable_triton_kernels("no")


@pytest.mark.skipif(INTERPRETING, reason="runs fresh processes of its own")
def test_environment_default():
    # TOKENREDUCE_TRITON is read at import: child processes see the default of a fresh import.
    code = "import tokenreduce.ops as o; print(o.triton_kernels_enabled())"
    for value, expected in (("0", "False"), ("1", str(HAVE_CUDA and HAVE_TRITON)), ("off", None)):
        env = dict(os.environ, TOKENREDUCE_TRITON=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        if expected is None:
            assert "TOKENREDUCE_TRITON must be '0' (the reference kernels everywhere) or '1'" in out.stderr
        else:
            assert out.returncode == 0, out.stderr[-2000:]
            assert out.stdout.strip() == expected


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the JIT functions")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("has_idx", [False, True], ids=["plain", "indexed"])
def test_kernels_compile_for_hopper(dtype, has_idx):
    """Ahead-of-time compile the three kernels to sm_90 (PTX + ptxas), no GPU needed: catches what the
    interpreter cannot (tl.dot shape and dtype rules, MMA lowering of tf32x3 and 16-bit tiles)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from tokenreduce.ops import squeeze_triton as st

    pointers = {
        "r_ptr": f"*{dtype}",
        "p_ptr": f"*{dtype}",
        "y_ptr": f"*{dtype}",
        "ridx_ptr": "*i64",
        "pidx_ptr": "*i64",
        "key_ptr": "*i64",
    }
    precision = "tf32x3" if dtype == "fp32" else "tf32"
    common = dict(HAS_IDX=has_idx, BLOCK_P=64, DOT_F32=False)
    kernels = [  # the default (first) config of each autotuned kernel, and the host search's small-grid one
        (st._squeeze_hosts_kernel, dict(EPS=1e-6, PRECISION=precision, **common, **st._hosts_tuned.configs[0].kwargs)),
        (  # the small-grid tiling brings its own BLOCK_P
            st._squeeze_hosts_kernel,
            dict(EPS=1e-6, PRECISION=precision, **{**common, **st._hosts_small.configs[0].kwargs}),
        ),
        (st._squeeze_fuse_kernel, dict(E=math.e, ONE_P=True, **common, **st._fuse_tuned.configs[0].kwargs)),
        (st._squeeze_fuse_kernel, dict(E=math.e, ONE_P=False, **common, **st._fuse_tuned.configs[0].kwargs)),
        (st._squeeze_update_kernel, dict(E=math.e, **common, **st._update_tuned.configs[0].kwargs)),
    ]
    for kernel, constexprs in kernels:
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
        try:
            src = ASTSource(
                fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
            )
        except TypeError as err:  # triton < 3.3 spells the constants differently
            pytest.skip(f"this triton's ahead-of-time compile API differs: {err}")
        try:
            compiled = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": True}
            )
        except FileNotFoundError as err:  # no ptxas shipped with this triton
            pytest.skip(f"cannot compile for sm_90 here: {err}")
        assert "mma" in compiled.asm["ptx"], f"{kernel.__name__} ({dtype}) does not use tensor cores"


# --------------------------------------------------------------------------------- CUDA
@pytest.fixture(params=["default-tiling", "small-grid-tiling"])
def tiling(request, monkeypatch):
    """Both host-search tilings on every shape: the rule would pick the small-grid one for most
    of these small batches, so each test runs once with it forced off and once forced on."""
    from tokenreduce.ops import squeeze_triton as st

    sms = 0 if request.param == "default-tiling" else 10**9
    monkeypatch.setattr(st, "_sm_count", lambda device: sms)
    return request.param


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "size", [(8, 137, 59, 384), (3, 17, 70, 100), (4, 98, 98, 768), (2, 5, 1, 3), (3, 300, 200, 96), (3, 150, 200, 96)]
)  # 128 < Np: the update kernel, the fuse's loop
def test_cuda_matches_oracle(dtype, size, tiling):
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts, squeeze_triton

    B, Nr, Np, C = size
    r = randn(B, Nr, C, seed=500, dtype=dtype, device="cuda")
    p = randn(B, Np, C, seed=501, dtype=dtype, device="cuda")
    y, hosts = _squeeze_with_hosts(r, p)
    if dtype == torch.float32:  # tf32x3 products: close to, not exactly, fp32
        check(r, p, y, hosts, rtol=1e-5, atol=1e-5, host_tol=1e-5)
    else:
        check(r, p, y, hosts, rtol=2**-7, atol=1e-3, host_tol=1e-5)
    assert torch.equal(y, squeeze_triton(r, p)), "kernel is not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
def test_cuda_huge_norms_and_non_finite_tokens(tiling):
    # The interpreter tests' cases on the compiled kernels: overflowing norms keep every host in
    # range; a NaN / inf token leaves the other images exact and every host in range (both merges).
    from tokenreduce.ops.squeeze_triton import _squeeze_with_hosts

    r, p = huge_pair(seed=71)
    _, hosts = _squeeze_with_hosts(r.cuda(), p.cuda())
    assert hosts.min() >= 0 and hosts.max() < r.shape[1]
    for bad in (float("nan"), float("inf")):
        for B, Nr, Np, C in ((3, 17, 33, 24), (3, 150, 140, 20)):
            r, p = randn(B, Nr, C, seed=61), randn(B, Np, C, seed=62)
            r[1, 4, 3] = bad
            p[1, 2, 0] = bad
            y, hosts = _squeeze_with_hosts(r.cuda(), p.cuda())
            assert hosts.min() >= 0 and hosts.max() < Nr
            good = [0, 2]
            check(r[good], p[good], y.cpu()[good], hosts.cpu()[good], rtol=1e-5, atol=1e-5, host_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_agrees_with_project_reference(dtype, tiling):
    ref = pytest.importorskip("tokenreduce.ops.squeeze", reason="ops/squeeze.py not written yet")
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    r = randn(16, 137, 384, seed=600, dtype=dtype, device="cuda")
    p = randn(16, 59, 384, seed=601, dtype=dtype, device="cuda")
    y = squeeze_triton(r, p).float().cpu()
    # The reference on the same (possibly bf16) values, upcast: only accumulation order differs.
    expected = ref.squeeze_reference(r.float(), p.float()).cpu()
    # A host flip at a near-tie moves whole rows; compare the rows no near-tie can touch.
    settled = settled_rows(r.cpu(), p.cpu())
    assert settled.float().mean() > 0.99
    row_rel = (y - expected).norm(dim=-1) / expected.norm(dim=-1)  # (B, Nr)
    assert row_rel[settled].max() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
def test_cuda_op_dispatches_to_triton_and_passes_opcheck():
    pytest.importorskip("tokenreduce.ops.squeeze", reason="ops/squeeze.py not written yet")
    from tokenreduce.ops import enable_triton_kernels
    from tokenreduce.ops.squeeze_triton import squeeze_triton

    enable_triton_kernels(True)
    op = torch.ops.tokenreduce.squeeze.default
    r = randn(4, 37, 96, seed=700, device="cuda")
    p = randn(4, 21, 96, seed=701, device="cuda")
    assert torch.equal(op(r, p), squeeze_triton(r, p))  # deterministic kernel: bit for bit
    torch.library.opcheck(op, (r, p))
    torch.library.opcheck(op, (r.clone().requires_grad_(), p.clone().requires_grad_()))
    torch.library.opcheck(op, (r.bfloat16(), p.bfloat16()))
    torch.library.opcheck(op, (r, p[:, :0]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(8, 1, 196, 137, 384), (4, 0, 784, 549, 64), (3, 2, 70, 33, 100)])
def test_cuda_indexed_matches_oracle(dtype, size, tiling):
    from tokenreduce.ops.squeeze_triton import _squeeze_tokens_with_hosts, squeeze_tokens_triton

    B, P, n, k, C = size
    x = randn(B, P + n, C, seed=510, dtype=dtype, device="cuda")
    kept, pruned = (t.cuda() for t in split_indices(B, n, k, seed=511))
    y, hosts = _squeeze_tokens_with_hosts(x, kept, pruned, P)
    if dtype == torch.float32:
        check_indexed(x, kept, pruned, P, y, hosts, rtol=1e-5, atol=1e-5, host_tol=1e-5)
    else:
        check_indexed(x, kept, pruned, P, y, hosts, rtol=2**-7, atol=1e-3, host_tol=1e-5)
    assert torch.equal(y, squeeze_tokens_triton(x, kept, pruned, P)), "kernel is not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
def test_cuda_squeeze_tokens_op_dispatches_to_triton_and_passes_opcheck():
    from tokenreduce.ops import enable_triton_kernels
    from tokenreduce.ops.squeeze import squeeze_tokens_reference
    from tokenreduce.ops.squeeze_triton import squeeze_tokens_triton

    enable_triton_kernels(True)
    op = torch.ops.tokenreduce.squeeze_tokens.default
    x = randn(4, 1 + 58, 96, seed=710, device="cuda")
    kept, pruned = (t.cuda() for t in split_indices(4, 58, 37, seed=711))
    assert torch.equal(op(x, kept, pruned, 1), squeeze_tokens_triton(x, kept, pruned, 1))
    settled = settled_rows(*(x[:, 1:].cpu().gather(1, i.cpu()[..., None].expand(-1, -1, 96)) for i in (kept, pruned)))
    torch.testing.assert_close(
        op(x, kept, pruned, 1)[:, 1:][settled.cuda()],
        squeeze_tokens_reference(x, kept, pruned, 1)[:, 1:][settled.cuda()],
        rtol=1e-5,
        atol=1e-5,
    )
    torch.library.opcheck(op, (x, kept, pruned, 1))
    torch.library.opcheck(op, (x.clone().requires_grad_(), kept, pruned, 1))
    torch.library.opcheck(op, (x.bfloat16(), kept, pruned, 1))
    torch.library.opcheck(op, (x, kept.contiguous(), pruned[:, :0].contiguous(), 0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op: torch >= 2.6")
@pytest.mark.parametrize("n, k, merge", [(58, 37, "_squeeze_fuse_kernel"), (400, 250, "_squeeze_update_kernel")])
def test_compiled_site_launches_the_kernels_from_the_graph(n, k, merge):
    # With triton_op, Inductor traces into the operator: the compiled wrapper launches both Triton
    # kernels itself and never calls the operator's Python (its host cost made small models
    # launch-bound).  The result is the eager operator's (Inductor autotunes the block sizes
    # itself, so the channel chunking of the cosines, and their last bits, may differ).
    from torch._inductor.utils import run_and_get_code

    from tokenreduce.ops import enable_triton_kernels
    from tokenreduce.ops.squeeze import squeeze_tokens

    enable_triton_kernels(True)
    x = randn(4, 1 + n, 96, seed=720, device="cuda")
    kept, pruned = (t.cuda() for t in split_indices(4, n, k, seed=721))

    def site(x):
        return squeeze_tokens(x * 2.0, kept, pruned, 1) + 1.0  # neighbours for Inductor to fuse

    torch._dynamo.reset()
    y, codes = run_and_get_code(torch.compile(site, fullgraph=True), x)
    code = "\n".join(codes)
    assert "_squeeze_hosts_kernel" in code and merge in code
    assert "tokenreduce.squeeze_tokens" not in code, "the compiled graph calls the opaque operator"
    # The input is an unmaterialised product: Inductor must write it once, not once per kernel
    # argument (it did: r and p of both launches, four copies).
    assert code.count(f"empty_strided_cuda((4, {1 + n}, 96)") == 1, "the site's input is written more than once"
    torch.testing.assert_close(y, squeeze_tokens(x * 2.0, kept, pruned, 1) + 1.0, rtol=1e-5, atol=1e-5)


@interp
def test_interp_zz_as_the_op_kernel_passes_opcheck():
    # Installs the kernel for "cpu" in the interpreter child, so it runs last (file order) and
    # the child process ends with it; the parent process never sees this registration.
    squeeze = pytest.importorskip("tokenreduce.ops.squeeze", reason="ops/squeeze.py not written yet")
    from tokenreduce.ops.squeeze_triton import _cuda_kernel, squeeze_triton

    squeeze.squeeze_op.register_kernel("cpu", _cuda_kernel)
    op = torch.ops.tokenreduce.squeeze.default
    r, p = randn(2, 9, 20, seed=800), randn(2, 6, 20, seed=801)
    assert torch.equal(op(r, p), squeeze_triton(r, p))
    assert torch.equal(squeeze.squeeze(r, p), squeeze_triton(r, p))
    # With inputs requiring grad, opcheck runs all its checks (schema, fake, autograd, aot).
    torch.library.opcheck(op, (r.clone().requires_grad_(), p.clone().requires_grad_()))
    torch.library.opcheck(op, (r, p[:, :0]))
    # fp64 is not a kernel dtype: the registered kernel falls back to the reference.
    torch.testing.assert_close(
        _cuda_kernel(r.double(), p.double()), squeeze.squeeze_reference(r.double(), p.double()), rtol=0, atol=0
    )
