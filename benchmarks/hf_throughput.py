#!/usr/bin/env python3
"""Throughput of Hugging Face ``transformers`` models, dense, limit and reduced, side by side.

The protocol of docs/benchmarks.md (``tokenreduce.bench.measure``) on a ``transformers`` model
built from its default config with random weights (ViT-B/16 at 224 px for ``vit``), its attention
left at the library's default (sdpa). Writes ``hf_throughput.json`` / ``.md`` under --out.

    python benchmarks/hf_throughput.py                         # GPU: ViT-B/16, etps and dtps at 0.7
    python benchmarks/hf_throughput.py --device cpu --quick --models vit-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import parse_timings  # noqa: E402

MODELS = {  # name -> (config class, model class, config overrides)
    "vit": ("ViTConfig", "ViTForImageClassification", {}),
    "dinov2-s": ("Dinov2Config", "Dinov2ForImageClassification", dict(hidden_size=384, num_attention_heads=6)),
    "vit-tiny": (  # a smoke-test size
        "ViTConfig",
        "ViTForImageClassification",
        dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=128, image_size=64),
    ),
}


def build(name: str, img_size: int | None):
    import transformers

    cfg_name, cls_name, overrides = MODELS[name]
    cfg = getattr(transformers, cfg_name)(**overrides)
    if img_size is not None:
        cfg.image_size = img_size
    return getattr(transformers, cls_name)(cfg).eval(), cfg.image_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p.add_argument("--models", type=csv, default=["vit"], help=f"of {', '.join(MODELS)}")
    p.add_argument("--methods", type=csv, default=["etps", "dtps"])
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--timings", type=parse_timings, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args(argv)

    from tokenreduce import bench
    from tokenreduce.bench.protocol import Protocol

    cuda = args.device.startswith("cuda")
    timings = args.timings or parse_timings("256:default" if cuda else "8:eager")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.models:
        dense, pixels = build(name, args.img_size)
        protocol = Protocol(
            device=args.device,
            amp=args.amp or ("bf16" if cuda else "none"),
            img_size=pixels,
            timings=timings,
            iters=2 if args.quick else 30,
            warmup=1 if args.quick else 10,
            repeats=2 if args.quick else 5,
        )
        result = bench.measure(
            f"hf-{name}", protocol, dense=dense, methods=args.methods, ratios=(args.keep_ratio,), progress=print
        )
        results.append(result)
        with open(os.path.join(args.out, "hf_throughput.json"), "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1, default=str)
        with open(os.path.join(args.out, "hf_throughput.md"), "a" if len(results) > 1 else "w") as f:
            f.write(bench.markdown(result) + "\n")
        print(bench.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
