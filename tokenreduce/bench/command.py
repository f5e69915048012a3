"""``tokenreduce benchmark``: dense, the limit and the reduced model side by side, in one process.

    tokenreduce benchmark deit_small_patch16_224 --method etps --device cuda --batch 256,1 \\
        --amp bf16 --compile --mode reduce-overhead --json

No torch at module level: ``add_parsers`` runs on every ``tokenreduce --help``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers", "cmd_benchmark"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def add_parsers(sub) -> None:
    from ..cli import add_model_command

    p = add_model_command(
        sub, "benchmark", cmd_benchmark, "time dense, the limit and the reduced model side by side", method_list=True
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--batch",
        type=_ints,
        default=None,
        help="comma-separated batch sizes, e.g. 256,1 (default: 256 on cuda, 8 on cpu)",
    )
    p.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default=None,
        help="autocast dtype (default: bf16 on cuda, none on cpu)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument(
        "--mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode with --compile (default: torch's default)",
    )
    p.add_argument("--iters", type=int, default=None, help="calls per timed repeat (default: 30 cuda, 2 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 cuda, 1 cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5)")
    p.add_argument("--no-limit", action="store_true", help="leave the limit out")
    p.add_argument("--kernels", action="store_true", help="cuda: also record kernel times (torch.profiler)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")


def _say(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def cmd_benchmark(args: argparse.Namespace) -> None:
    """Dense model, the limit (the reduced model's plan with free sites) and the reduced model, built and
    timed in one process, in turns; see docs/benchmarks.md."""
    import json

    import torch

    from ..cli import load_from_args, parse_keep, parse_locs
    from . import measure, screen
    from .env import load_warning
    from .protocol import Protocol

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device(device).type == "cpu"
    batches = args.batch or ([8] if cpu else [256])
    modes = ["eager"] + ([args.mode] if args.compile else [])
    if cpu and args.kernels:
        raise ValueError("--kernels: kernel times come from CUDA; drop --kernels on --device cpu")
    _say(f"{args.model}: loading")
    loaded = load_from_args(args)
    cfg = getattr(loaded.dense, "pretrained_cfg", None) or {}
    img_size = args.img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    protocol = Protocol(
        device=device,
        amp=args.amp or ("none" if cpu else "bf16"),
        img_size=img_size,
        timings=tuple((b, m) for b in batches for m in modes),
        iters=args.iters or (2 if cpu else 30),
        repeats=args.repeats or 5,
        kernels=args.kernels,
        warmup=args.warmup if args.warmup is not None else (1 if cpu else 10),
    )
    if cpu:
        note = load_warning(torch.get_num_threads())
        _say(f"CPU, {torch.get_num_threads()} thread(s); " + (note or "the CPU is not loaded by other processes"))
    keep = parse_keep(args.keep_ratio)  # several ratios here: one reduced model for each
    ratios = keep if isinstance(keep, list) else [keep]
    result = measure(
        args.model,
        protocol,
        dense=loaded.dense,
        reduced=loaded.reduced,
        methods=args.method,
        ratios=ratios,
        locs=parse_locs(args.locs),
        limits=not args.no_limit,
        progress=_say,
    )
    if cpu:
        note = load_warning(torch.get_num_threads())
        if note:
            result.meta["load_note"] = note
            _say(note)
    print(json.dumps(result.to_dict(), indent=1, default=str) if args.json else screen(result))
