"""Dense, limit and reduced models of one model measured side by side, in one process.

For each ``(batch, mode)`` of the protocol, in order:

    eager     every variant timed in turns (:func:`~tokenreduce.bench.timing.round_robin`)
    compiled  each variant compiled (``torch.compile(mode=...)``; one call compiles, its graph and
              graph-break counts are recorded), then timed: in turns on a CPU, where load from
              other processes must fall on all of them alike; one at a time on a GPU, each
              compiled model released before the next (``torch._dynamo.reset()``)

On CUDA each timing also records peak memory, the host time to launch one call and, with
``Protocol.kernels``, the kernel-time sum, the part of it that chooses and merges tokens and
the top kernels. All timings run under ``torch.no_grad()`` and the protocol's autocast.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .env import environment, load_average
from .protocol import GRAPHED_MODES, Protocol, Result, Row, Timing
from .timing import host_ms, kernel_times, reduction_us, round_robin, top_kernels
from .variants import build_variants, short_error

__all__ = ["compile_variants", "measure", "measure_variants"]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
_FIRST_GUESS_COMPILE_S = 45.0  # until a compile of this mode has been timed


def _autocast(protocol: Protocol, device: torch.device):
    if protocol.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if protocol.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _peak_mib(m: nn.Module, fn: Callable[[], object], x: torch.Tensor, device: torch.device) -> float:
    """The variant's own peak: parameters, buffers and input plus the largest extra allocation
    of one call (other variants held in memory do not count)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    own = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    return (extra + own + x.numel() * x.element_size()) / 2**20


def _extras(
    timing: Timing, m: nn.Module, fn: Callable[[], object], x: torch.Tensor, protocol: Protocol, device: torch.device
) -> None:
    """CUDA only: peak memory (not under CUDA graphs, whose replays allocate nothing: their
    memory pool was taken at capture), host launch time and (``kernels``) kernel times."""
    if device.type != "cuda":
        return
    if timing.mode not in GRAPHED_MODES:
        timing.peak_mib = _peak_mib(m, fn, x, device)
    timing.host_ms = host_ms(fn)
    if protocol.kernels:
        kernels, _ = kernel_times(fn, 5)
        timing.kernel_us = sum(kernels.values())
        timing.reduction_us = reduction_us(kernels)
        timing.top_kernels = top_kernels(kernels)


def _compile(m: nn.Module, mode: str, x: torch.Tensor, ctx) -> tuple[Callable[[], object], Timing]:
    """Compile ``m`` with one call; the call's graph and graph-break counts go into the Timing."""
    from torch._dynamo.utils import counters

    counters.clear()
    t0 = time.perf_counter()
    cm = torch.compile(m, mode=None if mode == "default" else mode)
    with ctx():
        cm(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    timing = Timing(
        batch=x.shape[0],
        mode=mode,
        compile_s=time.perf_counter() - t0,
        graphs=int(counters["stats"]["unique_graphs"]),
        graph_breaks=int(sum(counters["graph_break"].values())),
    )
    return (lambda: cm(x)), timing


def _cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_variants(
    modules: dict[str, nn.Module], rows: list[Row], protocol: Protocol, progress: Progress | None = None
) -> None:
    """Take every timing of ``protocol`` for ``modules`` (variant name -> module on the protocol's
    device) and append it to the matching row of ``rows`` (in place)."""
    say = progress or log.info
    device = torch.device(protocol.device)
    by_name = {r.variant: r for r in rows}
    t_start = time.perf_counter()
    slowest: dict[str, float] = {}
    for name, m in modules.items():
        if by_name[name].gflops is None:
            from tokenreduce.flops import gflops

            x1 = torch.randn(1, 3, protocol.img_size, protocol.img_size, device=device)
            by_name[name].gflops = gflops(m, x1)

    def ctx():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(_autocast(protocol, device))
        return stack

    for batch, mode in protocol.timings:
        x = torch.randn(batch, 3, protocol.img_size, protocol.img_size, device=device)
        p = protocol
        if mode == "eager":
            say(
                f"batch {batch}, eager: {len(modules)} variant(s) in turns, {p.warmup} warm-up + "
                f"{p.repeats} x {p.iters} call(s) each"
            )
            fns = {name: (lambda m=m: m(x)) for name, m in modules.items()}
            with ctx():
                per_call = round_robin(fns, device, p.iters, p.warmup, p.repeats)
                for name, ms in per_call.items():
                    timing = Timing(batch=batch, mode=mode, ms=ms)
                    _extras(timing, modules[name], fns[name], x, p, device)
                    by_name[name].timings.append(timing)
            continue
        compiled: dict[str, Callable[[], object]] = {}
        for i, (name, m) in enumerate(modules.items()):
            need = slowest.get(mode, _FIRST_GUESS_COMPILE_S)
            used = time.perf_counter() - t_start
            if p.budget_s is not None and used + need > p.budget_s:
                note = f"skipped: time budget ({p.budget_s:g} s, {used:.0f} s used, ~{need:.0f} s needed)"
                by_name[name].timings.append(Timing(batch=batch, mode=mode, note=note))
                say(f"batch {batch}, {mode}: {name} {note}")
                continue
            say(f"batch {batch}, torch.compile(mode={mode!r}): compiling {name} ({i + 1}/{len(modules)})")
            t0 = time.perf_counter()
            try:
                fn, timing = _compile(m, mode, x, ctx)
            except Exception as err:  # noqa: BLE001 - recorded in the row; the other variants go on
                by_name[name].timings.append(Timing(batch=batch, mode=mode, note=f"error: {short_error(err)}"))
                say(f"    {name}: compile failed: {short_error(err)}")
                _cleanup(device)
                continue
            say(f"    compiled in {timing.compile_s:.0f} s: {timing.graphs} graph(s), {timing.graph_breaks} break(s)")
            by_name[name].timings.append(timing)
            if device.type == "cuda":  # one at a time: time it now, then release it
                with ctx():
                    timing.ms = round_robin({name: fn}, device, p.iters, p.warmup, p.repeats)[name]
                    _extras(timing, m, fn, x, p, device)
                say(f"    {name}: {timing.median_ms:.3f} ms per call")
                fn = None
                _cleanup(device)
            else:
                compiled[name] = fn
            slowest[mode] = max(slowest.get(mode, 0.0), time.perf_counter() - t0)
        if compiled:
            say(f"batch {batch}, {mode}: timing {len(compiled)} compiled variant(s) in turns")
            with ctx():
                per_call = round_robin(compiled, device, p.iters, p.warmup, p.repeats)
            for name, ms in per_call.items():
                by_name[name].timing(batch, mode).ms = ms
            compiled.clear()
            _cleanup(device)


def compile_variants(modules: dict[str, nn.Module], protocol: Protocol, progress: Progress | None = None) -> dict:
    """Compile every module for every compiled ``(batch, mode)`` of ``protocol`` with one call
    each, and time nothing: run in other processes before a measurement, it fills Inductor's
    on-disk caches (FX graphs, Triton kernels), so the measuring process compiles from them.
    Returns variant name -> seconds per compile, or the error's text."""
    say = progress or log.info
    device = torch.device(protocol.device)

    def ctx():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(_autocast(protocol, device))
        return stack

    done: dict[str, list] = {name: [] for name in modules}
    for batch, mode in protocol.timings:
        if mode == "eager":
            continue
        x = torch.randn(batch, 3, protocol.img_size, protocol.img_size, device=device)
        for name, m in modules.items():
            try:
                _, timing = _compile(m, mode, x, ctx)
                done[name].append(round(timing.compile_s, 1))
                say(f"batch {batch}, {mode}: compiled {name} in {timing.compile_s:.0f} s")
            except Exception as err:  # noqa: BLE001 - the measuring process records it
                done[name].append(short_error(err))
                say(f"batch {batch}, {mode}: {name}: compile failed: {short_error(err)}")
            _cleanup(device)
    return done


def measure(
    model_name: str,
    protocol: Protocol,
    *,
    dense: nn.Module | None = None,
    reduced: nn.Module | None = None,
    methods: Sequence[str] = ("etps",),
    ratios: Sequence[float] = (0.7,),
    locs: Sequence[int | str] | None = None,
    limits: bool = True,
    progress: Progress | None = None,
) -> Result:
    """Build the variants of ``model_name`` (or of ``dense``, already built) and take every
    timing of ``protocol``; ``reduced``: measure this reduced model of ``dense`` instead of
    applying ``methods``. Returns the rows and the run's environment."""
    say = progress or log.info
    device = torch.device(protocol.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here; use --device cpu")
    meta = environment(protocol.device)
    meta["protocol"] = {k: getattr(protocol, k) for k in protocol.__dataclass_fields__}
    t0 = time.perf_counter()
    if dense is None:
        from .models import load_model

        say(f"{model_name}: building the model (random weights)")
        dense = load_model(model_name, img_size=None if protocol.img_size == 224 else protocol.img_size).dense
    dense = dense.to(device).eval()
    if reduced is not None:
        reduced = reduced.to(device).eval()
    say(f"{model_name}: building the variants (dense, limits, reduced)")
    example = torch.randn(2, 3, protocol.img_size, protocol.img_size, device=device)
    modules, rows = build_variants(model_name, dense, methods, ratios, locs, example, reduced, limits)
    say(f"{model_name}: {len(modules)} variant(s) built in {time.perf_counter() - t0:.0f} s")
    measure_variants(modules, rows, protocol, say)
    if device.type == "cpu":
        meta["load_after"] = load_average()
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return Result(meta=meta, rows=rows)
