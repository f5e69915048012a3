#!/usr/bin/env python3
"""The reduction kernels alone: one eTPS site's merge and selection at DeiT-T/S/B's first-site shapes.

Per shape (batch B, class token, n = 196 -> k = 137, C = 192 / 384 / 768) and stream dtype: the
GPU time (replayed in a CUDA graph, so no host time) of the squeeze operator with tokenreduce's
Triton kernels, of the plain reference eager and compiled by Inductor, of ``topk_split``, and
the memory floor (reading the stream and writing the output at ~3.3 TB/s); the share of output
rows that differ from the reference by more than 1 %. ``--tilings`` runs
``benchmarks/squeeze_kernels.py`` instead: every kernel's candidate tilings, one by one.

    python benchmarks/kernels.py --batch 256
    python benchmarks/kernels.py --tilings --sites "S s1"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def site_merge(batch: int) -> list[dict]:
    from tokenreduce.bench.timing import graphed, round_robin
    from tokenreduce.ops import enable_triton_kernels, squeeze_tokens, topk_split
    from tokenreduce.ops.squeeze import squeeze_tokens_reference

    time_ms = lambda fn: sorted(round_robin({"f": graphed(fn)}, "cuda")["f"])[2]  # noqa: E731 - median of 5
    n, k, P = 196, 137, 1
    compiled_ref = torch.compile(squeeze_tokens_reference, dynamic=False)
    results = []
    for C, dtype in ((192, torch.float32), (384, torch.float32), (384, torch.bfloat16), (768, torch.float32)):
        x = torch.randn(batch, P + n, C, device="cuda", dtype=dtype)
        kept, pruned = topk_split(torch.randn(batch, n, device="cuda"), k)
        entry = {"shape": [batch, P, n, k, C], "dtype": str(dtype).replace("torch.", "")}
        with torch.no_grad():
            enable_triton_kernels(True)
            y = squeeze_tokens(x, kept, pruned, P).float()
            ref = squeeze_tokens_reference(x.float(), kept, pruned, P)
            entry["rows_off_by_1pct"] = float(((y - ref).norm(dim=-1) / ref.norm(dim=-1) > 1e-2).float().mean())
            entry["triton_ms"] = time_ms(lambda: squeeze_tokens(x, kept, pruned, P))
            entry["reference_ms"] = time_ms(lambda: squeeze_tokens_reference(x, kept, pruned, P))
            entry["inductor_ms"] = time_ms(lambda: compiled_ref(x, kept, pruned, P))
            scores = torch.randn(batch, n, device="cuda")
            entry["topk_split_ms"] = time_ms(lambda: topk_split(scores, k))
        moved = x.element_size() * batch * C * (P + n + P + k)  # read the stream, write the output
        entry["memory_floor_ms"] = moved / 3.3e12 * 1e3
        results.append(entry)
        print(
            f"{entry['shape']} {entry['dtype']:>8}: Triton {entry['triton_ms']:.3f} / reference "
            f"{entry['reference_ms']:.3f} / Inductor {entry['inductor_ms']:.3f} / floor "
            f"{entry['memory_floor_ms']:.3f} ms; topk_split {entry['topk_split_ms']:.3f} ms; rows off by >1%: "
            f"{entry['rows_off_by_1pct']:.2%}",
            flush=True,
        )
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tilings", action="store_true", help="every tiling of every squeeze kernel instead")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args, rest = p.parse_known_args()
    if not torch.cuda.is_available():
        print("kernels.py needs CUDA", file=sys.stderr)
        return 2
    if args.tilings:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import squeeze_kernels

        sys.argv = [sys.argv[0], "--out", args.out, *rest]
        return squeeze_kernels.main()
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)} (those are for --tilings)")
    os.makedirs(args.out, exist_ok=True)
    results = site_merge(args.batch)
    with open(os.path.join(args.out, "site-merge-kernels.json"), "w") as f:
        json.dump(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch, rows=results),
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
