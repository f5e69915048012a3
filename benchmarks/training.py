#!/usr/bin/env python3
"""Training-step throughput of dense and token-reduced models: images/s, ms/step, x dense, peak MiB.

Through ``tokenreduce.bench.training``: per variant (dense, then each method at --keep-ratio,
at the model's default sites), one at a time: built from a fresh model, one checked step (the
loss finite, gradients finite and reaching the score heads and the classifier, parameters moved),
then the step timed eager and, with --compile, with the model ``torch.compile``d (the loss and
the AdamW step stay eager). A step is forward, ``finetune``'s loss for the method without a
teacher (cross-entropy, plus the ratio loss for dTPS / DynamicViT; --distill adds the frozen dense
teacher's forward and the distillation terms), backward and timm's AdamW step. Writes
``training.json`` and ``training.md`` under --out after every variant and prints the table.

    python benchmarks/training.py                                   # GPU: DeiT-S, batch 128, bf16, compiled
    python benchmarks/training.py --distill --methods dtps,etps
    python benchmarks/training.py --device cpu --quick --model vit_digits_tiny --batch 8 --no-compile
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from tokenreduce.bench.protocol import MODES
from tokenreduce.cli import parse_locs

METHODS = ("dense", "dtps", "dynamicvit", "etps", "evit")


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p.add_argument("--model", default="deit_small_patch16_224", help="a timm name (random weights)")
    p.add_argument("--methods", type=csv, default=list(METHODS), help=f"default {','.join(METHODS)}")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--locs", type=parse_locs, default=None, help="block indices or paths (default: the model's sites)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="default bf16 on cuda, none on cpu")
    p.add_argument("--distill", action="store_true", help="add the frozen dense teacher and the distillation terms")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    p.add_argument("--mode", choices=[m for m in MODES if m != "eager"], default="default", help="torch.compile mode")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    p.add_argument("--iters", type=int, default=None, help="steps per repeat (default 20 cuda, 2 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 cuda, 1 cpu)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of <= 2 steps, 1 warm-up step")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds; a compilation that would end past it is skipped"
    )
    p.add_argument("--kernels", action="store_true", help="record each step's kernel times (cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.amp = args.amp or ("bf16" if cuda else "none")
    args.compile = cuda if args.compile is None else args.compile
    args.iters = args.iters or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.quick:
        args.repeats, args.warmup, args.iters = 2, 1, min(args.iters, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from tokenreduce.bench.env import allow_many_compiles
    from tokenreduce.bench.training import TrainProtocol, measure_training
    from tokenreduce.bench.training_report import train_markdown, train_screen

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("CUDA is not available: pass --device cpu")
        return 2
    allow_many_compiles()
    locs = None if args.locs is None else tuple(args.locs)
    protocol = TrainProtocol(
        device=args.device,
        amp=args.amp,
        batch=args.batch,
        img_size=args.img_size,
        keep_ratio=args.keep_ratio,
        locs=locs,
        distill=args.distill,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        compile=args.compile,
        compile_mode=args.mode,
        compile_backend=args.backend,
        budget_s=args.budget,
        kernels=args.kernels,
    )
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    def write(result) -> None:
        result.meta["args"] = vars(args)
        with open(os.path.join(args.out, "training.json"), "w") as f:
            json.dump(result.to_dict(), f, indent=1, default=str)
        with open(os.path.join(args.out, "training.md"), "w") as f:
            f.write(train_markdown(result) + "\n")

    result = measure_training(
        args.model, protocol, args.methods, progress=lambda m: log(f"[{time.time() - t0:6.0f} s] {m}"), on_row=write
    )
    log(f"\ndone in {time.time() - t0:.0f} s; wrote {args.out}/training.json and training.md\n")
    log(train_screen(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
