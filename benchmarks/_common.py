"""Helpers shared by the benchmark scripts (benchmarks/gpu.py, benchmarks/cpu.py).

Protocol: /work/shared/docs/benchmarks.md.  Timing lives here and in the scripts, never in tests.

    gflops(model, x)                     multiply-adds of one image, FlopCounterMode / 2e9
    time_cuda(fn, iters, warmup, repeats) median ms per call, CUDA events
    time_cpu(fn, iters, warmup, repeats)  median ms per call, time.perf_counter
    time_cpu_round_robin(fns, ...)       ms per call of several fns timed in turns, per repeat
    limit_of(reduced) / limit_family(m)  the exact "limit" of a reduced model: its own plan, free sites
    environment()                        device and library versions for the report
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "environment",
    "gflops",
    "limit_family",
    "limit_of",
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
