#!/usr/bin/env python3
"""Host (CPU) cost of compiled models and of the squeeze operator, next to their GPU time.

A compiled model whose host time per forward exceeds its GPU time is launch-bound: its
throughput then measures Python and launch overhead, which varies with the process, not the
kernels.  Per variant this prints, for one batch: wall ms (CUDA events, 30 calls), host ms (the
time to enqueue one call, GPU idle before it), GPU ms (sum of kernel times) and the number of
kernel launches; then a cProfile of compiled forwards and of the operator alone.

    PYTHONPATH=. python3 benchmarks/host_overhead.py --model deit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import limit_of, time_cuda  # noqa: E402
from gpu import host_ms, kernel_times  # noqa: E402


class GcWatch:
    """Counts the garbage collector's passes and their time while active."""

    def __init__(self) -> None:
        self.passes, self.ms, self._t0 = [0, 0, 0], 0.0, 0.0

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.passes[info["generation"]] += 1
            self.ms += (time.perf_counter() - self._t0) * 1e3

    def __enter__(self):
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._cb)


def gc_effect(fn, calls: int = 50) -> dict:
    """GC passes and ms per call over ``calls`` calls, and host ms with the heap frozen."""
    with GcWatch() as w:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    gc.freeze()
    try:
        frozen = host_ms(fn)
        wall_frozen = time_cuda(fn)
    finally:
        gc.unfreeze()
    return dict(gc_passes_per_call=[p / calls for p in w.passes], gc_ms_per_call=w.ms / calls,
                host_ms_gc_frozen=frozen, wall_ms_gc_frozen=wall_frozen, heap_objects=len(gc.get_objects()))


def launches(fn) -> tuple[int, float]:
    """(kernel launches, summed kernel ms) of one call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evts = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return len(evts), sum(e.device_time_total for e in evts) / 1e3


def cprofile(fn, calls: int, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def cpu_table(fn, calls: int = 5) -> str:
    """torch.profiler's CPU view of ``calls`` calls: ops and CUDA runtime calls by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)


def build(name: str, variant: str) -> torch.nn.Module:
    import timm

    import tokenreduce

    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).cuda().eval()
    if variant == "dense":
        return base
    kind, _, spec = variant.partition(":")
    method, _, ratio = spec.partition("@")
    torch.manual_seed(0)
    m = tokenreduce.apply(base, method=method, locs=[3, 6, 9], keep_ratio=float(ratio)).eval()
    return limit_of(m).eval() if kind == "limit" else m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--variants", default="dense,limit:etps@0.7,reduced:etps@0.7,reduced:dtps@0.7,reduced:dynamicvit@0.7")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--profile-variant", default="reduced:etps@0.7",
                   help="comma-separated variants to cProfile and to list by CPU time")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    results, texts = [], {}
    print(f"{args.model} batch {args.batch}, torch {torch.__version__}")
    print(f"{'variant':28s} {'wall ms':>8s} {'host ms':>8s} {'GPU ms':>8s} {'launches':>8s} "
          f"{'host (gc frozen)':>10s} {'wall (frozen)':>10s} {'gc ms':>8s} gc passes (gen 0/1/2) per call")
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        cm = torch.compile(build(args.model, variant))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            call = lambda: cm(x)  # noqa: E731
            wall = time_cuda(call)
            host = host_ms(call)
            n, gpu = launches(call)
            g = gc_effect(call)
            row = dict(variant=variant, wall_ms=wall, host_ms=host, gpu_ms=gpu, launches=n, **g)
            print(f"{variant:28s} {wall:8.3f} {host:8.3f} {gpu:8.3f} {n:8d} {g['host_ms_gc_frozen']:10.3f} {g['wall_ms_gc_frozen']:10.3f} "
                  f"{g['gc_ms_per_call']:8.3f} {g['gc_passes_per_call']}  heap {g['heap_objects']:,}")
            if variant in args.profile_variant.split(","):
                texts[f"cprofile {variant}"] = cprofile(call, 20, 40)
                texts[f"cpu ops {variant}"] = cpu_table(call)
                kernels, _ = kernel_times(call, 3, "cuda")
                row["kernels_us"] = {k[:90]: round(v, 1) for k, v in kernels.items()}
        results.append(row)

    # the operator alone at the model's first-site shapes (keep 0.7, class token)
    from tokenreduce.ops import squeeze_tokens

    C = {"deit_tiny_patch16_224": 192, "deit_small_patch16_224": 384}.get(args.model, 768)
    B, n, k = args.batch, 196, 137
    xs = torch.randn(B, 1 + n, C, device="cuda")
    perm = torch.rand(B, n, device="cuda").argsort(dim=1)
    kept, pruned = perm[:, :k].sort(dim=1).values, perm[:, k:]
    op = lambda: torch.ops.tokenreduce.squeeze_tokens(xs, kept, pruned, 1)  # noqa: E731
    with torch.no_grad():
        wall = time_cuda(op)
        host = host_ms(op)
        n_l, gpu = launches(op)
        direct = lambda: squeeze_tokens(xs, kept, pruned, 1)  # noqa: E731
        host_direct = host_ms(direct)
        texts["cprofile op"] = cprofile(op, 200, 30)
    results.append(dict(variant=f"op squeeze_tokens C{C}", wall_ms=wall, host_ms=host, gpu_ms=gpu,
                        launches=n_l, host_ms_public_fn=host_direct))
    print(f"{'op squeeze_tokens C' + str(C):28s} {wall:8.3f} {host:8.3f} {gpu:8.3f} {n_l:8d}"
          f"   (public squeeze_tokens host {host_direct:.3f})")
    for title, text in texts.items():
        print(f"\n===== {title}\n{text}")
    with open(os.path.join(args.out, f"host-overhead-{args.model}.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, model=args.model, batch=args.batch, rows=results,
                       cprofile=texts), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
