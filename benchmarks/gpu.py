#!/usr/bin/env python3
"""Throughput of dense, limit and token-reduced ViTs in one process (docs: benchmarks.md).

Protocol: bf16 autocast, batch 256, 224 px, eval, ``torch.no_grad()``; eager and
``torch.compile`` (default mode); CUDA events around 30 iterations after 10 warm-ups, median of 5
repeats; random inputs; batch-1 latency compiled with ``mode="reduce-overhead"``; GFLOPs with
FlopCounterMode on one image (multiply-adds); peak memory per variant; the *limit* (the same
blocks on the reduced token counts, free selection and merging) measured side by side:
``efficiency = reduced img/s / limit img/s``.

Variants per model: dense, limit[m]@rho (method m's own plan with free sites), and ``tokenreduce.apply(model, method, locs, rho)`` for
each method and rho.  Three kinds of measurement:

    A  build, GFLOPs, eager batch-B throughput and peak memory, eager batch-1 latency
    B  torch.compile (default mode): batch-B throughput
    C  torch.compile(mode="reduce-overhead"): batch-1 latency

Each compile costs tens of seconds, more than the timing itself, so they run in priority order
and a time budget (``--budget``) cuts the least important ones first: before each measurement the
remaining budget is compared with the slowest one of its kind so far, and what does not fit is
recorded as skipped.  Order: the first model of ``--models`` (default DeiT-S, the headline) gets
A and B for every variant, then C for its core variants (dense, limit and every method at the
first ratio); then A and B for the other models; then the remaining C.  Every comparison is
within one model (dense, limit and reduced of the same run), so a model can also be measured in
a run of its own.  Results are written to ``--out`` after every measurement (``gpu-bench.json``,
``gpu-bench.md``); the markdown table is printed last.  Each compiled row also records the host
time to launch one batch onto an idle GPU (``compiled_host_ms``): a row whose host time is close
to its time per batch is launch-bound and measures Python, not kernels.  ``--kernels`` adds each
compiled row's kernel-time sum and top kernels.

    PYTHONPATH=. python3 benchmarks/gpu.py                      # full run, ~9 min on one H100
    PYTHONPATH=. python3 benchmarks/gpu.py --models deit_small_patch16_224 --profile
    PYTHONPATH=. python3 benchmarks/gpu.py --models deit_small_patch16_224 --methods etps \
        --inline-too                                            # operator vs inlined squeeze
    PYTHONPATH=. python3 benchmarks/gpu.py --quick --device cpu --models deit_tiny_patch16_224 \\
        --batch 2 --no-compile                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass

_T0 = time.time()  # the budget counts from process start, torch's import included

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, gflops, limit_family, limit_of, time_cpu, time_cuda  # noqa: E402

DEFAULT_MODELS = ("deit_small_patch16_224", "deit_tiny_patch16_224", "deit_base_patch16_224", "pvt_tiny")
DEFAULT_METHODS = ("etps", "evit", "dtps", "dynamicvit")
DEFAULT_RATIOS = (0.7, 0.5)
# Hybrids take the library's default sites (PVT: the starts of stages 2-4), not ViT block indices.
HYBRIDS = ("pvt_", "cvt_")
# Kernel names that belong to choosing and merging tokens (profile share).
# Not plain "squeeze": Inductor names the kernels that consume the op's output after it too.
# FillFunctor: the op's host-key initialisation (torch.full; Inductor's own fills are Triton).
REDUCTION_KERNELS = r"topk|sort|gather|scatter|index|^_squeeze_|^_split_order|squeeze_reference|argmax|arg_max|FillFunctor"
# Rough first guesses of compile + timing seconds, replaced by what is measured.
FIRST_GUESS_S = {"A": 10.0, "B": 45.0, "C": 35.0}


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Variant:
    kind: str  # "dense" | "limit" | "reduced"
    method: str | None = None  # for a limit: the method whose plan it mirrors
    ratio: float | None = None
    inline: bool = False  # reduced, compiled with the squeeze inlined (set_squeeze_impl("inline"))

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "limit":
            return f"limit[{self.method}]@{self.ratio:g}"
        return f"{self.method}@{self.ratio:g}" + ("+inline" if self.inline else "")


def parse_variant(name: str) -> Variant:
    if name == "dense":
        return Variant("dense")
    head, _, ratio = name.partition("@")
    if head.startswith("limit["):
        return Variant("limit", head[len("limit["):-1], float(ratio))
    ratio, plus, _ = ratio.partition("+inline")
    return Variant("reduced", head, float(ratio), inline=bool(plus))


def is_hybrid(model_name: str) -> bool:
    return model_name.startswith(HYBRIDS)


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
    return text[:400]


def autotune_timings() -> dict:
    """The Triton squeeze's last autotuning: each config's time (ms) for each kernel."""
    from tokenreduce.ops import squeeze_triton as st

    out = {}
    for name, tuner in (("hosts", st._hosts_tuned), ("fuse", st._fuse_tuned), ("update", st._update_tuned)):
        timings = getattr(tuner, "configs_timings", None) or {}
        out[name] = {f"{c.kwargs} w{c.num_warps} s{c.num_stages}": round(float(t[0] if isinstance(t, (list, tuple)) else t), 4)
                     for c, t in timings.items()}
    return out


def host_ms(fn, repeats: int = 20) -> float:
    """Median host time to launch one call of ``fn`` onto an idle GPU (ms).  A model whose host
    time is close to its GPU time per call is launch-bound: its throughput measures Python."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(out)[len(out) // 2]


def kernel_times(fn, iters: int, device_type: str) -> tuple[dict[str, float], object]:
    """GPU time per call of each kernel that ``fn`` launches (us, summed over its launches),
    from ``torch.profiler`` over ``iters`` calls; also returns the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time_total / iters
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1])), prof


def graphed(fn):
    """``fn`` captured in a CUDA graph after warm-up calls (autotuning, compilation); returns the
    replay, so timing it measures GPU time without Python launch overhead."""
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


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = _T0
        self.rows: dict[tuple[str, str], dict] = {}
        self.bases: dict[str, torch.nn.Module | BaseException] = {}
        self.modules: dict[tuple[str, str], torch.nn.Module] = {}
        self.slowest: dict[str, float] = {}  # phase -> slowest compile + timing seen, seconds
        self.extra: dict = {}
        self._allocated_before = 0
        self.meta = environment(self.device)
        self.meta["args"] = {k: (None if v == float("inf") else v) for k, v in vars(args).items()}
        self.meta["protocol"] = {
            "autocast": "bfloat16", "batch": args.batch, "image_size": args.img_size,
            "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats,
            "limit_counting": "each method's own plan (sites, placement, counts), sites replaced by x[:, :P + k]",
            "peak_mib": "parameters + buffers + input + the largest extra allocation while timing",
        }
        os.makedirs(args.out, exist_ok=True)
        self.timer = time_cuda if self.device.type == "cuda" else time_cpu
        self.x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=self.device)
        self.x1 = torch.randn(1, 3, args.img_size, args.img_size, device=self.device)

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.time() - self.t0

    def row(self, model: str, variant: Variant) -> dict:
        key = (model, variant.name)
        if key not in self.rows:
            self.rows[key] = {"model": model, "variant": variant.name, "kind": variant.kind,
                              "method": variant.method, "keep_ratio": variant.ratio, "notes": {}}
        return self.rows[key]

    def note(self, row: dict, phase: str, text: str) -> None:
        row["notes"][phase] = text
        log(f"    [{phase}] {text}")

    def save(self) -> None:
        payload = {"meta": {**self.meta, "elapsed_s": round(self.elapsed(), 1)},
                   "rows": [self.derived(r) for r in self.rows.values()], **self.extra}
        path = os.path.join(self.args.out, "gpu-bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump(payload, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        with open(os.path.join(self.args.out, "gpu-bench.md"), "w") as f:
            f.write(self.markdown() + "\n")

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._allocated_before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self, m: torch.nn.Module, x: torch.Tensor) -> float | None:
        """The variant's own peak: its parameters, buffers and input plus the largest extra
        allocation during the timed calls (other models kept for later phases do not count)."""
        if self.device.type != "cuda":
            return None
        extra = torch.cuda.max_memory_allocated(self.device) - self._allocated_before
        own = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
        return (extra + own + x.numel() * x.element_size()) / 2**20

    def cleanup(self) -> None:
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ models
    def base(self, model_name: str) -> torch.nn.Module:
        if model_name not in self.bases:
            try:
                import timm

                if is_hybrid(model_name):
                    import tokenreduce.backbones  # noqa: F401  (registers pvt_* / cvt_* with timm)
                torch.manual_seed(0)
                m = timm.create_model(model_name, pretrained=False)
                self.bases[model_name] = m.to(self.device).eval()
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                self.bases[model_name] = err
        base = self.bases[model_name]
        if isinstance(base, BaseException):
            raise base
        return base

    def locs(self, model_name: str) -> list[int] | None:
        return None if is_hybrid(model_name) else list(self.args.locs)

    def module(self, model_name: str, variant: Variant) -> torch.nn.Module:
        key = (model_name, variant.name)
        if key in self.modules:
            return self.modules[key]
        if variant.inline:  # the same module as the operator variant; only compilation differs
            self.modules[key] = self.module(model_name, Variant("reduced", variant.method, variant.ratio))
            return self.modules[key]
        base = self.base(model_name)
        if variant.kind == "dense":
            m = base
        elif variant.kind == "limit":
            import tokenreduce

            if is_hybrid(model_name):
                raise TypeError(f"the limit is not defined for {model_name}: truncating breaks its grids")
            # the method's own plan (sites, placement, counts) with zero-cost truncation sites
            m = limit_of(tokenreduce.apply(base, method=variant.method, locs=self.locs(model_name),
                                           keep_ratio=variant.ratio)).eval()
        else:
            import tokenreduce

            torch.manual_seed(0)  # dTPS / DynamicViT score heads: same random init every run
            m = tokenreduce.apply(base, method=variant.method, locs=self.locs(model_name),
                                  keep_ratio=variant.ratio).eval()
        self.modules[key] = m
        return m

    def variants(self) -> list[Variant]:
        out = [Variant("dense")]
        families = sorted({limit_family(m) for m in self.args.methods})
        out += [Variant("limit", f, r) for f in families for r in self.args.ratios]
        out += [Variant("reduced", m, r) for m in self.args.methods for r in self.args.ratios]
        if self.args.inline_too:  # the same reduced models, compiled with the squeeze inlined
            out += [Variant("reduced", m, r, inline=True) for m in self.args.methods
                    for r in self.args.ratios if m in ("etps", "dtps")]
        return out

    def schedule(self) -> list[tuple[str, str, Variant]]:
        """(phase, model, variant) in priority order; see the module docstring."""
        a = self.args
        variants = self.variants()
        core = [v for v in variants if v.kind == "dense" or v.ratio == a.ratios[0]]
        rest = [v for v in variants if v not in core]
        first, others = a.models[:1], a.models[1:]
        compile_, b1 = not a.no_compile, not a.no_compile and not a.no_b1

        def tasks(phase, models, vs, when=True):
            return [(phase, m, v) for m in models for v in vs] if when else []

        return (tasks("A", first, variants) + tasks("B", first, variants, compile_)
                + tasks("C", first, core, b1)
                + tasks("A", others, variants) + tasks("B", others, variants, compile_)
                + tasks("C", first, rest, b1) + tasks("C", others, core, b1) + tasks("C", others, rest, b1))

    # ------------------------------------------------------------------ measurements
    def run_timed(self, fn, iters: int | None = None) -> float:
        a = self.args
        with torch.no_grad(), self.autocast():
            return self.timer(fn, iters or a.iters, a.warmup, a.repeats)

    def phase_a(self, model_name: str, variant: Variant) -> None:
        row = self.row(model_name, variant)
        log(f"[A {self.elapsed():6.0f}s] {model_name} {variant.name}: build, GFLOPs, eager")
        if not self.fits(row, "A", "eager"):
            return
        try:
            m = self.module(model_name, variant)
        except Exception as err:  # noqa: BLE001
            unsupported = is_hybrid(model_name) or (variant.kind == "limit" and isinstance(err, TypeError))
            prefix = "unsupported" if unsupported else "error"
            self.note(row, "build", f"{prefix}: {short_error(err)}")
            if prefix == "error":
                traceback.print_exc()
            return
        row["locs"] = self.locs(model_name) if variant.kind == "reduced" else (
            list(self.args.locs) if variant.kind == "limit" else None)
        start = time.time()
        try:
            row["gflops"] = gflops(m, self.x[:1])
            self.reset_peak()
            ms = self.run_timed(lambda: m(self.x))
            row["eager_ms"] = ms
            row["eager_img_s"] = self.args.batch * 1e3 / ms
            row["peak_mib_eager"] = self.peak_mib(m, self.x)
            row["b1_eager_ms"] = self.run_timed(lambda: m(self.x1))
            log(f"    {row['gflops']:.3f} GFLOPs  eager {row['eager_img_s']:,.0f} img/s  "
                f"b1 eager {row['b1_eager_ms']:.2f} ms")
        except Exception as err:  # noqa: BLE001
            self.note(row, "eager", f"{self.failure(model_name)}: {short_error(err)}")
            traceback.print_exc()
        finally:
            self.slowest["A"] = max(self.slowest.get("A", 0.0), time.time() - start)
            self.save()

    @staticmethod
    def failure(model_name: str) -> str:
        # Hybrids are best-effort (spatial operators need the pad-back path): say so in the row.
        return "unsupported" if is_hybrid(model_name) else "error"

    def fits(self, row: dict, phase: str, label: str) -> bool:
        need = self.slowest.get(phase, FIRST_GUESS_S[phase])
        if self.elapsed() + need > self.args.budget:
            self.note(row, label, f"skipped: time budget (--budget {self.args.budget:g} s, "
                                  f"{self.elapsed():.0f} s used, ~{need:.0f} s needed)")
            return False
        return True

    def compiled(self, model_name: str, variant: Variant, phase: str) -> None:
        row = self.row(model_name, variant)
        label = "compiled" if phase == "B" else "b1_compiled"
        key = (model_name, variant.name)
        if key not in self.modules or "eager_ms" not in row:
            return  # build or eager failed: already recorded
        mode = "reduce-overhead" if phase == "C" and self.device.type == "cuda" else "default"
        log(f"[{phase} {self.elapsed():6.0f}s] {model_name} {variant.name}: torch.compile(mode={mode!r})"
            f"{' batch 1' if phase == 'C' else ''}")
        if not self.fits(row, phase, label):
            return
        m = self.modules[key]
        x = self.x if phase == "B" else self.x1
        start = time.time()
        self.cleanup()
        try:
            from torch._dynamo.utils import counters

            counters.clear()
            from tokenreduce.ops import set_squeeze_impl

            set_squeeze_impl("inline" if variant.inline else "op")  # read while compiling
            cm = torch.compile(m, mode=mode)
            with torch.no_grad(), self.autocast():
                cm(x)  # compile
                self.sync()
            compile_s = time.time() - start
            prefix = "" if phase == "B" else "b1_"
            row[f"{prefix}graphs"] = int(counters["stats"]["unique_graphs"])
            row[f"{prefix}graph_breaks"] = int(sum(counters["graph_break"].values()))
            self.reset_peak()
            ms = self.run_timed(lambda: cm(x))
            if phase == "B":
                row.update(compiled_ms=ms, compiled_img_s=self.args.batch * 1e3 / ms,
                           compile_s=compile_s, peak_mib_compiled=self.peak_mib(m, x))
                if self.device.type == "cuda":  # launch-bound when close to compiled_ms
                    with torch.no_grad(), self.autocast():
                        row["compiled_host_ms"] = host_ms(lambda: cm(x))
                log(f"    compiled {row['compiled_img_s']:,.0f} img/s  ({ms:.2f} ms per batch, host "
                    f"{row.get('compiled_host_ms', float('nan')):.2f} ms to launch one; compile {compile_s:.0f} s)")
                if self.args.kernels and self.device.type == "cuda":
                    self.record_kernels(row, lambda: cm(x))
            else:
                row.update(b1_ms=ms, b1_compile_s=compile_s, b1_mode=mode)
                log(f"    b1 compiled {ms:.2f} ms  (compile {compile_s:.0f} s)")
        except Exception as err:  # noqa: BLE001
            self.note(row, label, f"{self.failure(model_name)}: {short_error(err)}")
            traceback.print_exc()
        finally:
            cm = None
            self.cleanup()
            self.slowest[phase] = max(self.slowest.get(phase, 0.0), time.time() - start)
            self.save()

    def record_kernels(self, row: dict, fn) -> None:
        """--kernels: the row's kernel times (top 15, us per batch), so that a row far off its
        neighbours can be explained from the JSON."""
        with torch.no_grad(), self.autocast():
            kernels, _ = kernel_times(fn, 5, self.device.type)
        pattern = re.compile(REDUCTION_KERNELS, re.IGNORECASE)
        row["kernels_us"] = {
            "total": round(sum(kernels.values()), 1),
            "reduction": round(sum(v for k, v in kernels.items() if pattern.search(k)), 1),
            "top": {k[:90]: round(v, 1) for k, v in list(kernels.items())[:15]},
        }
        top = ", ".join(f"{k[:40]} {v:.0f}" for k, v in list(kernels.items())[:4])
        log(f"    kernels {row['kernels_us']['total']:.0f} us/batch (reduction "
            f"{row['kernels_us']['reduction']:.0f}): {top}")

    # ------------------------------------------------------------------ squeeze kernel
    def squeeze_micro(self) -> None:
        """One eTPS site's merge alone at DeiT-T/S/B's first-site shapes (batch B, class token,
        n = 196 -> k = 137): the indexed Triton op against the plain reference (eager) and the
        reference compiled by Inductor; fp32 is the dtype of the residual stream under autocast."""
        try:
            from tokenreduce.ops import topk_split
            from tokenreduce.ops.squeeze import squeeze_tokens_reference
            from tokenreduce.ops.squeeze_triton import squeeze_tokens_triton
        except Exception as err:  # noqa: BLE001
            self.extra["squeeze_micro"] = f"error: {short_error(err)}"
            return
        B, results = self.args.batch, []
        n, k, P = 196, 137, 1
        compiled_ref = torch.compile(squeeze_tokens_reference, dynamic=False)
        for C in (192, 384, 768):
            for dtype in (torch.float32, torch.bfloat16):
                if dtype == torch.bfloat16 and C != 384:
                    continue
                x = torch.randn(B, P + n, C, device=self.device, dtype=dtype)
                kept, pruned = topk_split(torch.randn(B, n, device=self.device), k)
                entry = {"shape": [B, P, n, k, C], "dtype": str(dtype).replace("torch.", "")}
                try:
                    with torch.no_grad():
                        y = squeeze_tokens_triton(x, kept, pruned, P).float()  # autotunes
                        entry["autotune_ms"] = autotune_timings()
                        ref = squeeze_tokens_reference(x.float(), kept, pruned, P)
                        row_rel = (y - ref).norm(dim=-1) / ref.norm(dim=-1)
                        entry["rows_off_by_1pct"] = float((row_rel > 1e-2).float().mean())
                        # CUDA graphs: GPU time, without Python launch overhead.
                        entry["triton_ms"] = time_cuda(graphed(lambda: squeeze_tokens_triton(x, kept, pruned, P)))
                        entry["reference_ms"] = time_cuda(graphed(lambda: squeeze_tokens_reference(x, kept, pruned, P)))
                        entry["inductor_ms"] = time_cuda(graphed(lambda: compiled_ref(x, kept, pruned, P)))
                        scores = torch.randn(B, n, device=self.device)
                        entry["topk_split_ms"] = time_cuda(graphed(lambda: topk_split(scores, k)))
                        moved = x.element_size() * B * C * (P + n + P + k)  # read the stream, write the output
                        entry["memory_floor_ms"] = moved / 3.3e12 * 1e3  # at ~3.3 TB/s achievable
                except Exception as err:  # noqa: BLE001
                    entry["error"] = short_error(err)
                results.append(entry)
        self.extra["squeeze_micro"] = results
        log("site merge micro-benchmark (ms per call: Triton indexed / reference eager / reference "
            "compiled / floor; topk_split; rows off by >1%):")
        for e in results:
            if "error" in e:
                log(f"  {e['shape']} {e['dtype']}: {e['error']}")
            else:
                log(f"  {e['shape']} {e['dtype']:>8}: {e['triton_ms']:.3f} / {e['reference_ms']:.3f} / "
                    f"{e['inductor_ms']:.3f} / {e['memory_floor_ms']:.3f}; topk_split {e['topk_split_ms']:.3f}"
                    f"  ({e['rows_off_by_1pct']:.2%})")
                log(f"    autotune (ms): {e.get('autotune_ms')}")
        self.save()

    # ------------------------------------------------------------------ profile
    def profile(self) -> None:
        model_name, _, vname = self.args.profile_variant.partition(":")
        variant = parse_variant(vname)
        log(f"[profile {self.elapsed():6.0f}s] {model_name} {variant.name} (compiled, batch {self.args.batch})")
        result: dict = {"model": model_name, "variant": variant.name, "pattern": REDUCTION_KERNELS}
        try:
            m = self.module(model_name, variant)
            self.cleanup()
            cm = torch.compile(m)
            with torch.no_grad(), self.autocast():
                for _ in range(self.args.warmup):
                    cm(self.x)
                self.sync()
                kernels, prof = kernel_times(lambda: cm(self.x), 10, self.device.type)
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=80)
            path = os.path.join(self.args.out, re.sub(r"[^A-Za-z0-9._-]", "_", f"profile_{model_name}-{variant.name}.txt"))
            with open(path, "w") as f:
                f.write(table + "\n")
            total = sum(kernels.values())
            pattern = re.compile(REDUCTION_KERNELS, re.IGNORECASE)
            matched = {k: v for k, v in kernels.items() if pattern.search(k)}
            result.update(
                table=path,
                device_time_us_per_iter=total,
                reduction_share=(sum(matched.values()) / total) if total else None,
                reduction_kernels_us_per_iter=matched,
                top_kernels_us_per_iter=dict(list(kernels.items())[:25]),
            )
            share = result["reduction_share"]
            log(f"    reduction kernels: {share:.1%} of CUDA time" if share is not None
                else "    no CUDA kernel events recorded")
            log(f"    key_averages table -> {path}")
        except Exception as err:  # noqa: BLE001
            result["error"] = short_error(err)
            traceback.print_exc()
        finally:
            self.cleanup()
        self.extra["profile"] = result
        self.save()

    # ------------------------------------------------------------------ report
    def derived(self, row: dict) -> dict:
        out = dict(row)
        dense = self.rows.get((row["model"], "dense"), {})
        limit = {}
        if row["kind"] == "reduced" and row["keep_ratio"]:
            limit = self.rows.get((row["model"], f"limit[{limit_family(row['method'])}]@{row['keep_ratio']:g}"), {})
        for mode in ("eager", "compiled"):
            v = row.get(f"{mode}_img_s")
            d = dense.get(f"{mode}_img_s")
            lim = limit.get(f"{mode}_img_s")
            out[f"{mode}_vs_dense"] = v / d if v and d else None
            out[f"{mode}_efficiency_vs_limit"] = v / lim if v and lim and row["kind"] == "reduced" else None
        return out

    def markdown(self) -> str:
        hdr = ("| model | variant | GFLOPs | eager img/s | compiled img/s | compiled vs dense "
               "| efficiency vs limit | b1 latency ms (compiled) | peak MiB |")
        lines = [hdr, "|" + "---|" * 9]
        notes = []

        def num(v, fmt):
            if not isinstance(v, (int, float)):
                return "—"
            return format(v, ".3g") if fmt == ",.0f" and abs(v) < 100 else format(v, fmt)

        for row in self.rows.values():
            d = self.derived(row)
            eff = d["compiled_efficiency_vs_limit"]
            eff_s = num(eff, ".2f")
            if eff is None and d["eager_efficiency_vs_limit"] is not None:
                eff_s = f"{d['eager_efficiency_vs_limit']:.2f} (eager)"
            peak = row.get("peak_mib_eager")
            lines.append(
                f"| {row['model']} | {row['variant']} | {num(row.get('gflops'), '.2f')} "
                f"| {num(row.get('eager_img_s'), ',.0f')} | {num(row.get('compiled_img_s'), ',.0f')} "
                f"| {num(d['compiled_vs_dense'], '.2f')} | {eff_s} | {num(row.get('b1_ms'), '.2f')} "
                f"| {num(peak, ',.0f')} |"
            )
            for phase, text in row["notes"].items():
                notes.append(f"- {row['model']} {row['variant']} [{phase}]: {text}")
        m = self.meta
        head = (f"Device: {m.get('device')} | torch {m.get('torch')} | timm {m.get('timm')} | "
                f"triton {m.get('triton')} | {m.get('date')} | batch {self.args.batch}, bf16 autocast, "
                f"median of {self.args.repeats} x {self.args.iters} iters | Triton squeeze: "
                f"{m.get('triton_squeeze')}")
        foot = ("Limit[m]: method m's own plan (same sites, placement and token counts) with every "
                "site replaced by a free cut x[:, :P + k]; dynamicvit shares dtps's. Peak MiB: eager, "
                f"batch {self.args.batch}, parameters + input + "
                "largest extra allocation. "
                "Efficiency: reduced / limit img/s at the same rho (compiled unless marked).")
        return "\n".join([head, "", *lines, "", foot] + (["", "Notes:", *notes] if notes else []))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [t for t in s.split(",") if t]  # noqa: E731
    p.add_argument("--models", type=csv, default=list(DEFAULT_MODELS), help="comma-separated timm names")
    p.add_argument("--methods", type=csv, default=list(DEFAULT_METHODS))
    p.add_argument("--ratios", type=lambda s: [float(t) for t in csv(s)], default=list(DEFAULT_RATIOS))
    p.add_argument("--locs", type=lambda s: [int(t) for t in csv(s)], default=[3, 6, 9],
                   help="0-based block indices for ViTs (hybrids use the library default sites)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of <= 5 iters, 2 warm-ups")
    p.add_argument("--no-compile", action="store_true", help="eager only (no B, no C)")
    p.add_argument("--no-b1", action="store_true", help="no C (batch-1 reduce-overhead latency)")
    p.add_argument("--no-micro", action="store_true", help="skip the squeeze kernel micro-benchmark")
    p.add_argument("--inline-too", action="store_true",
                   help="also compile etps/dtps with the squeeze inlined for Inductor (variants '+inline')")
    p.add_argument("--no-triton-squeeze", action="store_true",
                   help="keep the reference squeeze on CUDA (do not register the Triton kernel)")
    p.add_argument("--profile", action="store_true",
                   help="profile one compiled reduced model first (see --profile-variant)")
    p.add_argument("--kernels", action="store_true",
                   help="after each compiled timing, record the row's kernel-time sum and top kernels")
    p.add_argument("--profile-variant", default="deit_small_patch16_224:etps@0.7")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds from process start; no measurement starts that would end past "
                        "it (default 500 on CUDA, to fit a 10-minute slot; unlimited on CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 500.0 if args.device.startswith("cuda") else float("inf")
    if args.quick:
        args.repeats, args.warmup, args.iters = 2, 2, min(args.iters, 5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("CUDA is not available: pass --device cpu")
        return 2
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64)):
        with contextlib.suppress(AttributeError, KeyError):
            setattr(torch._dynamo.config, name, value)
    bench = Bench(args)
    if bench.device.type == "cuda" and not args.no_triton_squeeze:
        try:
            from tokenreduce.ops.squeeze_triton import register_cuda_kernel

            bench.meta["triton_squeeze"] = register_cuda_kernel()
        except Exception as err:  # noqa: BLE001
            bench.meta["triton_squeeze"] = f"error: {short_error(err)}"
    else:
        bench.meta["triton_squeeze"] = False
    log(f"device {bench.meta.get('device')}  torch {torch.__version__}  out {args.out}  "
        f"budget {args.budget:g} s  Triton squeeze {bench.meta['triton_squeeze']}")

    if bench.device.type == "cuda" and not args.no_micro:
        bench.squeeze_micro()
    if args.profile:
        bench.profile()
    for phase, model_name, variant in bench.schedule():
        if phase == "A":
            bench.phase_a(model_name, variant)
        else:
            bench.compiled(model_name, variant, phase)
    bench.save()
    log(f"\ndone in {bench.elapsed():.0f} s; wrote {os.path.join(args.out, 'gpu-bench.json')} and gpu-bench.md\n")
    log(bench.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
