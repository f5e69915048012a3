"""Helpers shared by the benchmark scripts (benchmarks/gpu.py, benchmarks/cpu.py).

Protocol: /work/shared/docs/benchmarks.md.  Timing lives here and in the scripts, never in tests.

    gflops(model, x)                     multiply-adds of one image, FlopCounterMode / 2e9
    time_cuda(fn, iters, warmup, repeats) median ms per call, CUDA events
    time_cpu(fn, iters, warmup, repeats)  median ms per call, time.perf_counter
    time_cpu_round_robin(fns, ...)       ms per call of several fns timed in turns, per repeat
    limit_counts(n, rho, sites)          the DynamicViT keep counts int(n * rho ** s)
    LimitModel / build_limit(...)        the "limit": unmodified blocks on the reduced counts
    environment()                        device and library versions for the report
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "LimitModel",
    "build_limit",
    "environment",
    "gflops",
    "limit_counts",
    "time_cpu",
    "time_cpu_round_robin",
    "time_cuda",
]


def gflops(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds (in G, i.e. FLOPs / 2e9) of one eval forward of ``model`` on ``x[:1]``:
    tokenreduce's counter, which adds the formulas torch lacks (CPU flash attention before torch
    2.6, the ``tokenreduce::squeeze`` custom op)."""
    from tokenreduce.flops import gflops as count

    return count(model, x)


def time_cuda(fn: Callable[[], object], iters: int = 30, warmup: int = 10, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean ms per call of ``fn``, CUDA events around ``iters`` calls.

    ``warmup`` calls run first (compilation, CUDA-graph recording, allocator warm-up).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / iters)
    return statistics.median(per_call)


def time_cpu(fn: Callable[[], object], iters: int = 30, warmup: int = 10, repeats: int = 5) -> float:
    """CPU counterpart of :func:`time_cuda` (``time.perf_counter``); median ms per call."""
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(per_call)


def time_cpu_round_robin(
    fns: Mapping[str, Callable[[], object]], iters: int = 2, warmup: int = 1, repeats: int = 5
) -> dict[str, list[float]]:
    """ms per call of each of ``fns``, one entry per repeat, the functions timed in turns.

    Each repeat times every function (``iters`` calls each) before the next repeat starts, so a
    burst of load from other processes on a shared CPU falls on all variants alike instead of on
    whichever happened to be running.  ``warmup`` untimed rounds come first.  Take the median for
    the report; the spread of the list shows the noise.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call[name].append((time.perf_counter() - t0) * 1e3 / iters)
    return per_call


def limit_counts(n: int, rho: float, num_sites: int) -> list[int]:
    """Patch tokens kept after each site, DynamicViT counting: ``int(n * rho ** s)``, s = 1, 2, ...

    DeiT-S (n = 196) at rho 0.7: [137, 96, 67].  eTPS keeps ``ceil(rho * n_in)`` per site
    (138 / 97 / 68) and EViT one fused token more, so their exact limit is ~1 % costlier.
    """
    return [int(n * rho**s) for s in range(1, num_sites + 1)]


class LimitModel(nn.Module):
    """The cost floor of a token-reduction plan: timm's ViT blocks, unmodified, on reduced tokens.

    Before block ``sites[s]`` the sequence is cut to ``P + keep[s]`` tokens (``x[:, :P + k]``):
    choosing and merging tokens cost nothing.  The cut happens *before* the site's block, so that
    block's attention also runs on the reduced count.  DynamicViT/dTPS reduce there too; eTPS/EViT
    reduce after the site block's attention, so their exact limit is slightly costlier (three
    attentions on the longer sequence).

    Shares ``vit``'s parameters; holds no state of its own.
    """

    def __init__(self, vit: nn.Module, sites: Sequence[int], keep: Sequence[int]) -> None:
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"):
            if not hasattr(vit, attr):
                raise TypeError(
                    f"LimitModel: vit must be a timm VisionTransformer-like model with `{attr}`; "
                    f"got {type(vit).__name__}"
                )
        if len(sites) != len(keep):
            raise ValueError(f"LimitModel: sites {list(sites)} and keep {list(keep)} differ in length")
        if list(sites) != sorted(set(sites)) or not all(0 <= s < len(vit.blocks) for s in sites):
            raise ValueError(
                f"LimitModel: sites must be increasing block indices in [0, {len(vit.blocks)}); got {list(sites)}"
            )
        self.vit = vit
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.cut = dict(zip((int(s) for s in sites), (int(k) for k in keep)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for i, blk in enumerate(vit.blocks):
            k = self.cut.get(i)
            if k is not None:
                x = x[:, : self.num_prefix + k]  # (B, P + k, C)
            x = blk(x)
        x = vit.norm(x)
        return vit.forward_head(x)


def build_limit(vit: nn.Module, sites: Sequence[int], rho: float, image_size: int = 224) -> LimitModel:
    """``LimitModel`` for keep ratio ``rho`` at ``sites`` with DynamicViT counting (see limit_counts).

    The patch count comes from ``vit.patch_embed`` (its grid at ``image_size``), not a constant.
    Hybrids (PVT, CvT) have no single token sequence to cut: TypeError.
    """
    pe = getattr(vit, "patch_embed", None)
    if pe is None or not hasattr(vit, "blocks"):
        raise TypeError(
            f"build_limit: the limit is defined for plain ViTs (patch_embed + blocks, timm's "
            f"VisionTransformer); {type(vit).__name__} has no single token sequence to cut"
        )
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        patch = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,) * 2
        grid = (image_size // patch[0], image_size // patch[1])
    n = int(grid[0] * grid[1])
    return LimitModel(vit, sites, limit_counts(n, rho, len(sites)))


def environment(device: torch.device) -> dict:
    """Device name and library versions for the report."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_type": device.type,
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


class TruncateSite(nn.Module):
    """Zero-cost stand-in for a ``ReductionSite``: keep the first ``P + k`` tokens (plus the
    reducer's appended token), with the site's own placement and count rule. No scoring, no
    gather, no merge: ``x[:, :P + k]`` is a view."""

    def __init__(self, site: nn.Module) -> None:
        super().__init__()
        self.num_prefix, self.ratio, self.counts, self.extra = site.num_prefix, site.ratio, site.counts, site.extra

    def forward(self, x, state, q=None, k=None, scale=None, probs=None):
        from tokenreduce.plan import keep_count
        from tokenreduce.site import TokenState

        n = x.shape[1] - self.num_prefix
        n_ref = n if state is None else state.n_ref
        keep = keep_count(self.counts, self.ratio, n, n_ref)
        return x[:, : self.num_prefix + keep + self.extra], TokenState(pos=None, keep=None, n_ref=n_ref)


def limit_of(reduced: nn.Module) -> nn.Module:
    """The exact limit of a reduced model from ``tokenreduce.apply``: the same graph, sites,
    placement and token counts, with every site replaced by :class:`TruncateSite`. Mutates and
    returns ``reduced`` (pass a fresh one)."""
    sites = reduced.get_submodule("reduce_sites")
    for i in range(len(sites)):
        sites[i] = TruncateSite(sites[i])
    return reduced


def limit_family(method: str) -> str:
    """Methods whose limits coincide (same placement and counts) share one limit variant."""
    return {"dynamicvit": "dtps"}.get(method, method)
