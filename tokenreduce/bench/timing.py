"""Timers: CUDA events on a GPU, ``time.perf_counter`` on a CPU, several functions in turns.

round_robin(fns, device, iters, warmup, repeats)  ms per call of each fn, one entry per repeat
host_ms(fn)                                       ms to launch one call onto an idle GPU
graphed(fn)                                       fn captured in a CUDA graph (GPU time only)
kernel_times(fn, iters)                           each kernel's GPU us per call (torch.profiler)
"""

from __future__ import annotations

import re
import time
from typing import Callable, Mapping

import torch

__all__ = [
    "REDUCTION_KERNELS",
    "graphed",
    "host_ms",
    "kernel_times",
    "reduction_us",
    "round_robin",
    "time_calls",
    "top_kernels",
]

# Kernels that belong to choosing and merging tokens. Not plain "squeeze": Inductor names the
# kernels that consume the operator's output after it too. FillFunctor: the host keys' fill.
REDUCTION_KERNELS = (
    r"topk|sort|gather|scatter|index|^_squeeze_|^_split_order|squeeze_reference|argmax|arg_max"
    r"|FillFunctor"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device | str, iters: int) -> float:
    """ms per call of ``iters`` back-to-back calls: CUDA events on a GPU, else the wall clock."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def round_robin(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    iters: int = 30,
    warmup: int = 10,
    repeats: int = 5,
) -> dict[str, list[float]]:
    """ms per call of each of ``fns``, one entry per repeat, the functions timed in turns.

    ``warmup`` untimed calls of each come first. Each repeat then times every function
    (``iters`` calls) before the next repeat starts, so a burst of load from other processes
    falls on all of them alike instead of on whichever was running. Report the median; the
    spread of the list shows the noise. With one function this is the plain protocol timer.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            per_call[name].append(time_calls(fn, device, iters))
    return per_call


def host_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median host time (ms) to launch one call of ``fn`` onto an idle GPU. A model whose host time
    is close to its time per call is launch-bound: its throughput measures Python, not kernels."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(out)[len(out) // 2]


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after three warm-up calls (autotuning, compilation); returns
    the replay, so timing it measures GPU time without Python's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_times(fn: Callable[[], object], iters: int = 5) -> tuple[dict[str, float], object]:
    """GPU us per call of each kernel ``fn`` launches (summed over its launches, largest first),
    from ``torch.profiler`` over ``iters`` calls, and the profiler. Empty without CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time_total / iters
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1])), prof


def top_kernels(kernels: Mapping[str, float], n: int = 15, width: int = 90) -> dict[str, float]:
    """The ``n`` largest of ``kernels`` (name -> us, largest first) with names cut to ``width``
    characters, for a JSON record; kernels whose cut names coincide are summed."""
    out: dict[str, float] = {}
    for name, us in list(kernels.items())[:n]:
        out[name[:width]] = round(out.get(name[:width], 0.0) + us, 1)
    return out


def reduction_us(kernels: Mapping[str, float]) -> float:
    """The part of ``kernels`` (name -> us) spent choosing and merging tokens."""
    pattern = re.compile(REDUCTION_KERNELS, re.IGNORECASE)
    return sum(v for k, v in kernels.items() if pattern.search(k))
