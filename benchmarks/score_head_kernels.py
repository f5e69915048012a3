#!/usr/bin/env python3
"""The dTPS score head alone at DeiT-T/S/B's and PVT-Tiny's sites: unfused against fused.

For each site shape (B, P, n, C), with the stream in fp32 and bf16 autocast as in the models:
the GPU time of the head's keep log-probability compiled from the module (Inductor's kernels and
cuBLAS GEMMs), run eagerly from the module, and from the fused operator (eager; under
``torch.compile`` ``keep_log_prob`` takes the module), and of each candidate tiling of the two
Triton kernels: ``triton.testing.do_bench_cudagraph`` medians in us (replayed in a CUDA graph: no
host time). For the eager forms also the wall time per call (``do_bench``: launches included).
Every output is checked against the unfused one (the largest difference is printed). Writes
JSON under --out.

    PYTHONPATH=. python3 benchmarks/score_head_kernels.py
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing

from tokenreduce.ops import ScoreHead
from tokenreduce.ops import score_head_triton as sht

SHAPES = [  # (label, B, P, n, C): dtps@0.7 at locs [3, 6, 9] sees 196, 137 and 96 patch tokens
    ("T s1", 256, 1, 196, 192), ("S s1", 256, 1, 196, 384), ("S s2", 256, 1, 137, 384),
    ("S s3", 256, 1, 96, 384), ("B s1", 256, 1, 196, 768), ("S s1 b1", 1, 1, 196, 384),
    ("PVT s2", 256, 0, 784, 128), ("PVT s3", 256, 0, 196, 320),
]
TILINGS = [  # (BLOCK_M, BLOCK_N = BLOCK_K, embed warps, classify warps, stages)
    (64, 64, 4, 4, 2), (64, 64, 4, 4, 3), (32, 64, 4, 4, 2), (128, 64, 8, 8, 2), (64, 32, 4, 4, 2),
    (64, 128, 4, 8, 2), (128, 64, 4, 4, 2), (64, 64, 8, 8, 2), (32, 32, 4, 4, 2),
]


def params_of(head: ScoreHead) -> tuple[torch.Tensor, ...]:
    e, c = head.embed, head.classify
    return (e[0].weight, e[0].bias, e[1].weight, e[1].bias, c[0].weight, c[0].bias,
            c[2].weight, c[2].bias, c[4].weight, c[4].bias)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-sweep", action="store_true", help="only the default tiling")
    args = ap.parse_args()
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3  # noqa: E731
    rows = []
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for label, B, P, n, C in SHAPES:
            head = ScoreHead(C).cuda().eval()
            x = torch.randn(B, P + n, C, device="cuda")
            unfused = torch.compile(lambda t, h=head, p=P: h(t, None, p)[..., 0], fullgraph=True)
            ref = unfused(x).float()
            params = params_of(head)
            row = {"label": label, "B": B, "P": P, "n": n, "C": C}
            for name, fn in (("unfused_compiled", lambda: unfused(x)),
                             ("unfused_eager", lambda: head(x, None, P)[..., 0]),
                             ("fused", lambda: head.keep_log_prob(x, P))):
                row[name + "_us"] = bench(fn)
                # eager: host time counts (launches); do_bench syncs once around many calls
                row[name + "_wall_us"] = triton.testing.do_bench(fn, rep=50) * 1e3
                row[name + "_maxdiff"] = (fn().float() - ref).abs().max().item()
            tilings = {}
            for bm, bk, we, wc, stages in ([] if args.no_sweep else TILINGS):
                cfg = dict(sht._config(C), BLOCK_M=bm, BLOCK_N=bk, BLOCK_K=bk, EMBED_WARPS=we,
                           CLASSIFY_WARPS=wc, STAGES=stages)
                fn = lambda cfg=cfg: sht.score_head_keep_triton(x, params, P, 1e-5, torch.bfloat16, config=cfg)  # noqa: E731
                try:
                    diff = (fn() - ref).abs().max().item()
                    tilings[str((bm, bk, we, wc, stages))] = {"us": bench(fn), "maxdiff": diff}
                except Exception as err:  # out of shared memory / registers for this shape
                    tilings[str((bm, bk, we, wc, stages))] = {"error": f"{type(err).__name__}: {err}"[:200]}
            row["tilings"] = tilings
            timed = {k: v["us"] for k, v in tilings.items() if "us" in v}
            best = min(timed, key=timed.get) if timed else None
            rows.append(row)
            print(f"{label:8s} GPU us: unfused compiled {row['unfused_compiled_us']:6.1f}, eager "
                  f"{row['unfused_eager_us']:6.1f}, fused {row['fused_us']:6.1f} (best tiling {best} "
                  f"{timed.get(best, float('nan')):.1f}) | wall us: eager {row['unfused_eager_wall_us']:6.1f}, "
                  f"fused {row['fused_wall_us']:6.1f} | maxdiff {row['fused_maxdiff']:.1e}", flush=True)
    meta = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name()}
    path = os.path.join(args.out, "score-head-kernels.json")
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
