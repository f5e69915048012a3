#!/usr/bin/env python3
"""Where a compiled model's time goes: kernel by kernel on the GPU, and on the host.

Per variant (compiled, bf16 autocast, one batch): wall ms (CUDA events), host ms (the time to
launch one call onto an idle GPU; close to wall ms means launch-bound), the kernel-time sum and
the number of launches, every kernel's GPU time summed by family (GEMM, convolution, attention,
squeeze, Inductor's Triton kernels, other) and the share that chooses and merges tokens; the
garbage collector's passes and the host time with the heap frozen. For the variants of
--detail: torch.profiler's operator table, a cProfile of 20 forwards and (--code) Inductor's
output code. --op adds the squeeze operator alone at the model's first-site shapes.

    python benchmarks/profiling.py --model deit_small_patch16_224 --variants limit[etps]@0.7,etps@0.7
    python benchmarks/profiling.py --model deit_tiny_patch16_224 --detail etps@0.7 --code etps@0.7 --op
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import re
import sys
import time

import torch

from tokenreduce.bench import build_variants, kernel_times, round_robin
from tokenreduce.bench.models import load_model
from tokenreduce.bench.protocol import Variant
from tokenreduce.bench.timing import REDUCTION_KERNELS, host_ms, reduction_us

FAMILIES = (  # first match wins
    ("squeeze", r"_squeeze"),
    ("attention", r"sdpa|flash|fmha|attention"),
    ("conv", r"convolve|conv2d|implicit"),
    ("gemm", r"nvjet|gemm|gemv|cutlass|xmma|sm90_|ampere_"),
    ("inductor", r"^triton_"),
)


def family(name: str) -> str:
    return next((fam for fam, pattern in FAMILIES if re.search(pattern, name)), "other")


class GcWatch:
    """Counts the garbage collector's passes (per generation) and their ms while active."""

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
    """GC passes and ms per call over ``calls`` calls; host and wall ms with the heap frozen."""
    with GcWatch() as w:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    gc.freeze()
    try:
        frozen = host_ms(fn)
        wall_frozen = round_robin({"f": fn}, "cuda")["f"]
    finally:
        gc.unfreeze()
    return dict(
        gc_passes_per_call=[p / calls for p in w.passes],
        gc_ms_per_call=w.ms / calls,
        host_ms_gc_frozen=frozen,
        wall_ms_gc_frozen=sorted(wall_frozen)[len(wall_frozen) // 2],
        heap_objects=len(gc.get_objects()),
    )


def cprofile(fn, calls: int = 20, top: int = 40) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def profile_variant(name: str, fn, detail: bool) -> tuple[dict, dict[str, str]]:
    wall = round_robin({name: fn}, "cuda")[name]
    kernels, prof = kernel_times(fn, 5)
    fams: dict[str, float] = {}
    for k, v in kernels.items():
        fams[family(k)] = fams.get(family(k), 0.0) + v
    total = sum(kernels.values())
    launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA") / 5
    row = dict(
        variant=name,
        wall_ms=sorted(wall)[len(wall) // 2],
        host_ms=host_ms(fn),
        gpu_us=total,
        launches=launches,
        reduction_us=reduction_us(kernels),
        reduction_share=reduction_us(kernels) / total if total else None,
        families_us=fams,
        kernels_us={k[:120]: round(v, 1) for k, v in kernels.items()},
        **gc_effect(fn),
    )
    texts = {}
    if detail:
        texts[f"operators {name}"] = prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=60, max_name_column_width=70
        )
        texts[f"cprofile {name}"] = cprofile(fn)
    return row, texts


def op_alone(model: str, batch: int) -> dict:
    """The squeeze operator at the first eTPS site of a DeiT (keep 0.7, class token): wall, host, GPU."""
    C = {"deit_tiny_patch16_224": 192, "deit_small_patch16_224": 384}.get(model, 768)
    n, k = 196, 137
    x = torch.randn(batch, 1 + n, C, device="cuda")
    perm = torch.rand(batch, n, device="cuda").argsort(dim=1)
    kept, pruned = perm[:, :k].sort(dim=1).values, perm[:, k:]
    op = lambda: torch.ops.tokenreduce.squeeze_tokens(x, kept, pruned, 1)  # noqa: E731
    with torch.no_grad():
        wall = round_robin({"op": op}, "cuda")["op"]
        kernels, _ = kernel_times(op, 5)
        return dict(
            variant=f"op squeeze_tokens C{C}",
            wall_ms=sorted(wall)[2],
            host_ms=host_ms(op),
            gpu_us=sum(kernels.values()),
            kernels_us=kernels,
            cprofile=cprofile(op, 200, 30),
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--variants", default="dense,limit[etps]@0.7,etps@0.7,limit[dtps]@0.7,dtps@0.7,dynamicvit@0.7")
    p.add_argument("--detail", default="etps@0.7", help="variants to profile by operator and with cProfile")
    p.add_argument("--code", default="", help="variants whose Inductor output code to save")
    p.add_argument("--op", action="store_true", help="also the squeeze operator alone")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-triton-squeeze", action="store_true", help="the reference kernels on CUDA")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profiling.py needs CUDA (kernel times)", file=sys.stderr)
        return 2
    from tokenreduce import ops

    if args.no_triton_squeeze:
        ops.enable_triton_kernels(False)
    os.makedirs(args.out, exist_ok=True)
    wanted = [Variant.parse(v) for v in args.variants.split(",")]
    reduced = [v for v in wanted if v.kind != "dense"]
    dense = load_model(args.model).dense.cuda().eval()
    modules, _ = build_variants(
        args.model, dense, methods=sorted({v.method for v in reduced}), ratios=sorted({v.ratio for v in reduced})
    )
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    rows, texts = [], {}
    print(f"{args.model} batch {args.batch}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for v in wanted:
        if v.name not in modules:
            print(f"{v.name}: not built (see tokenreduce.bench.build_variants's notes); skipped")
            continue
        torch._dynamo.reset()
        cm = torch.compile(modules[v.name])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            if v.name in args.code.split(","):
                from torch._inductor.utils import run_and_get_code

                _, code = run_and_get_code(cm, x)
                path = os.path.join(args.out, re.sub(r"[^A-Za-z0-9._-]", "_", f"code-{args.model}-{v.name}.py"))
                with open(path, "w") as f:
                    f.write("\n\n# ---- next graph ----\n\n".join(code))
            for _ in range(3):
                cm(x)
            row, t = profile_variant(v.name, lambda: cm(x), v.name in args.detail.split(","))
        rows.append(row)
        texts.update(t)
        fams = ", ".join(f"{f} {us:.0f}" for f, us in sorted(row["families_us"].items(), key=lambda kv: -kv[1]))
        print(
            f"{v.name:22s} wall {row['wall_ms']:7.3f} ms  host {row['host_ms']:7.3f} ms  "
            f"GPU {row['gpu_us'] / 1e3:7.3f} ms  {row['launches']:.0f} launches  "
            f"reduction {row['reduction_us']:.0f} us  gc {row['gc_ms_per_call']:.3f} ms/call  ({fams})"
        )
    if args.op:
        rows.append(op_alone(args.model, args.batch))
        texts["cprofile op"] = rows[-1].pop("cprofile")
        print(
            f"{rows[-1]['variant']:22s} wall {rows[-1]['wall_ms']:7.3f} ms  host {rows[-1]['host_ms']:7.3f} ms  "
            f"GPU {rows[-1]['gpu_us'] / 1e3:7.3f} ms"
        )
    for title, text in texts.items():
        print(f"\n===== {title}\n{text}")
    with open(os.path.join(args.out, f"profile-{args.model}.json"), "w") as f:
        json.dump(
            dict(
                torch=torch.__version__,
                device=torch.cuda.get_device_name(),
                model=args.model,
                batch=args.batch,
                reduction_pattern=REDUCTION_KERNELS,
                rows=rows,
                texts=texts,
            ),
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
