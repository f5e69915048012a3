#!/usr/bin/env python3
"""Throughput of dense, limit and token-reduced models, side by side in one process, to JSON.

The protocol of docs/benchmarks.md, through ``tokenreduce.bench.measure``: per model, the dense
model, each method's limit (its own plan with free sites) and each reduced model; per
``--timings`` entry BATCH:MODE (MODE ``eager``, ``default`` for ``torch.compile``, or a compile
mode such as ``reduce-overhead``), every variant timed (eager: in turns; compiled on a GPU: one
at a time). Writes ``throughput.json`` and ``throughput.md`` under --out after every model and
prints the tables at the end.

    python benchmarks/throughput.py                                    # GPU: DeiT-S, T, B, PVT-Tiny
    python benchmarks/throughput.py --models deit_small_patch16_224 --kernels
    python benchmarks/throughput.py --no-triton-squeeze --models deit_small_patch16_224
    python benchmarks/throughput.py --device cpu                       # CPU: fp32, batch 32, eager
    python benchmarks/throughput.py --device cpu --quick --models deit_tiny_patch16_224
    python benchmarks/throughput.py --models deit_small_patch16_224@384,deit_base_patch16_384 --methods etps

A model is a timm name, built at timm's own input size (384 for ``deit_base_patch16_384``), at
--img-size when given, or at NAME@PIXELS (``deit_small_patch16_224@384``: timm's ``img_size=384``;
its rows carry that label; every size is in the JSON's meta.models). ``--compile-only`` compiles
every variant once and times nothing: run in parallel processes first, it fills Inductor's caches
for the measuring run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokenreduce.bench.protocol import MODES
from tokenreduce.cli import parse_locs

GPU_MODELS = ("deit_small_patch16_224", "deit_tiny_patch16_224", "deit_base_patch16_224", "pvt_tiny")
METHODS = ("etps", "evit", "dtps", "dynamicvit")
HYBRID_METHODS = ("dtps", "dynamicvit")  # eTPS / EViT score by the class token, which PVT/CvT lack
HYBRID_RATIOS = {"pvt_": (0.7,), "cvt_": (0.5,)}  # the papers' settings
TIMINGS = {"cuda": "256:eager,256:default,1:eager,1:reduce-overhead", "cpu": "32:eager"}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_timings(text: str) -> tuple[tuple[int, str], ...]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        batch, _, mode = item.partition(":")
        if not batch.isdigit() or mode not in MODES:
            raise argparse.ArgumentTypeError(
                f"--timings: expected BATCH:MODE with MODE one of {', '.join(MODES)}, got {item!r}"
            )
        out.append((int(batch), mode))
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p.add_argument(
        "--models", type=csv, default=None, help="timm names (default: DeiT-S/T/B + PVT-Tiny on cuda, DeiT-S on cpu)"
    )
    p.add_argument(
        "--methods",
        type=csv,
        default=None,
        help=f"default {','.join(METHODS)} ({','.join(HYBRID_METHODS)} for PVT/CvT)",
    )
    p.add_argument(
        "--ratios",
        type=lambda s: [float(t) for t in csv(s)],
        default=None,
        help="keep ratios (default 0.7,0.5 on cuda, 0.7 on cpu; PVT 0.7, CvT 0.5)",
    )
    p.add_argument(
        "--locs",
        type=parse_locs,
        default=[3, 6, 9],
        help="block indices for plain ViTs (hybrids take the library's default sites)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None, help="default bf16 on cuda, none on cpu")
    p.add_argument(
        "--img-size", type=int, default=None, help="pixels for every model (default: each model's own; or NAME@PIXELS)"
    )
    p.add_argument(
        "--timings",
        type=parse_timings,
        default=None,
        help=f"BATCH:MODE list (default cuda {TIMINGS['cuda']}; cpu {TIMINGS['cpu']})",
    )
    p.add_argument("--iters", type=int, default=None, help="calls per repeat (default 30 cuda, 2 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 cuda, 2 cpu)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of <= 5 calls, 1 warm-up")
    p.add_argument("--kernels", action="store_true", help="record each timing's kernel times (cuda)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per model; a compilation that would end past it is skipped and recorded",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole run; a compilation that would end past it is skipped and recorded",
    )
    p.add_argument(
        "--compile-only", action="store_true", help="compile every variant once, time nothing (fills the caches)"
    )
    p.add_argument("--no-dense", action="store_true", help="with --compile-only: leave the dense model out")
    p.add_argument(
        "--no-triton-squeeze",
        action="store_true",
        help="serve tokenreduce's operators with the reference kernels (enable_triton_kernels(False))",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.models = args.models or list(GPU_MODELS if cuda else ("deit_small_patch16_224",))
    args.timings = args.timings or parse_timings(TIMINGS["cuda" if cuda else "cpu"])
    args.amp = args.amp or ("bf16" if cuda else "none")
    args.iters = args.iters or (30 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.quick:
        args.repeats, args.warmup, args.iters = 2, 1, min(args.iters, 5)
    return args


def model_spec(spec: str, img_size: int | None) -> tuple[str, int, str]:
    """``NAME`` or ``NAME@PIXELS`` -> (timm name, pixels, row label). Pixels: the spec's, else
    --img-size, else timm's own for the model; the label is the spec as given."""
    from tokenreduce.bench.models import native_img_size

    name, at, size = spec.rpartition("@")
    if not (at and size.isdigit() and name):
        name, size = spec, None
    pixels = int(size) if size else (img_size or native_img_size(name))
    return name, pixels, spec


def plan_for(model: str, args: argparse.Namespace):
    """(methods, ratios, locs): hybrids take their papers' settings and the library's sites."""
    hybrid = next((p for p in HYBRID_RATIOS if model.startswith(p)), None)
    default_ratios = [0.7, 0.5] if args.device.startswith("cuda") else [0.7]
    if hybrid:
        return args.methods or list(HYBRID_METHODS), args.ratios or list(HYBRID_RATIOS[hybrid]), None
    return args.methods or list(METHODS), args.ratios or default_ratios, args.locs


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataclasses

    import torch

    from tokenreduce import bench, ops
    from tokenreduce.bench.env import allow_many_compiles
    from tokenreduce.bench.models import load_model
    from tokenreduce.bench.protocol import Protocol
    from tokenreduce.bench.side_by_side import compile_variants

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            log("CUDA is not available: pass --device cpu")
            return 2
        if args.no_triton_squeeze:  # else the package's default (TOKENREDUCE_TRITON)
            ops.enable_triton_kernels(False)
    allow_many_compiles()
    base = Protocol(
        device=args.device,
        amp=args.amp,
        img_size=args.img_size or 224,
        timings=args.timings,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        kernels=args.kernels,
        budget_s=args.budget,
    )
    os.makedirs(args.out, exist_ok=True)
    t0, total = time.time(), None
    for spec in args.models:
        name, pixels, label = model_spec(spec, args.img_size)
        methods, ratios, locs = plan_for(name, args)
        budget = args.budget
        if args.deadline is not None:
            left = args.deadline - (time.time() - t0)
            budget = left if budget is None else min(budget, left)
        protocol = dataclasses.replace(base, img_size=pixels, budget_s=budget)
        say = lambda m: log(f"[{time.time() - t0:6.0f} s] {m}")  # noqa: E731
        log(f"\n== {label}: {', '.join(methods)} at keep {', '.join(map(str, ratios))}, {pixels} px")
        say(f"{label}: building the model (random weights)")
        dense = load_model(name, img_size=pixels).dense
        if args.compile_only:
            example = torch.randn(2, 3, pixels, pixels, device=args.device)
            modules, _ = bench.build_variants(label, dense.to(args.device), methods, ratios, locs, example)
            if args.no_dense:
                modules.pop("dense")
            compile_variants(modules, protocol, say)
            continue
        result = bench.measure(label, protocol, dense=dense, methods=methods, ratios=ratios, locs=locs, progress=say)
        if total is None:
            total = result
            total.meta["models"] = []
        else:
            total.rows += result.rows
        total.meta["models"].append(
            {
                "model": label,
                "img_size": pixels,
                "elapsed_s": result.meta["elapsed_s"],
                "load_after": result.meta.get("load_after"),
            }
        )
        sizes = sorted({m["img_size"] for m in total.meta["models"]})
        total.meta["protocol"]["img_size"] = sizes[0] if len(sizes) == 1 else "/".join(map(str, sizes)) + " (per model)"
        total.meta["protocol"]["budget_s"] = args.budget
        total.meta["args"] = vars(args)
        with open(os.path.join(args.out, "throughput.json"), "w") as f:
            json.dump(total.to_dict(), f, indent=1, default=str)
        with open(os.path.join(args.out, "throughput.md"), "w") as f:
            f.write(bench.markdown(total) + "\n")
    if total is None:
        log(f"\ndone in {time.time() - t0:.0f} s (compile only: nothing timed)")
        return 0
    log(f"\ndone in {time.time() - t0:.0f} s; wrote {args.out}/throughput.json and throughput.md\n")
    log(bench.markdown(total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
