"""The ``tokenreduce`` command: ``demo``, ``inspect`` and ``summary``.

    tokenreduce demo [--model deit_small_patch16_224] [--batch 8] [--threads N] [--iters 5]
    tokenreduce inspect deit_small_patch16_224 [--img-size 224]
    tokenreduce summary deit_small_patch16_224 --method etps [--locs 3,6,9] [--keep-ratio 0.7]

Models are timm names (``pvt_*`` and ``cvt_*`` come from :mod:`tokenreduce.backbones`), built
with random weights (``pretrained=False``): structure, token counts, FLOPs and speed do not depend
on the weights, accuracy does, and no command here reports accuracy.

This module is the user interface, so it prints; the library itself logs. A request tokenreduce
cannot serve (``TokenReduceError``, ``ValueError``, ``TypeError``) prints one line to stderr and
exits with status 2, as argparse does for a malformed command line.
"""

from __future__ import annotations

import argparse
import difflib
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

from . import api
from .errors import TokenReduceError

__all__ = ["main"]

DEMO_METHODS = ("etps", "evit", "dtps", "dynamicvit")
DEMO_LOCS = (3, 6, 9)
DEMO_KEEP = 0.7
INSPECT_HEAD_LINES = 8  # demo: title, header, rule and the first blocks of the model map


def build_model(name: str, img_size: int | None = None) -> tuple[nn.Module, torch.Tensor | None]:
    """``timm.create_model(name, pretrained=False)`` in eval mode, and an example batch when
    ``img_size`` is given (else None: tokenreduce takes the size from timm's config).

    ``img_size`` also goes to the constructor where it takes one (a ViT's position embedding is
    sized by it); a fully convolutional stem (CvT) takes any size and has no such argument.
    """
    import timm

    from . import backbones  # noqa: F401  (registers pvt_* / cvt_* with timm)

    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar names: {', '.join(near)}" if near else ""
        raise ValueError(f"model: timm has no model {name!r}{hint}")
    if img_size is None:
        return timm.create_model(name, pretrained=False).eval(), None
    if img_size <= 0:
        raise ValueError(f"--img-size: must be a positive number of pixels, got {img_size}")
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        model = timm.create_model(name, pretrained=False)
    return model.eval(), torch.randn(2, 3, img_size, img_size)


def parse_locs(text: str | None) -> list[int | str] | None:
    """``"3,6,9"`` -> ``[3, 6, 9]``; block paths stay strings (``"stages.2.blocks.3"``)."""
    if text is None:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def parse_keep(text: str) -> float | list[float]:
    """``"0.7"`` -> 0.7; ``"0.7,0.49,0.343"`` -> one ratio per site."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--keep-ratio: expected a number or comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--keep-ratio: empty")
    return values[0] if len(values) == 1 else values


def tokens_after_sites(reduced: nn.Module) -> list[int]:
    """Tokens in the stream (prefix included) right after each site of ``reduced``'s plan."""
    plan = reduced.meta["tokenreduce"].plan
    return [s.num_prefix + s.n_out for s in plan.sites]


def time_round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns: every round calls each function
    once, so load from other processes falls on all of them alike rather than on one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(rounds, 1)):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(r, widths, right))  # noqa: E731
    return "\n".join([fmt(rows[0]).rstrip(), "  ".join("-" * w for w in widths), *(fmt(r).rstrip() for r in rows[1:])])


def cmd_demo(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch < 1:
        raise ValueError(f"--batch: must be >= 1, got {args.batch}")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, _ = build_model(args.model)
    print(f"tokenreduce demo: {args.model} with random weights (pretrained=False): tokens, FLOPs and "
          f"speed only, no accuracy.")

    model_map = api.inspect(model)
    lines = model_map.table().splitlines()
    print(f"\n== tokenreduce.inspect(model), first {INSPECT_HEAD_LINES} lines ==")
    print("\n".join(lines[:INSPECT_HEAD_LINES]))
    if len(lines) > INSPECT_HEAD_LINES:
        print(f"... ({len(model_map.blocks)} blocks in all)")

    locs, keep = list(DEMO_LOCS), DEMO_KEEP
    reduced: dict[str, nn.Module] = {}
    summaries: dict[str, api.Summary] = {}
    for method in DEMO_METHODS:
        torch.manual_seed(0)  # dTPS / DynamicViT score heads: the same random init every run
        reduced[method] = api.apply(model, method=method, locs=locs, keep_ratio=keep).eval()
        summaries[method] = api.summary(reduced[method])
    print(f"\n== tokenreduce.summary(tokenreduce.apply(model, method={DEMO_METHODS[0]!r}, locs={locs}, "
          f"keep_ratio={keep})) ==")
    print(summaries[DEMO_METHODS[0]])

    shape = reduced[DEMO_METHODS[0]].meta["tokenreduce"].example_shape
    x = torch.randn(args.batch, *shape[1:])
    fns = {"dense": lambda: model(x)} | {m: (lambda r=r: r(x)) for m, r in reduced.items()}
    with torch.no_grad():
        secs = time_round_robin(fns, rounds=args.iters, warmup=args.warmup)
    img_s = {k: args.batch / s for k, s in secs.items()}

    dense_tokens = model_map.blocks[0].num_tokens
    rows = [("method", "GFLOPs (dense -> reduced)", "tokens after sites", "img/s", "speed-up")]
    rows.append(("dense", f"{summaries[DEMO_METHODS[0]].gflops_dense:.2f}", str(dense_tokens),
                 f"{img_s['dense']:.1f}", "1.00x"))
    for method, s in summaries.items():
        rows.append((
            method, f"{s.gflops_dense:.2f} -> {s.gflops_reduced:.2f}",
            " / ".join(map(str, tokens_after_sites(reduced[method]))),
            f"{img_s[method]:.1f}", f"{img_s[method] / img_s['dense']:.2f}x",
        ))
    print(f"\n== all methods, locs {locs}, keep {keep}: CPU, fp32, eval, no_grad, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), median of {args.iters} round(s) after {args.warmup} warm-up ==")
    print(_table(rows, right=(False, False, False, True, True)))
    print(f"\nTimings are of this machine and its current load (other processes count); "
          f"benchmarks/cpu.py measures more carefully. Demo took {time.perf_counter() - t_start:.0f} s.")


def cmd_inspect(args: argparse.Namespace) -> None:
    model, example = build_model(args.model, args.img_size)
    print(api.inspect(model, example_input=example))


def cmd_summary(args: argparse.Namespace) -> None:
    model, example = build_model(args.model, args.img_size)
    torch.manual_seed(0)
    reduced = api.apply(model, method=args.method, locs=parse_locs(args.locs),
                        keep_ratio=parse_keep(args.keep_ratio), example_input=example)
    print(api.summary(reduced))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Token reduction (TPS, EViT, DynamicViT) for vision transformers as a torch.fx pass.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,inspect,summary}")

    demo = sub.add_parser("demo", help="inspect a model, reduce it four ways, compare FLOPs and CPU speed")
    demo.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    demo.add_argument("--batch", type=int, default=8, help="images per timed call (default 8)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    demo.add_argument("--iters", type=int, default=5, help="timed rounds, median reported (default 5)")
    demo.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    demo.set_defaults(func=cmd_demo)

    insp = sub.add_parser("inspect", help="print the model map: blocks, attention, prefix tokens, sites")
    insp.add_argument("model", help="timm model name (pvt_* / cvt_* included)")
    insp.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: timm's)")
    insp.set_defaults(func=cmd_inspect)

    summ = sub.add_parser("summary", help="reduce a model and print tokens per block, GFLOPs and params")
    summ.add_argument("model", help="timm model name (pvt_* / cvt_* included)")
    summ.add_argument("--method", required=True, help="etps, evit, dtps, dynamicvit or a registered method")
    summ.add_argument("--locs", default=None,
                      help="comma-separated block indices or paths (default: the model's paper sites)")
    summ.add_argument("--keep-ratio", default="0.7", help="a ratio, or one per site comma-separated")
    summ.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: timm's)")
    summ.set_defaults(func=cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TokenReduceError, ValueError, TypeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception text holds
        print(f"tokenreduce {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
