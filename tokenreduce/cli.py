"""The ``tokenreduce`` command: ``demo``, ``inspect``, ``summary``, ``export``, ``benchmark`` and more.

    tokenreduce demo [--model deit_small_patch16_224] [--batch N] [--device cpu|cuda]
    tokenreduce inspect MODEL [--img-size PX] [--json]
    tokenreduce summary MODEL [--method etps] [--locs 3,6,9] [--keep-ratio 0.7] [--json]
    tokenreduce export MODEL|CHECKPOINT [--method etps] --format onnx|pt2 --out FILE
    tokenreduce benchmark MODEL [--method etps] --device cuda --batch 256,1 --amp bf16 --compile

MODEL is a timm name (tagged names such as ``deit_small_patch16_224.fb_in1k`` and ``hf-hub:``
names included; ``pvt_*`` and ``cvt_*`` come from :mod:`tokenreduce.backbones`), built with
random weights unless ``--pretrained`` or ``--checkpoint PATH`` gives them: structure, token
counts, FLOPs and speed do not depend on the weights, accuracy does.

This module is the user interface, so it prints; the library itself logs. Parsing imports no
torch (``--help`` is immediate); a command imports what it needs when it runs. A request
tokenreduce cannot serve (``TokenReduceError``, ``ValueError``, ``TypeError``) prints one line to
stderr and exits with status 2, as argparse does for a malformed command line.

Other packages add subcommands: each module of ``COMMAND_MODULES`` has ``add_parsers(subparsers)``,
called in that order, and imports no torch at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, Sequence

__all__ = [
    "COMMAND_MODULES",
    "add_model_arguments",
    "add_model_command",
    "apply_from_args",
    "build_parser",
    "load_from_args",
    "main",
    "parse_keep",
    "parse_locs",
]

COMMAND_MODULES = ("tokenreduce.bench.command", "tokenreduce.train.command", "tokenreduce.vis_command")
DEMO_METHODS = ("etps", "evit", "dtps", "dynamicvit")
DEMO_LOCS = (3, 6, 9)
DEMO_KEEP = 0.7
INSPECT_HEAD_LINES = 8  # demo: title, header, rule and the first blocks of the model map


def parse_locs(text: str | None) -> list[int | str] | None:
    """``"3,6,9"`` -> ``[3, 6, 9]``; block paths stay strings (``"stages.2.blocks.3"``)."""
    if text is None:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def parse_keep(text: str) -> float | list[float]:
    """``"0.7"`` -> 0.7; ``"0.7,0.49,0.343"`` -> ``[0.7, 0.49, 0.343]``."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--keep-ratio: expected a number or comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--keep-ratio: empty; give a ratio such as 0.7")
    return values[0] if len(values) == 1 else values


def _methods(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a method name such as etps")
    return names


def add_model_arguments(p: argparse.ArgumentParser, *, method: bool = True, method_list: bool = False) -> None:
    """MODEL, its weights and input size; with ``method``: --method, --locs and --keep-ratio."""
    p.add_argument(
        "model", metavar="MODEL", help="timm name (tagged and hf-hub: names too), or a tokenreduce checkpoint file"
    )
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads them)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="weights: a dense timm/PyTorch state dict, or a tokenreduce.save checkpoint",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: timm's)")
    if not method:
        return
    if method_list:
        p.add_argument(
            "--method",
            type=_methods,
            default=["etps"],
            help="comma-separated methods (default etps): etps, evit, dtps, dynamicvit or registered",
        )
        keep_help = "keep ratio; several comma-separated: one reduced model each (default 0.7)"
    else:
        p.add_argument("--method", default="etps", help="etps (default), evit, dtps, dynamicvit or a registered method")
        keep_help = "a keep ratio, or one per site comma-separated (default 0.7)"
    p.add_argument("--locs", default=None, help="comma-separated block indices or paths (default: the paper's sites)")
    p.add_argument("--keep-ratio", default="0.7", help=keep_help)


def add_model_command(sub, name: str, func: Callable, help: str, **model_options) -> argparse.ArgumentParser:
    """The subcommand ``name`` of a MODEL, run by ``func`` and described in ``--help`` by its docstring:
    a parser of ``sub`` with :func:`add_model_arguments` (``model_options``: ``method``, ``method_list``)."""
    p = sub.add_parser(name, help=help, description=func.__doc__)
    add_model_arguments(p, **model_options)
    p.set_defaults(func=func)
    return p


def load_from_args(args: argparse.Namespace):
    """``tokenreduce.bench.models.Loaded`` for the MODEL / --pretrained / --checkpoint / --img-size of ``args``."""
    from .bench.models import load_model

    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, img_size=args.img_size)


def apply_from_args(args: argparse.Namespace, dense, **options):
    """``tokenreduce.apply(dense, ...)`` with the --method / --locs / --keep-ratio / --img-size of ``args``
    and any other ``options`` of ``apply`` (e.g. ``aux=True``); seeded, so learned scorers get the same random
    head every run."""
    import torch

    import tokenreduce

    from .bench.models import example_batch

    torch.manual_seed(0)
    return tokenreduce.apply(
        dense,
        method=args.method,
        locs=parse_locs(args.locs),
        keep_ratio=parse_keep(args.keep_ratio),
        example_input=example_batch(args.img_size),
        **options,
    )


def _reduced_from_args(args: argparse.Namespace):
    """(dense, reduced): the checkpoint's reduced model, or ``apply`` with --method/--locs/--keep-ratio."""
    loaded = load_from_args(args)
    if loaded.reduced is not None:
        return loaded.dense, loaded.reduced.eval()
    return loaded.dense, apply_from_args(args, loaded.dense).eval()


def _json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1, default=str))


def _progress(msg: str) -> None:
    print(msg, flush=True)


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    import tokenreduce

    from .bench import load_average, round_robin
    from .bench.env import load_warning
    from .bench.models import load_model
    from .bench.table import format_table
    from .bench.variants import tokens_after_sites

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    if batch < 1:
        raise ValueError(f"--batch: must be >= 1, got {batch}")
    t_start = time.perf_counter()
    say = lambda msg: _progress(f"[{time.perf_counter() - t_start:5.1f} s] {msg}")  # noqa: E731
    say(f"building {args.model} with random weights (pretrained=False): tokens, FLOPs and speed only, no accuracy")
    torch.manual_seed(0)
    model = load_model(args.model).dense
    say("tracing it: tokenreduce.inspect(model)")
    model_map = tokenreduce.inspect(model)
    lines = model_map.table().splitlines()
    print(f"\n== tokenreduce.inspect(model), first {INSPECT_HEAD_LINES} lines ==")
    print("\n".join(lines[:INSPECT_HEAD_LINES]))
    if len(lines) > INSPECT_HEAD_LINES:
        print(f"... ({len(model_map.blocks)} blocks in all)\n")

    locs, keep = list(DEMO_LOCS), DEMO_KEEP
    reduced, summaries = {}, {}
    for method in DEMO_METHODS:
        say(f"tokenreduce.apply(model, method={method!r}, locs={locs}, keep_ratio={keep}) and its summary")
        torch.manual_seed(0)  # dTPS / DynamicViT score heads: the same random init every run
        reduced[method] = tokenreduce.apply(model, method=method, locs=locs, keep_ratio=keep).eval()
        summaries[method] = tokenreduce.summary(reduced[method])
    print(
        f"\n== tokenreduce.summary(tokenreduce.apply(model, method={DEMO_METHODS[0]!r}, locs={locs}, "
        f"keep_ratio={keep})) =="
    )
    print(summaries[DEMO_METHODS[0]])
    print()

    shape = reduced[DEMO_METHODS[0]].meta["tokenreduce"].example_shape
    x = torch.randn(batch, *shape[1:], device=device)
    modules = {"dense": model.to(device)} | {m: r.to(device) for m, r in reduced.items()}
    fns = {k: (lambda m=m: m(x)) for k, m in modules.items()}
    amp = "bf16 autocast" if cuda else "fp32"
    threads = torch.get_num_threads()
    if not cuda:
        say(f"CPU load average {' '.join(f'{v:.2f}' for v in load_average() or ())} with {threads} torch thread(s)")
    say(
        f"timing dense and {len(reduced)} reduced models in turns on {device.type} ({amp}, batch {batch}): "
        f"{args.warmup} warm-up call(s), then {args.iters} round(s)"
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        per_call = round_robin(fns, device, iters=1, warmup=args.warmup, repeats=args.iters)
    import statistics

    img_s = {k: batch * 1e3 / statistics.median(v) for k, v in per_call.items()}
    rows = [("method", "GFLOPs (dense -> reduced)", "tokens after sites", "img/s", "vs dense")]
    rows.append(
        (
            "dense",
            f"{summaries[DEMO_METHODS[0]].gflops_dense:.2f}",
            str(model_map.blocks[0].num_tokens),
            f"{img_s['dense']:.1f}",
            "1.00x",
        )
    )
    for method, s in summaries.items():
        rows.append(
            (
                method,
                f"{s.gflops_dense:.2f} -> {s.gflops_reduced:.2f}",
                " / ".join(map(str, tokens_after_sites(reduced[method]))),
                f"{img_s[method]:.1f}",
                f"{img_s[method] / img_s['dense']:.2f}x",
            )
        )
    print(
        f"\n== all methods, locs {locs}, keep {keep}: {device.type}, {amp}, eval, no_grad, batch {batch}"
        + ("" if cuda else f", {threads} thread(s)")
        + f", median of {args.iters} round(s) =="
    )
    print(format_table(rows, right=(False, False, False, True, True)))
    note = None if cuda else load_warning(threads)
    print(
        "\n"
        + (f"Note: {note}." if note else "Timings are of this machine and its current load.")
        + " `tokenreduce benchmark MODEL --compile` compares with the limit and compiled models"
        + f". Demo took {time.perf_counter() - t_start:.0f} s."
    )


def _model_map_dict(mm) -> dict:
    blocks = []
    for b in mm.blocks:
        sites = ["before"] + (["after-attn"] if b.has_class_token and b.attn.full_keys else [])
        blocks.append(
            {
                "index": b.index,
                "path": b.path,
                "stage": b.stage,
                "attention": b.attn.kind,
                "heads": b.attn.num_heads,
                "head_dim": b.attn.head_dim,
                "tokens": b.num_tokens,
                "prefix": b.num_prefix,
                "class_token": b.has_class_token,
                "dim": b.dim,
                "sites": sites,
            }
        )
    return {
        "model": mm.model_name,
        "input_shape": list(mm.example_shape),
        "blocks": blocks,
        "spatial_sites": len(mm.to_grid),
        "grid_returns": len(mm.from_grid),
        "notes": list(mm.notes),
    }


def cmd_inspect(args: argparse.Namespace) -> None:
    import tokenreduce

    from .bench.models import example_batch

    model = load_from_args(args).dense
    mm = tokenreduce.inspect(model, example_input=example_batch(args.img_size))
    _json(_model_map_dict(mm)) if args.json else print(mm)


def cmd_summary(args: argparse.Namespace) -> None:
    import dataclasses

    import tokenreduce

    _, reduced = _reduced_from_args(args)
    s = tokenreduce.summary(reduced)
    if not args.json:
        print(s)
        return
    _json(
        {
            "method": s.plan.method.name,
            "model": s.plan.model_name,
            "sites": [dataclasses.asdict(site) for site in s.plan.sites],
            "blocks": [{"index": i, "path": p, "attn_tokens": na, "mlp_tokens": nm} for i, p, na, nm in s.rows],
            "gflops_dense": s.gflops_dense,
            "gflops_reduced": s.gflops_reduced,
            "params_dense": s.params_dense,
            "params_reduced": s.params_reduced,
        }
    )


def cmd_export(args: argparse.Namespace) -> None:
    from .bench.models import example_batch
    from .errors import TokenReduceError

    try:
        export = importlib.import_module("tokenreduce.export")
    except ModuleNotFoundError as err:
        if err.name != "tokenreduce.export":
            raise
        raise TokenReduceError(
            "export: this installation has no tokenreduce.export module; update tokenreduce to export models"
        ) from None
    _progress(f"[export] {args.model}: building the reduced model")
    _, reduced = _reduced_from_args(args)
    _progress(
        f"[export] writing {args.format} to {args.out} (exporter {args.exporter}, "
        f"{'dynamic' if args.dynamic_batch else 'fixed'} batch)"
    )
    path = export.export(
        reduced,
        args.out,
        format=args.format,
        example_input=example_batch(args.img_size),
        dynamic_batch=args.dynamic_batch,
        exporter=args.exporter,
    )
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Token reduction (TPS, EViT, DynamicViT) for vision transformers as a torch.fx pass.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="inspect a model, reduce it four ways, compare FLOPs and speed")
    demo.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, bf16 there)")
    demo.add_argument("--batch", type=int, default=None, help="images per timed call (default 8 on cpu, 64 on cuda)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    demo.add_argument("--iters", type=int, default=5, help="timed rounds, median reported (default 5)")
    demo.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    demo.set_defaults(func=cmd_demo)

    insp = add_model_command(
        sub, "inspect", cmd_inspect, "print the model map: blocks, attention, prefix tokens, sites", method=False
    )
    insp.add_argument("--json", action="store_true", help="print the model map as JSON")

    summ = add_model_command(
        sub, "summary", cmd_summary, "reduce a model and print tokens per block, GFLOPs and params"
    )
    summ.add_argument("--json", action="store_true", help="print the summary as JSON")

    exp = add_model_command(sub, "export", cmd_export, "reduce a model and export it (ONNX or a torch.export program)")
    exp.add_argument("--format", choices=("onnx", "pt2"), required=True, help="onnx or pt2 (torch.export)")
    exp.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    exp.add_argument(
        "--no-dynamic-batch",
        dest="dynamic_batch",
        action="store_false",
        help="fix the batch size to the example's (default: dynamic batch)",
    )
    exp.add_argument(
        "--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="ONNX exporter (default dynamo)"
    )

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import tokenreduce

        print(f"tokenreduce {tokenreduce.__version__}")
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("tokenreduce: error: give a command (tokenreduce --help lists them)", file=sys.stderr)
        return 2
    from .errors import TokenReduceError

    try:
        status = args.func(args)  # a command may return its exit status (None: success)
    except (TokenReduceError, ValueError, TypeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception text holds
        print(f"tokenreduce {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokenreduce {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
