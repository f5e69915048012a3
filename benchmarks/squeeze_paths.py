#!/usr/bin/env python3
"""The squeeze's two CUDA paths side by side, at the sites of DeiT-T/S/B and a PVT-like stage.

Per site shape (B, P, n, k, C) and stream dtype: the two-kernel path (host search, merge), the
one-pass kernel with each candidate config and the split ``_one_pass_split`` picks (and one
program per image), and a copy of the kept rows (``x[:, :P + k].clone()``: what any site must at
least write). Times are GPU times in us, ``triton.testing.do_bench_cudagraph`` (each path
replayed in a CUDA graph: no host time, as under ``mode="reduce-overhead"``). Outputs that differ
from the two-kernel path's are counted (rows whose host flipped at a near-tie; any other
difference is a bug). Prints a table and writes JSON under --out.

    PYTHONPATH=. python3 benchmarks/squeeze_paths.py
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton
import triton.testing

from tokenreduce.ops import squeeze_triton as st

# (label, B, P, n, k, C): DeiT sites at keep 0.7 and 0.5, batch 256 and 1, and a PVT-like stage.
SHAPES = [
    ("S s1 .7", 256, 1, 196, 137, 384), ("S s2 .7", 256, 1, 137, 96, 384), ("S s3 .7", 256, 1, 96, 67, 384),
    ("S s1 .5", 256, 1, 196, 98, 384), ("S s2 .5", 256, 1, 98, 49, 384),
    ("B s1 .7", 256, 1, 196, 137, 768), ("T s1 .7", 256, 1, 196, 137, 192),
    ("S s1 .7 b1", 1, 1, 196, 137, 384), ("S s3 .7 b1", 1, 1, 96, 67, 384), ("B s1 .7 b1", 1, 1, 196, 137, 768),
    ("S s1 .7 b8", 8, 1, 196, 137, 384), ("S s1 .7 b32", 32, 1, 196, 137, 384),
    ("pvt2 .7", 64, 0, 784, 549, 128), ("pvt2 .7 b1", 1, 0, 784, 549, 128),
]
CONFIGS = [  # (BLOCK_R1, BLOCK_C1, BLOCK_R, BLOCK_C, warps, stages)
    (64, 64, 32, 64, 4, 2), (64, 32, 32, 64, 4, 3), (64, 64, 16, 64, 4, 2), (128, 32, 32, 64, 8, 3),
    (64, 128, 32, 64, 8, 2),
]


def one_pass(x, kept, pruned, P, split, cfg):
    """A launch of the one-pass kernel with config ``cfg`` (what ``_launch`` does with it)."""
    B, _, C = x.shape
    Nr, Np = kept.shape[1], pruned.shape[1]
    r1, c1, r, c, warps, stages = cfg
    y = torch.empty((B, P + Nr, C), device=x.device, dtype=x.dtype)
    keys = torch.empty((B, split, Np), device=x.device, dtype=torch.int64)
    block_p = st._block_p(Np)
    st._squeeze_one_pass_kernel[(B, split)](
        x, x, kept, pruned, keys, y, Nr, Np, C, P, split, *x.stride()[:2], *x.stride()[:2],
        *kept.stride(), *pruned.stride(), *y.stride()[:2], EPS=1e-6, PRECISION=st._precision(x.dtype),
        E=math.e, DOT_F32=False, HAS_IDX=True, ONE_P=block_p >= Np, BLOCK_P=block_p,
        BLOCK_R1=r1, BLOCK_C1=c1, BLOCK_R=r, BLOCK_C=c, num_warps=warps, num_stages=stages)
    return y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    print(f"{'site':<12} {'dtype':<9} {'copy':>6} {'2-kern':>7} {'split':>5} {'auto':>5} {'best 1-pass':>11} {'cfg':<24} {'split=1 best':>12}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for label, B, P, n, k, C in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(B, P + n, C, device="cuda", dtype=dtype, generator=g)
            order = torch.rand(B, n, device="cuda", generator=g).argsort(dim=1)
            kept, pruned = order[:, :k], order[:, k:]
            ref, _ = st._launch(x, x, kept, pruned, P, k, n - k, split=0)
            torch.cuda.synchronize()
            bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3  # noqa: E731
            row = dict(site=label, dtype=dtype_name, B=B, P=P, n=n, k=k, C=C)
            row["copy_us"] = bench(lambda: x[:, :P + k].clone())
            row["two_kernel_us"] = bench(lambda: st._launch(x, x, kept, pruned, P, k, n - k, split=0))
            split = st._one_pass_split(B, k, n - k, C, x.device)
            row["auto_split"] = split
            for s in sorted({split, 1} - {0}):
                for cfg in CONFIGS:
                    y = one_pass(x, kept, pruned, P, s, cfg)
                    off = ((y.float() - ref.float()).abs() > 1e-3 * ref.float().abs() + 1e-4).any(-1)  # (B, rows)
                    row[f"one_pass_s{s}_{cfg}"] = bench(lambda: one_pass(x, kept, pruned, P, s, cfg))
                    row[f"differs_s{s}_{cfg}"] = off.float().mean().item()
                    if off.float().mean() > 0.01:
                        row.setdefault("mismatch", []).append([s, cfg])
            rows.append(row)
            best = {s: min(((v, c) for c, v in row.items() if c.startswith(f"one_pass_s{s}_") and v), default=(math.nan, ""))
                    for s in {split, 1} - {0}}
            b_auto = best.get(split, (math.nan, ""))
            print(f"{label:<12} {dtype_name:<9} {row['copy_us']:6.1f} {row['two_kernel_us']:7.1f} {split:5d} "
                  f"{'1p' if split else '2k':>5} {b_auto[0]:11.1f} {b_auto[1][-24:]:<24} {best[1][0]:12.1f}"
                  + ("  MISMATCH" if "mismatch" in row else ""), flush=True)
    with open(os.path.join(args.out, "squeeze-paths.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
