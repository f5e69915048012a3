#!/usr/bin/env python3
"""The squeeze kernels alone, per tiling, at the sites of DeiT-S/B (batch 256 and 1) and PVT-Tiny.

For each site shape (B, P, n, k, C) and stream dtype: the GPU time of the host search and of both
merges (the fuse kernel, the update kernel) for each candidate tiling, the
default (``_launch``: the host search and the merge it picks, autotuned from their lists), and a
copy of the kept rows (``x[:, :P + k].clone()``).
Times are ``triton.testing.do_bench_cudagraph`` medians in us (replayed in a CUDA graph: no
host time). Every tiling's output is checked against the default's. Prints the best tiling per
kernel and writes JSON under --out.

    PYTHONPATH=. python3 benchmarks/squeeze_kernels.py
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

SHAPES = [  # (label, B, P, n, k, C)
    ("S s1 .7", 256, 1, 196, 137, 384),
    ("S s2 .7", 256, 1, 137, 96, 384),
    ("S s3 .7", 256, 1, 96, 67, 384),
    ("S s1 .5", 256, 1, 196, 98, 384),
    ("S s2 .5", 256, 1, 98, 49, 384),
    ("B s1 .7", 256, 1, 196, 137, 768),
    ("B s1 .5", 256, 1, 196, 98, 768),
    ("S s1 .7 b1", 1, 1, 196, 137, 384),
    ("S s2 .7 b1", 1, 1, 137, 96, 384),
    ("S s3 .7 b1", 1, 1, 96, 67, 384),
    ("B s1 .7 b1", 1, 1, 196, 137, 768),
    ("S s1 .7 b8", 8, 1, 196, 137, 384),
    ("S s1 .7 b32", 32, 1, 196, 137, 384),
    ("S s1 .7 b64", 64, 1, 196, 137, 384),
    # PVT-Tiny's sites (the starts of stages 2-4, no prefix token) at keep 0.7
    ("PVT s2 .7", 256, 0, 784, 549, 128),
    ("PVT s3 .7", 256, 0, 196, 137, 320),
    ("PVT s4 .7", 256, 0, 49, 34, 512),
]
HOSTS = [
    (p, r, c, w, s)
    for p in (16, 32, 64, 128)
    for r, c, w, s in (  # (BLOCK_P, BLOCK_R, BLOCK_C, warps, stages)
        (64, 16, 4, 4),
        (64, 32, 4, 3),
        (32, 32, 4, 3),
        (64, 64, 4, 2),
        (32, 16, 4, 4),
        (64, 32, 8, 3),
        (16, 16, 4, 4),
        (16, 32, 4, 3),
        (16, 64, 4, 2),
        (32, 64, 4, 2),
        (16, 64, 2, 2),
        (16, 128, 4, 2),
    )
]
FUSE = [  # (BLOCK_R, BLOCK_C, ROW_TILES, warps, stages); BLOCK_P: _block_p
    (32, 64, 1, 4, 2),
    (32, 32, 1, 4, 2),
    (16, 64, 1, 4, 2),
    (32, 128, 1, 4, 2),
    (64, 64, 1, 8, 2),
    (32, 64, 2, 4, 2),
]
UPDATE = [
    (p, r, c, w, s)
    for p in (128, 64, 32)
    for r, c, w, s in (  # (BLOCK_P, BLOCK_R, BLOCK_C, warps, stages)
        (32, 64, 4, 2),
        (32, 32, 4, 2),
        (64, 64, 8, 2),
        (32, 128, 8, 2),
        (32, 64, 8, 2),
        (16, 64, 4, 2),
        (64, 32, 4, 3),
    )
]


def hosts(x, kept, pruned, P, keys, cfg):
    bp, r, c, w, s = cfg
    B, _, C = x.shape
    Nr, Np = kept.shape[1], pruned.shape[1]
    keys.fill_(torch.iinfo(torch.int64).min)
    st._squeeze_hosts_kernel[(triton.cdiv(Nr, r), triton.cdiv(Np, bp), B)](
        x,
        x,
        kept,
        pruned,
        keys,
        Nr,
        Np,
        C,
        P,
        *x.stride()[:2],
        *x.stride()[:2],
        *kept.stride(),
        *pruned.stride(),
        EPS=1e-6,
        PRECISION=st._precision(x.dtype),
        DOT_F32=False,
        HAS_IDX=True,
        BLOCK_P=bp,
        BLOCK_R=r,
        BLOCK_C=c,
        num_warps=w,
        num_stages=s,
    )


def _merge_args(x, kept, pruned, P, keys, y):
    """The positional arguments both merge kernels take (indexed form, one stream)."""
    Nr, Np, C = kept.shape[1], pruned.shape[1], x.shape[2]
    strides = (*x.stride()[:2], *x.stride()[:2], *kept.stride(), *pruned.stride(), *y.stride()[:2])
    return (x, x, kept, pruned, keys, y, Nr, Np, C, P, *strides)


def fuse(x, kept, pruned, P, keys, y, cfg):
    r, c, t, w, s = cfg
    B, _, C = x.shape
    Nr, Np = kept.shape[1], pruned.shape[1]
    st._squeeze_fuse_kernel[(triton.cdiv(C, c), triton.cdiv(P + Nr, r * t), B)](
        *_merge_args(x, kept, pruned, P, keys, y),
        E=math.e,
        DOT_F32=False,
        HAS_IDX=True,
        ONE_P=st._block_p(Np) >= Np,
        BLOCK_R=r,
        BLOCK_P=st._block_p(Np),
        BLOCK_C=c,
        ROW_TILES=t,
        num_warps=w,
        num_stages=s,
    )


def update(x, kept, pruned, P, keys, y, cfg):
    bp, r, c, w, s = cfg
    B, _, C = x.shape
    st._squeeze_update_kernel[(triton.cdiv(C, c), B)](
        *_merge_args(x, kept, pruned, P, keys, y),
        E=math.e,
        DOT_F32=False,
        HAS_IDX=True,
        BLOCK_R=r,
        BLOCK_P=bp,
        BLOCK_C=c,
        num_warps=w,
        num_stages=s,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sweep", default="hosts,fuse,update", help="which kernels' tilings to time")
    p.add_argument("--sites", default="", help="only the sites whose label starts with this")
    p.add_argument("--batches", default="", help="only the sites of these batch sizes (comma-separated)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3  # noqa: E731
    rows = []
    print(
        f"{'site':<11} {'dtype':<8} {'copy':>5} {'default':>7} | {'hosts':>5} {'best':>5} {'cfg':<22} | "
        f"{'fuse':>5} {'best':>5} {'cfg':<24} | {'updt':>5} {'cfg':<22}"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        batches = {int(b) for b in args.batches.split(",") if b}
        sites = [s for s in SHAPES if s[0].startswith(args.sites) and (not batches or s[1] in batches)]
        for label, B, P, n, k, C in sites:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(B, P + n, C, device="cuda", dtype=dtype, generator=g)
            order = torch.rand(B, n, device="cuda", generator=g).argsort(dim=1)
            kept, pruned = order[:, :k], order[:, k:]
            Np = n - k
            ref, ref_keys = st._launch(x, x, kept, pruned, P, k, Np)
            torch.cuda.synchronize()
            row = dict(
                site=label,
                dtype=dtype_name,
                B=B,
                P=P,
                n=n,
                k=k,
                C=C,
                copy_us=bench(lambda: x[:, : P + k].clone()),
                default_us=bench(lambda: st._launch(x, x, kept, pruned, P, k, Np)),
                hosts={},
                fuse={},
                differs=[],
            )
            keys = torch.empty_like(ref_keys)
            for cfg in HOSTS if "hosts" in args.sweep else [(st._block_p(Np), *st._HOSTS_CONFIGS[0])]:
                hosts(x, kept, pruned, P, keys, cfg)
                if not torch.equal(st._hosts_of(keys), st._hosts_of(ref_keys)):
                    off = (st._hosts_of(keys) != st._hosts_of(ref_keys)).float().mean().item()
                    row["differs"].append(["hosts", cfg, off])
                row["hosts"][str(cfg)] = bench(lambda: hosts(x, kept, pruned, P, keys, cfg))
            y = torch.empty_like(ref)
            for cfg in FUSE if "fuse" in args.sweep else st._FUSE_CONFIGS:
                fuse(x, kept, pruned, P, ref_keys, y, cfg)
                if not torch.allclose(y.float(), ref.float(), rtol=1e-5, atol=1e-5):
                    row["differs"].append(["fuse", cfg])
                row["fuse"][str(cfg)] = bench(lambda: fuse(x, kept, pruned, P, ref_keys, y, cfg))
            row["update"] = {}
            for cfg in UPDATE if "update" in args.sweep else [(64, *c) for c in st._UPDATE_CONFIGS]:
                update(x, kept, pruned, P, ref_keys, y, cfg)
                if not torch.allclose(y.float(), ref.float(), rtol=1e-5, atol=1e-5):
                    row["differs"].append(["update", cfg])
                row["update"][str(cfg)] = bench(lambda: update(x, kept, pruned, P, ref_keys, y, cfg))
            rows.append(row)
            h0 = row["hosts"].get(str((st._block_p(Np), *st._HOSTS_CONFIGS[0])), math.nan)
            f0 = row["fuse"].get(str(tuple(st._FUSE_CONFIGS[0])), math.nan)
            hb = min(row["hosts"].items(), key=lambda kv: kv[1])
            fb = min(row["fuse"].items(), key=lambda kv: kv[1], default=("-", math.nan))
            ub = min(row["update"].items(), key=lambda kv: kv[1])
            differs = f" differs {len(row['differs'])}" if row["differs"] else ""
            print(
                f"{label:<11} {dtype_name:<8} {row['copy_us']:5.1f} {row['default_us']:7.1f} | {h0:5.1f} "
                f"{hb[1]:5.1f} {hb[0]:<22} | {f0:5.1f} {fb[1]:5.1f} {fb[0]:<24} | {ub[1]:5.1f} {ub[0]:<22}{differs}",
                flush=True,
            )
    with open(os.path.join(args.out, "squeeze-kernels.json"), "w") as f:
        json.dump(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
