#!/usr/bin/env python3
"""Dense vs limit vs token-reduced ViTs on CPU, in one process (docs: /work/shared/docs/benchmarks.md).

Protocol, the CPU counterpart of benchmarks/gpu.py: fp32, eval, ``torch.no_grad()``, batch 32,
224 px, random inputs (never zeros); GFLOPs with FlopCounterMode on one image, as multiply-adds.
Every variant of a model is built first, then all are timed in turns
(``_common.time_cpu_round_robin``): 2 warm-up rounds, then 5 repeats in which each variant runs
2 calls; the median ms per call is reported and ``spread`` is (max - min) / median over the
repeats.  Timing in turns spreads load from other processes over all variants; the load average
before and after is printed so a noisy run shows as one.

Variants per model, at each keep ratio rho:

    dense        the model as timm builds it (random weights: speed does not depend on them)
    limit[M]@rho plain ViTs only: method M's own plan (sites, placement, token counts) with every
                 site replaced by a free truncation x[:, :P + k] (_common.limit_of): the cost
                 floor of that reduction; DynamicViT shares dTPS's (same counts and placement)
    METHOD@rho   tokenreduce.apply(model, METHOD, locs, rho)

``vs dense`` = img/s / dense img/s; ``vs limit`` = img/s / img/s of the method's limit at the
same rho.
Hybrid backbones (``pvt_*``, ``cvt_*``) have no single token sequence to cut, so their limit is
not defined (``n/a``); they take the library's default sites, methods dtps and dynamicvit, and
the papers' keep ratios (0.7 for PVT, 0.5 for CvT) unless --methods / --ratios say otherwise.

The issue target (reduced DeiT-S at keep 0.7 runs at least 1.3x dense on CPU) is checked and
printed under the table; this is a measurement, never a pass/fail test.

    .venv/bin/python benchmarks/cpu.py                            # DeiT-S, ~3 min on 2 cores
    .venv/bin/python benchmarks/cpu.py --quick                    # smoke run, < 1 min
    .venv/bin/python benchmarks/cpu.py --models pvt_tiny,cvt_13
    .venv/bin/python benchmarks/cpu.py --ratios 0.7,0.5 --json cpu-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, gflops, limit_family, limit_of, time_cpu_round_robin  # noqa: E402

VIT_METHODS = ("etps", "evit", "dtps", "dynamicvit")
HYBRID_METHODS = ("dtps", "dynamicvit")  # eTPS / EViT score by the class token, which PVT/CvT lack
HYBRID_RATIOS = {"pvt_": 0.7, "cvt_": 0.5}  # the papers' settings
VIT_RATIO = 0.7
TARGET = ("deit_small_patch16_224", 0.7, 1.3)  # model, keep ratio, speed-up vs dense


def log(msg: str = "") -> None:
    print(msg, flush=True)


def is_hybrid(model_name: str) -> bool:
    return model_name.startswith(tuple(HYBRID_RATIOS))


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def short_error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def plan_for(model_name: str, args: argparse.Namespace) -> tuple[list[str], list[float], list[int] | None]:
    """(methods, ratios, locs) for one model: hybrids take their own defaults, see the docstring."""
    if is_hybrid(model_name):
        prefix = next(p for p in HYBRID_RATIOS if model_name.startswith(p))
        return (args.methods or list(HYBRID_METHODS), args.ratios or [HYBRID_RATIOS[prefix]], None)
    return args.methods or list(VIT_METHODS), args.ratios or [VIT_RATIO], list(args.locs)


def tokens_after_sites(reduced: torch.nn.Module) -> list[int]:
    """Tokens in the stream (prefix included) right after each site of a tokenreduce plan."""
    return [s.num_prefix + s.n_out for s in reduced.meta["tokenreduce"].plan.sites]


def build_variants(model_name: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """The modules to time (name -> module) and one report row per variant, errors recorded."""
    import timm

    import tokenreduce

    if is_hybrid(model_name):
        import tokenreduce.backbones  # noqa: F401  (registers pvt_* / cvt_* with timm)
    methods, ratios, locs = plan_for(model_name, args)
    size = args.img_size
    example = torch.randn(2, 3, size, size)
    torch.manual_seed(0)
    try:  # a ViT's position embedding is sized by img_size; CvT's convolutional stem takes no such argument
        dense = timm.create_model(model_name, pretrained=False, **({} if size == 224 else {"img_size": size}))
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        dense = timm.create_model(model_name, pretrained=False)
    dense.eval()
    modules = {"dense": dense}
    rows = [{"model": model_name, "variant": "dense", "kind": "dense", "method": None, "ratio": None,
             "locs": None, "tokens": None}]
    for family in sorted({limit_family(m) for m in methods}):
        for rho in ratios:
            row = {"model": model_name, "variant": f"limit[{family}]@{rho:g}", "kind": "limit",
                   "method": family, "ratio": rho, "locs": locs, "tokens": None}
            rows.append(row)
            if is_hybrid(model_name):
                row["error"] = "n/a: not defined for a hybrid (truncating tokens breaks its grids)"
                continue
            try:
                torch.manual_seed(0)
                limit = limit_of(tokenreduce.apply(dense, method=family, locs=locs, keep_ratio=rho,
                                                 example_input=example)).eval()
            except Exception as err:  # noqa: BLE001 - the method's own row records why
                row["error"] = f"n/a: {short_error(err)}"
                continue
            row["tokens"] = tokens_after_sites(limit)
            modules[row["variant"]] = limit
    for method in methods:
        for rho in ratios:
            row = {"model": model_name, "variant": f"{method}@{rho:g}", "kind": "reduced", "method": method,
                   "ratio": rho, "locs": locs, "tokens": None}
            rows.append(row)
            try:
                torch.manual_seed(0)  # dTPS / DynamicViT score heads: the same random init every run
                reduced = tokenreduce.apply(dense, method=method, locs=locs, keep_ratio=rho,
                                            example_input=example).eval()
            except Exception as err:  # noqa: BLE001 - recorded in the row, the run goes on
                row["error"] = f"unsupported: {short_error(err)}"
                continue
            row["tokens"] = tokens_after_sites(reduced)
            row["sites"] = [s.path for s in reduced.meta["tokenreduce"].plan.sites]
            modules[row["variant"]] = reduced
    return modules, rows


def measure(model_name: str, args: argparse.Namespace) -> list[dict]:
    log(f"\n[{model_name}] building variants")
    t0 = time.time()
    try:
        modules, rows = build_variants(model_name, args)
    except Exception as err:  # noqa: BLE001 - one model failing does not end the run
        traceback.print_exc()
        return [{"model": model_name, "variant": "dense", "kind": "dense", "error": f"error: {short_error(err)}"}]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    by_name = {r["variant"]: r for r in rows}
    for name, m in list(modules.items()):
        row = by_name[name]
        try:
            row["gflops"] = gflops(m, x[:1])
        except Exception as err:  # noqa: BLE001
            row["error"] = f"error: {short_error(err)}"
            del modules[name]
    log(f"[{model_name}] built {len(modules)} variant(s) in {time.time() - t0:.0f} s; timing "
        f"{args.warmup} warm-up round(s), {args.repeats} x {args.iters} call(s) per variant, in turns")
    t0 = time.time()
    with torch.no_grad():
        fns = {name: (lambda m=m: m(x)) for name, m in modules.items()}
        try:
            per_call = time_cpu_round_robin(fns, iters=args.iters, warmup=args.warmup, repeats=args.repeats)
        except Exception:  # noqa: BLE001 - find the variant that fails, time the rest
            traceback.print_exc()
            per_call = {}
            for name, fn in fns.items():
                try:
                    per_call.update(time_cpu_round_robin({name: fn}, args.iters, args.warmup, args.repeats))
                except Exception as err2:  # noqa: BLE001
                    by_name[name]["error"] = f"error: {short_error(err2)}"
    log(f"[{model_name}] timed in {time.time() - t0:.0f} s")
    for name, ms_all in per_call.items():
        row = by_name[name]
        ms = statistics.median(ms_all)
        row.update(ms=ms, ms_all=ms_all, img_s=args.batch * 1e3 / ms,
                   spread=(max(ms_all) - min(ms_all)) / ms)
    dense = by_name["dense"].get("img_s")
    for row in rows:
        v = row.get("img_s")
        limit = (by_name.get(f"limit[{limit_family(row['method'])}]@{row['ratio']:g}", {}).get("img_s")
                 if row["kind"] == "reduced" else None)
        row["vs_dense"] = v / dense if v and dense else None
        row["vs_limit"] = v / limit if v and limit and row["kind"] == "reduced" else None
    return rows


def markdown(rows: list[dict], meta: dict, args: argparse.Namespace) -> str:
    def num(v, fmt: str, missing: str = "—") -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else missing

    head = [
        f"CPU: {meta['cpu']} ({meta['cpu_count']} logical cores, torch threads {meta['cpu_threads']}) | "
        f"torch {meta['torch']} | timm {meta['timm']} | {meta['date']}",
        f"fp32, eval, no_grad, batch {args.batch}, {args.img_size} px, random inputs; median of "
        f"{args.repeats} repeats x {args.iters} call(s) after {args.warmup} warm-up round(s), variants in turns; "
        f"load average before {meta['load_before']}, after {meta['load_after']}",
        "",
        "| model | variant | tokens after sites | GFLOPs | img/s | vs dense | vs limit | spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        no_limit = is_hybrid(r["model"]) and r["kind"] == "reduced"
        tokens = " / ".join(map(str, r["tokens"])) if r.get("tokens") else "—"
        if r["kind"] == "limit" and "error" in r:
            notes.append(f"- {r['model']} {r['variant']}: {r['error']}")
            continue
        head.append(
            f"| {r['model']} | {r['variant']} | {tokens} | {num(r.get('gflops'), '.2f')} "
            f"| {num(r.get('img_s'), '.1f')} | {num(r.get('vs_dense'), '.2f')} "
            f"| {'n/a' if no_limit else num(r.get('vs_limit'), '.2f')} "
            f"| {num(r.get('spread'), '.0%')} |"
        )
        if "error" in r:
            notes.append(f"- {r['model']} {r['variant']}: {r['error']}")
    foot = ["", "vs dense: img/s ratio to the dense model of the same run. vs limit: img/s ratio to the "
                "method's limit at the same rho (its own plan, every site a free truncation x[:, :P + k]; "
                "dynamicvit uses limit[dtps]). Hybrids: limit not defined (n/a)."]
    model, rho, want = TARGET
    hits = [r for r in rows if r["model"] == model and r["kind"] == "reduced" and r["ratio"] == rho
            and r.get("vs_dense")]
    if hits:
        got = ", ".join(f"{r['method']} {r['vs_dense']:.2f}x" for r in hits)
        met = all(r["vs_dense"] >= want for r in hits)
        foot.append(f"Issue target, {model} reduced at keep {rho:g} >= {want:g}x dense on CPU: {got} -> "
                    f"{'met by every method' if met else 'NOT met by every method'} in this run.")
    return "\n".join(head + foot + (["", "Notes:", *notes] if notes else []))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p.add_argument("--models", type=csv, default=["deit_small_patch16_224"], help="comma-separated timm names")
    p.add_argument("--methods", type=csv, default=None,
                   help=f"default: {','.join(VIT_METHODS)} for ViTs, {','.join(HYBRID_METHODS)} for hybrids")
    p.add_argument("--ratios", type=lambda s: [float(t) for t in csv(s)], default=None,
                   help=f"keep ratios; default {VIT_RATIO} (ViTs, PVT) and 0.5 (CvT)")
    p.add_argument("--locs", type=lambda s: [int(t) for t in csv(s)], default=[3, 6, 9],
                   help="0-based block indices for plain ViTs (hybrids use the library's default sites)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (8 with --quick)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=2, help="calls per variant per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds over all variants first")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 warm-up, 2 repeats of 1 call")
    p.add_argument("--json", default=None, metavar="PATH", help="also write meta and rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch = args.batch or 8
        args.warmup, args.iters, args.repeats = 1, 1, 2
    args.batch = args.batch or 32
    for name in ("batch", "iters", "repeats", "img_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = environment(torch.device("cpu"))
    meta.update(cpu=cpu_model(), cpu_count=os.cpu_count(), load_before=load_average(), args=vars(args))
    log(f"CPU {meta['cpu']}, {meta['cpu_count']} logical cores, torch {meta['torch']} with "
        f"{meta['cpu_threads']} thread(s), timm {meta['timm']}, {meta['date']}, load {meta['load_before']}")
    t0 = time.time()
    rows = [r for model_name in args.models for r in measure(model_name, args)]
    meta["load_after"] = load_average()
    meta["elapsed_s"] = round(time.time() - t0, 1)
    table = markdown(rows, meta, args)
    log(f"\ndone in {meta['elapsed_s']:.0f} s\n")
    log(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
