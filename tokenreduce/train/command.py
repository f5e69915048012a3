"""The ``finetune`` and ``evaluate`` subcommands (``tokenreduce finetune ...``); no torch at import.

    tokenreduce finetune --dataset mnist5k --method none --output runs/teacher --epochs 60 --lr 1e-3
    tokenreduce finetune --dataset mnist5k --initial-checkpoint runs/teacher/last.pth --method dtps \\
        --locs 3,6,9 --keep-ratio 0.5 --recipe tps --output runs/dtps --amp
    tokenreduce evaluate runs/dtps/last.pth --dataset mnist5k
    torchrun --standalone --nproc_per_node=2 -m tokenreduce.cli finetune ...      # DDP, one process per GPU

Flags share timm ``train.py``'s names where they mean the same; a recipe flag left out keeps the
recipe's value. Also runnable as ``python -m tokenreduce.train.command finetune ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

__all__ = ["add_parsers", "run", "main"]

# recipe fields settable from the command line: (flag, field, type, help)
_RECIPE_FLAGS = (
    ("--epochs", "epochs", int, "number of epochs"),
    ("--lr", "lr", float, "learning rate at the recipe's reference batch (--lr-base-size)"),
    ("--lr-base-size", "batch_ref", int, "the global batch --lr is given for (linear scaling)"),
    ("--min-lr", "min_lr", float, "cosine floor"),
    ("--warmup-lr", "warmup_lr", float, "warm-up start"),
    ("--warmup-epochs", "warmup_epochs", int, "warm-up epochs"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--opt", "opt", str, "timm optimizer name"),
    ("--sched", "sched", str, "timm scheduler name"),
    ("--mixup", "mixup", float, "mixup alpha (0: off)"),
    ("--cutmix", "cutmix", float, "cutmix alpha (0: off)"),
    ("--smoothing", "smoothing", float, "label smoothing"),
    ("--model-ema-decay", "model_ema_decay", float, "EMA decay"),
    ("--drop-path", "drop_path", float, "drop-path rate (set when the model is built)"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this"),
    ("--ratio-weight", "ratio_weight", float, "weight of the ratio loss"),
    ("--distill-weight", "distill_weight", float, "weight of the logit + token distillation"),
    ("--token-loss", "token_loss", str, "token distillation: kl, mse or none"),
    ("--backbone-lr-scale", "backbone_lr_scale", float, "lr scale of everything but the score heads"),
    ("--freeze-backbone-epochs", "freeze_backbone_epochs", int, "epochs with the backbone frozen"),
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist5k", help="built-in set: mnist5k (default) or digits")
    p.add_argument(
        "--data-dir",
        default=None,
        help="an ImageFolder tree (train/, val/) or a .npz of a built-in set (save_builtin_npz)",
    )
    p.add_argument("-b", "--batch-size", type=int, default=128, help="per process (default 128)")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    p.add_argument(
        "--amp-dtype",
        default="bfloat16",
        choices=("bfloat16", "float16"),
        help="autocast dtype; float16 uses a grad scaler",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("-j", "--workers", type=int, default=4, help="loader workers (ImageFolder only)")


def add_parsers(subparsers) -> None:
    """Add ``finetune`` and ``evaluate`` to the CLI's ``argparse`` subparsers (``set_defaults(func=run)``)."""
    ft = subparsers.add_parser(
        "finetune",
        help="fine-tune a reduced model (or train a dense one) with a recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ft.add_argument("--model", default=None, help="timm model name (default: the built-in set's digit ViT)")
    ft.add_argument(
        "--initial-checkpoint",
        default=None,
        help="dense weights: a finetune checkpoint of a dense run or a plain state_dict",
    )
    ft.add_argument("--teacher", default=None, help="teacher checkpoint (default: the initial dense model)")
    ft.add_argument("--method", default="dtps", help="etps, evit, dtps, dynamicvit, or none (train the dense model)")
    ft.add_argument("--locs", default=None, help="sites, e.g. 3,6,9 (default: the model's)")
    ft.add_argument("--keep-ratio", default="0.7", help="a ratio or one per site (default 0.7)")
    ft.add_argument("--recipe", default=None, help="tps, dynamicvit, evit or deit (default: by method)")
    for flag, field, typ, help_ in _RECIPE_FLAGS:
        ft.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    ema = ft.add_mutually_exclusive_group()
    ema.add_argument("--model-ema", dest="model_ema", action="store_true", default=None, help="keep an EMA")
    ema.add_argument("--no-model-ema", dest="model_ema", action="store_false", help="no EMA")
    ft.add_argument("--output", default=None, help="folder for last.pth, log.jsonl, config.json")
    ft.add_argument("--resume", default=None, help="a last.pth to continue from")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--translate", type=int, default=None, help="built-in sets: random shift in px")
    ft.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _common(ft)
    ft.set_defaults(func=run, train_command="finetune")
    ev = subparsers.add_parser("evaluate", help="accuracy, kept tokens and images/s of a checkpoint")
    ev.add_argument("checkpoint", help="a finetune checkpoint (last.pth)")
    ev.add_argument("--model-ema", action="store_true", help="evaluate the EMA weights")
    _common(ev)
    ev.set_defaults(func=run, train_command="evaluate")


def _dense(args, drop_path: float | None):
    import timm

    from . import teacher as teachers
    from .state import load_finetuned, read_checkpoint

    name = args.model or teachers.TEACHERS.get(args.dataset)
    if name is None:
        raise ValueError(f"--model: required with --dataset {args.dataset!r}")
    kwargs = {"drop_path_rate": drop_path} if drop_path else {}
    if args.initial_checkpoint is None:
        return timm.create_model(name, pretrained=False, **kwargs), name, kwargs
    from ..errors import TokenReduceError

    try:
        ck = read_checkpoint(args.initial_checkpoint)
    except TokenReduceError:  # a plain state_dict
        ck = None
    model = timm.create_model(name, pretrained=False, **kwargs)
    if ck is not None and "dense" in ck:
        load_finetuned(args.initial_checkpoint, model)
    else:
        import torch

        sd = torch.load(args.initial_checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd)
    return model, name, kwargs


def run(args) -> int:
    """Run a parsed ``finetune`` or ``evaluate``; prints the result (rank 0)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from .loop import evaluate, finetune

    amp = args.amp_dtype if args.amp else None
    data = dict(dataset=args.dataset, data_dir=args.data_dir)
    if args.train_command == "evaluate":
        from . import distributed
        from .loop import _loaders
        from .recipes import get_recipe
        from .state import load_finetuned

        info = distributed.init(args.device)
        model = load_finetuned(args.checkpoint, map_location=info.device, ema=args.model_ema)
        _, val, _, _ = _loaders(
            args.dataset,
            args.data_dir,
            model,
            args.batch_size,
            recipe=get_recipe("deit"),
            seed=0,
            info=info,
            workers=args.workers,
            translate=0,
        )
        result = evaluate(model, val, device=info.device, amp_dtype=amp, info=info)
        if info.is_main:
            print(json.dumps(result))
        distributed.shutdown(info)
        return 0
    overrides = {field: getattr(args, field) for _, field, _, _ in _RECIPE_FLAGS}
    overrides["model_ema"] = args.model_ema
    method = None if args.method in ("none", "dense") else args.method
    from ..cli import parse_keep, parse_locs
    from .loop import DEFAULT_RECIPES
    from .recipes import get_recipe

    recipe = get_recipe(
        args.recipe or DEFAULT_RECIPES.get(method, "tps"), **{k: v for k, v in overrides.items() if v is not None}
    )
    model, name, model_kwargs = _dense(args, recipe.drop_path)  # drop-path is set when the model is built
    teacher = None
    if args.teacher is not None:
        from .state import load_finetuned

        teacher = load_finetuned(args.teacher)
    result = finetune(
        model,
        method=method,
        locs=parse_locs(args.locs),
        keep_ratio=parse_keep(args.keep_ratio),
        recipe=args.recipe,
        teacher=teacher,
        batch_size=args.batch_size,
        output=args.output,
        resume=args.resume,
        amp_dtype=amp,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        translate=args.translate,
        progress=not args.no_progress,
        model_name=name,
        model_kwargs=model_kwargs,
        **data,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if int(os.environ.get("RANK", "0")) == 0 and result.history:
        last = result.history[-1]
        print(
            json.dumps(
                {
                    "epoch": last["epoch"],
                    "eval": last.get("eval"),
                    "eval_ema": last.get("eval_ema"),
                    "before": result.history[0].get("before"),
                    "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                }
            )
        )
    from . import distributed

    distributed.shutdown(distributed.init(args.device))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenreduce.train.command finetune|evaluate ...`` (the same as ``tokenreduce ...``)."""
    parser = argparse.ArgumentParser(prog="tokenreduce")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    from ..errors import TokenReduceError

    try:
        return args.func(args)
    except (TokenReduceError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"tokenreduce {args.train_command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
