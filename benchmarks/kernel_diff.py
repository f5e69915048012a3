#!/usr/bin/env python3
"""Where a compiled reduced model's GPU time goes, kernel by kernel, next to its limit.

Per variant (compiled, bf16 autocast): every kernel's GPU time per batch (``torch.profiler``,
5 calls), summed by family (GEMM, convolution, attention, squeeze, Inductor's Triton kernels,
other). With ``--code`` the Inductor output code of the named variants is saved too, so that
each ``triton_*`` kernel can be read back to the ops it fuses.

    PYTHONPATH=. python3 benchmarks/kernel_diff.py --model deit_small_patch16_224 \
        --variants limit:etps@0.7,reduced:etps@0.7 --code reduced:etps@0.7
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import kernel_times  # noqa: E402
from host_overhead import build  # noqa: E402

FAMILIES = (  # first match wins
    ("squeeze", r"_squeeze"),
    ("attention", r"sdpa|flash|fmha|attention"),
    ("conv", r"convolve|conv2d|implicit"),
    ("gemm", r"nvjet|gemm|gemv|cutlass|xmma|sm90_|ampere_"),
    ("inductor", r"^triton_"),
)


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name):
            return fam
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--variants", default="limit:etps@0.7,reduced:etps@0.7,limit:dtps@0.7,reduced:dtps@0.7")
    p.add_argument("--code", default="", help="comma-separated variants whose Inductor output code to save")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    rows = {}
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        cm = torch.compile(build(args.model, variant))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            if variant in args.code.split(","):
                from torch._inductor.utils import run_and_get_code

                _, code = run_and_get_code(cm, x)
                name = re.sub(r"[^A-Za-z0-9._-]", "_", f"code-{args.model}-{variant}.py")
                with open(os.path.join(args.out, name), "w") as f:
                    f.write("\n\n# ---- next graph ----\n\n".join(code))
            for _ in range(3):
                cm(x)
            kernels, _ = kernel_times(lambda: cm(x), 5, "cuda")
        fams: dict[str, float] = {}
        for k, v in kernels.items():
            fams[family(k)] = fams.get(family(k), 0.0) + v
        rows[variant] = dict(total_us=sum(kernels.values()), families_us=fams,
                             kernels_us={k[:120]: round(v, 1) for k, v in kernels.items()})
        print(f"\n== {variant}: {sum(kernels.values()):.0f} us per batch; "
              + ", ".join(f"{f} {v:.0f}" for f, v in sorted(fams.items(), key=lambda kv: -kv[1])))
        for k, v in kernels.items():
            print(f"  {v:8.1f}  {family(k):9s} {k[:110]}")
    with open(os.path.join(args.out, f"kernel-diff-{args.model}.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(), model=args.model,
                       batch=args.batch, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
