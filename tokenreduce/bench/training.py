"""Training-step throughput: dense and reduced models fine-tuned one step at a time, timed.

For each variant, one at a time (built, checked, timed eager, compiled and timed, released)::

    dense         the timm model (random weights)
    METHOD@RHO    tokenreduce.apply(dense, METHOD, keep_ratio=RHO, aux=True), in train mode

A step is :class:`~tokenreduce.bench.training_step.TrainStep`: forward, ``finetune``'s loss for
the method (cross-entropy, the ratio loss for learned scorers; with ``distill`` the frozen dense
teacher and the distillation terms), backward and timm's AdamW step. dTPS and DynamicViT train at
full length with policy-masked attention ("masked"); eTPS and EViT really remove tokens
("dropped"). Timed with :func:`~tokenreduce.bench.timing.round_robin` (CUDA events on a GPU; the
median of ``repeats`` repeats of ``iters`` steps after ``warmup`` steps); on CUDA also the peak
memory of the timed steps (``max_memory_allocated`` over what was allocated before the variant
was built), the host time to launch one step and (``kernels``) the kernel-time sum of a step: a
step whose host time is close to its wall time but whose kernels take less is launch-bound.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .env import environment, load_average
from .protocol import GRAPHED_MODES, Timing, timed_rows
from .timing import host_ms, kernel_times, round_robin, top_kernels
from .training_step import TrainStep, build_step, check_step
from .variants import short_error, tokens_after_sites

__all__ = ["TrainProtocol", "TrainResult", "TrainRow", "measure_training"]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
METHODS = ("dense", "dtps", "dynamicvit", "etps", "evit")
_FIRST_GUESS_COMPILE_S = 90.0  # forward and backward graphs of a DeiT-S, until one has been timed


@dataclass(frozen=True)
class TrainProtocol:
    """How to time a training step. ``img_size`` None: the model's own input size. ``compile``:
    also time the step with the model (and teacher) ``torch.compile``d (``compile_mode``
    "default" or a torch.compile mode, ``compile_backend`` "inductor" or e.g. "aot_eager");
    ``budget_s`` skips a compilation that would end past that many seconds from the start."""

    device: str = "cuda"
    amp: str = "bf16"
    batch: int = 128
    img_size: int | None = None
    keep_ratio: float = 0.7
    locs: tuple[int | str, ...] | None = None
    distill: bool = False
    iters: int = 20
    warmup: int = 5
    repeats: int = 5
    compile: bool = True
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    budget_s: float | None = None
    kernels: bool = False  # CUDA: also the GPU time of each kernel a step launches (torch.profiler)

    def __post_init__(self) -> None:
        if self.amp not in ("bf16", "none"):
            raise ValueError(f"amp: expected 'bf16' or 'none', got {self.amp!r}")
        for name in ("batch", "iters", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"img_size: must be a positive number of pixels, got {self.img_size}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio: must be in (0, 1], got {self.keep_ratio}")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.amp == "bf16" else None


@dataclass
class TrainRow:
    """One variant: what it trains (form, tokens, recipe, loss terms), its checks and timings."""

    model: str
    variant: str
    method: str | None = None
    ratio: float | None = None
    form: str = "dense"  # "dense" | "masked" (full length, policy-masked attention) | "dropped"
    tokens: list[int] | None = None  # tokens after each site in eval (the training form of "masked" keeps all)
    input_shape: list[int] | None = None  # (B, C, H, W) of the timed batch
    recipe: str | None = None
    loss_terms: list[str] = field(default_factory=list)
    checks: dict[str, Any] | None = None
    timings: list[Timing] = field(default_factory=list)
    note: str | None = None  # why the variant could not be built

    def timing(self, mode: str) -> Timing | None:
        return next((t for t in self.timings if t.mode == mode), None)


@dataclass
class TrainResult:
    """A run: the environment and protocol (``meta``) and one row per variant, dense first."""

    meta: dict
    rows: list[TrainRow]

    def to_dict(self) -> dict:
        """JSON-ready; each timing also carries its median_ms, img_s and spread."""
        return {"meta": self.meta, "rows": timed_rows(self.rows)}

    def dense(self) -> TrainRow | None:
        return next((r for r in self.rows if r.variant == "dense"), None)

    @property
    def ok(self) -> bool:
        """Every variant built, passed its checks and ended its timings on a finite loss."""
        return all(r.note is None and r.checks and r.checks["ok"] for r in self.rows)


def _cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], torch.Tensor], timing: Timing, p: TrainProtocol, device: torch.device, base: int) -> float:
    """Fill ``timing``: ms per step; on CUDA the peak MiB (not under CUDA graphs, with a note), the
    host ms and (``kernels``) the kernel times. Returns the last step's loss."""
    last: list[torch.Tensor] = []

    def call() -> None:
        last[:] = [step()]

    for _ in range(p.warmup):
        call()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing.ms = round_robin({"step": call}, device, p.iters, 0, p.repeats)["step"]
    if device.type == "cuda":
        if timing.mode not in GRAPHED_MODES:
            timing.peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:  # replays allocate nothing: the graphs' memory pool was taken before the reset
            timing.note = "peak memory not measured: CUDA graphs hold their memory in a pool allocated at capture"
        timing.host_ms = host_ms(call)
        if p.kernels:
            kernels, _ = kernel_times(call, 3)
            timing.kernel_us = sum(kernels.values())
            timing.top_kernels = top_kernels(kernels)
    return float(last[0].detach()) if last else float("nan")


def _build(model_name: str, method: str, p: TrainProtocol, device: torch.device) -> tuple[TrainRow, TrainStep]:
    """The row and the step of one variant, on ``device``, from a fresh model (seed 0)."""
    import tokenreduce
    from tokenreduce.train import teacher  # noqa: F401  (registers the digit ViTs with timm)

    from .models import load_model

    torch.manual_seed(0)  # every variant starts from the same weights and the same batch
    dense = load_model(model_name, img_size=p.img_size).dense.to(device)
    size = p.img_size or dense.pretrained_cfg["input_size"][-1]
    chans = dense.pretrained_cfg.get("input_size", (3,))[0]
    x = torch.randn(p.batch, chans, size, size, device=device)
    labels = torch.randint(0, dense.num_classes, (p.batch,), device=device)
    if method == "dense":
        row = TrainRow(model=model_name, variant="dense")
        student = dense
    else:
        locs = None if p.locs is None else list(p.locs)
        student = tokenreduce.apply(
            dense, method=method, locs=locs, keep_ratio=p.keep_ratio, aux=True, example_input=x[:2]
        )
        learned = any(n.startswith("reduce_sites.") for n, _ in student.named_parameters())
        row = TrainRow(
            model=model_name,
            variant=f"{method}@{p.keep_ratio:g}",
            method=method,
            ratio=p.keep_ratio,
            form="masked" if learned else "dropped",
            tokens=tokens_after_sites(student),
        )
    step = build_step(
        student,
        dense,
        None if method == "dense" else method,
        x,
        labels,
        dense.num_classes,
        distill=p.distill,
        amp=p.amp_dtype,
    )
    c = step.criterion
    row.input_shape = list(x.shape)
    row.recipe = step.recipe.name
    row.loss_terms = ["ce"] + (["ratio"] if c.ratio_weight else []) + (["kl_cls"] if c.distill_weight else [])
    row.loss_terms += [f"token_{c.token_loss}"] if c.needs_tokens else []
    return row, step


def _compile_and_time(
    row: TrainRow, step: TrainStep, p: TrainProtocol, device: torch.device, base: int, say: Progress
) -> float:
    """Compile ``step``'s forwards, take the first (compiling) step, then time it; the compile time,
    graphs and graph breaks go into the timing. Returns the seconds spent."""
    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    timing = Timing(batch=p.batch, mode=p.compile_mode)
    row.timings.append(timing)
    counters.clear()
    try:
        fast = step.compiled(None if p.compile_mode == "default" else p.compile_mode, p.compile_backend)
        fast()
        _sync(device)
    except Exception as err:  # noqa: BLE001 - recorded in the row; the other variants go on
        timing.note = f"error: {short_error(err)}"
        say(f"    {row.variant}: compile failed: {short_error(err)}")
        return time.perf_counter() - t0
    timing.compile_s = round(time.perf_counter() - t0, 1)
    timing.graphs = int(counters["stats"]["unique_graphs"])
    timing.graph_breaks = int(sum(counters["graph_break"].values()))
    say(f"    compiled in {timing.compile_s:.0f} s: {timing.graphs} graph(s), {timing.graph_breaks} break(s)")
    loss = _time(fast, timing, p, device, base)
    more = int(counters["stats"]["unique_graphs"]) - timing.graphs
    if more:
        recompiled = f"{more} more graph(s) compiled while timing (recompilation)"
        timing.note = f"{timing.note}; {recompiled}" if timing.note else recompiled
    row.checks.setdefault("final_loss", {})[p.compile_mode] = loss
    say(f"    {row.variant} compiled: {timing.median_ms:.2f} ms per step, {timing.img_s:,.0f} img/s")
    return time.perf_counter() - t0


def _measure_one(
    model_name: str, method: str, p: TrainProtocol, device: torch.device, t_start: float, slowest: list, say: Progress
) -> TrainRow:
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        row, step = _build(model_name, method, p, device)
    except Exception as err:  # noqa: BLE001 - a method the model does not support: a row with a note
        return TrainRow(model=model_name, variant=method, method=method, note=f"not built: {short_error(err)}")
    row.checks = check_step(step)
    if not row.checks["ok"]:
        say(f"    {row.variant}: CHECK FAILED: {'; '.join(row.checks['problems'])}")
    eager = Timing(batch=p.batch, mode="eager")
    row.timings.append(eager)
    row.checks["final_loss"] = {"eager": _time(step, eager, p, device, base)}
    say(f"    {row.variant} eager: {eager.median_ms:.2f} ms per step, {eager.img_s:,.0f} img/s")
    if p.compile:
        need = max(slowest, default=_FIRST_GUESS_COMPILE_S)
        used = time.perf_counter() - t_start
        if p.budget_s is not None and used + need > p.budget_s:
            note = f"skipped: time budget ({p.budget_s:g} s, {used:.0f} s used, ~{need:.0f} s needed)"
            row.timings.append(Timing(batch=p.batch, mode=p.compile_mode, note=note))
            say(f"    {row.variant}: compile {note}")
        else:
            slowest.append(_compile_and_time(row, step, p, device, base, say))
    losses = row.checks["final_loss"].values()
    if not all(math.isfinite(v) for v in losses):
        row.checks["ok"] = False
        row.checks["problems"].append(f"a timed step ended on a non-finite loss: {row.checks['final_loss']}")
    return row


def measure_training(
    model_name: str,
    protocol: TrainProtocol,
    methods: Sequence[str] = METHODS,
    *,
    progress: Progress | None = None,
    on_row: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Build, check and time each of ``methods`` ("dense" or a tokenreduce method) one at a time;
    ``on_row(result)`` after each (to write what is done so far). Dense is measured first."""
    say = progress or log.info
    device = torch.device(protocol.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here; use --device cpu")
    methods = list(dict.fromkeys(["dense", *methods]))  # the x-dense baseline, once, first
    meta = environment(protocol.device)
    meta["protocol"] = {k: getattr(protocol, k) for k in protocol.__dataclass_fields__}
    meta["model"] = model_name
    result = TrainResult(meta=meta, rows=[])
    t_start = time.perf_counter()
    slowest: list[float] = []
    for i, method in enumerate(methods):
        say(f"{model_name} {method} ({i + 1}/{len(methods)}): building, checking and timing")
        _cleanup(device)
        result.rows.append(_measure_one(model_name, method, protocol, device, t_start, slowest, say))
        _cleanup(device)
        if device.type == "cpu":
            result.meta["load_after"] = load_average()
        result.meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if on_row is not None:
            on_row(result)
    return result
