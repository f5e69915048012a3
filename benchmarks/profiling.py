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
    python benchmarks/profiling.py --model pvt_tiny,cvt_13 --variants dense,dtps@0.7 --detail ""
    python benchmarks/profiling.py --device cpu --mode eager --model pvt_tiny --img-size 64 --batch 2 \\
        --variants dense,dtps@0.7 --detail ""

On a CPU (``--device cpu``: fp32, no host or GC columns) the "kernels" are the profiler's
operators by self CPU time; a compiled graph's fused C++ code counts under its own call
("inductor"). Family "site": kernels that choose, merge or place tokens (``REDUCTION_KERNELS``:
top-k, sort, gather, scatter, index, the squeeze); Inductor names a fused kernel after the ops
in it, so a kernel that fuses a site's gather or scatter with its neighbours counts there too.
One JSON per model, ``profile-MODEL.json``, under --out.
"""

from __future__ import annotations

import argparse
import contextlib
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
    ("squeeze", r"_squeeze|tokenreduce::squeeze"),
    # choosing, merging and placing tokens (scatter to the grid, gather back); CPU: tokenreduce's operators
    ("site", REDUCTION_KERNELS + r"|tokenreduce::"),
    ("attention", r"sdpa|flash|fmha|attention"),
    ("conv", r"convolve|conv2d|convolution|implicit|mkldnn_conv"),
    ("gemm", r"nvjet|gemm|gemv|cutlass|xmma|sm90_|ampere_|aten::(mm|addmm|bmm|linear|matmul|baddbmm)$"),
    ("inductor", r"^triton_|CompiledFxGraph|cpp_fused|Torch-Compiled"),
)
_CPU_WRAPPERS = re.compile(r"^(ProfilerStep|CompiledFunction|## |Torch-Compiled Region|aten::(linear|matmul)$)")


def family(name: str) -> str:
    return next((fam for fam, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")


def cpu_op_times(fn, iters: int = 5) -> tuple[dict[str, float], object]:
    """CPU us per call of each operator ``fn`` runs, by self time (so nested calls are not counted
    twice), largest first, from ``torch.profiler``; and the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    ops = {e.key: e.self_cpu_time_total / iters for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return dict(sorted(ops.items(), key=lambda kv: -kv[1])), prof


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


def cprofile(fn, calls: int = 20, top: int = 40, sync: bool = True) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    if sync:
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def profile_variant(name: str, fn, detail: bool, device: str = "cuda", top: int = 40) -> tuple[dict, dict[str, str]]:
    cuda = device.startswith("cuda")
    wall = round_robin({name: fn}, device)[name]
    kernels, prof = kernel_times(fn, 5) if cuda else cpu_op_times(fn, 5)
    fams: dict[str, float] = {}
    for k, v in kernels.items():
        fams[family(k)] = fams.get(family(k), 0.0) + v
    total = sum(kernels.values())
    if cuda:
        launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA") / 5
    else:
        launches = sum(1 for e in prof.events() if not _CPU_WRAPPERS.search(e.name)) / 5
    site = fams.get("site", 0.0) + fams.get("squeeze", 0.0)
    row = dict(
        variant=name,
        wall_ms=sorted(wall)[len(wall) // 2],
        host_ms=host_ms(fn) if cuda else None,
        gpu_us=total,  # CPU: the operators' self time
        launches=launches,
        reduction_us=reduction_us(kernels),
        reduction_share=reduction_us(kernels) / total if total else None,
        site_us=site,
        site_share=site / total if total else None,
        families_us={f: round(v, 1) for f, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        kernels_us={k[:120]: round(v, 1) for k, v in list(kernels.items())[:top]},
        kernels_total=len(kernels),
        **(gc_effect(fn) if cuda else {}),
    )
    texts = {}
    if detail:
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        texts[f"operators {name}"] = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70)
        texts[f"cprofile {name}"] = cprofile(fn, sync=cuda)
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


def profile_model(model: str, args: argparse.Namespace) -> dict:
    """Every variant of ``args.variants`` of ``model``, compiled (or eager), one batch: a JSON-ready dict."""
    from tokenreduce.bench.models import native_img_size

    device, cuda = args.device, args.device.startswith("cuda")
    size = args.img_size or native_img_size(model)
    wanted = [Variant.parse(v) for v in args.variants.split(",")]
    reduced = [v for v in wanted if v.kind != "dense"]
    dense = load_model(model, img_size=size).dense.to(device).eval()
    example = torch.randn(2, 3, size, size, device=device)
    modules, rows_built = build_variants(
        model,
        dense,
        methods=sorted({v.method for v in reduced}) or ["etps"],
        ratios=sorted({v.ratio for v in reduced}) or [0.7],
        example=example,
        limits=any(v.kind == "limit" for v in wanted),
    )
    notes = {r.variant: r.note for r in rows_built if r.note}
    x = torch.randn(args.batch, 3, size, size, device=device)
    rows, texts = [], {}
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{model} {size} px batch {args.batch}, {args.mode}, torch {torch.__version__}, {where}")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    for v in wanted:
        if v.name not in modules:
            print(f"{v.name}: not built ({notes.get(v.name, 'not in the plan')}); skipped")
            rows.append(dict(variant=v.name, note=notes.get(v.name, "not built")))
            continue
        torch._dynamo.reset()
        cm = modules[v.name] if args.mode == "eager" else torch.compile(modules[v.name])
        with torch.no_grad(), amp:
            if v.name in args.code.split(",") and args.mode != "eager":
                from torch._inductor.utils import run_and_get_code

                _, code = run_and_get_code(cm, x)
                path = os.path.join(args.out, re.sub(r"[^A-Za-z0-9._-]", "_", f"code-{model}-{v.name}.py"))
                with open(path, "w") as f:
                    f.write("\n\n# ---- next graph ----\n\n".join(code))
            for _ in range(3):
                cm(x)
            row, t = profile_variant(v.name, lambda: cm(x), v.name in args.detail.split(","), device)
        rows.append(row)
        texts.update(t)
        fams = ", ".join(f"{f} {us:.0f}" for f, us in row["families_us"].items())
        host = f"host {row['host_ms']:7.3f} ms  " if cuda else ""
        gc_ms = f"  gc {row['gc_ms_per_call']:.3f} ms/call" if cuda else ""
        print(
            f"{v.name:22s} wall {row['wall_ms']:7.3f} ms  {host}{'GPU' if cuda else 'CPU'} "
            f"{row['gpu_us'] / 1e3:7.3f} ms"
            f"  {row['launches']:.0f} launches  site {row['site_us']:.0f} us ({row['site_share']:.1%}){gc_ms}  ({fams})"
        )
    dense_row = next((r for r in rows if r["variant"] == "dense" and "wall_ms" in r), None)
    for r in rows:
        if dense_row and "wall_ms" in r and r is not dense_row:
            r["vs_dense"] = dense_row["wall_ms"] / r["wall_ms"]  # throughput ratio (> 1: faster)
            r["families_minus_dense_us"] = {
                f: round(r["families_us"].get(f, 0.0) - dense_row["families_us"].get(f, 0.0), 1)
                for f in sorted(set(r["families_us"]) | set(dense_row["families_us"]))
            }
            print(
                f"{r['variant']:22s} {r['vs_dense']:.3f}x dense; by family vs dense (us): "
                f"{r['families_minus_dense_us']}"
            )
    if args.op and cuda:
        rows.append(op_alone(model, args.batch))
        texts["cprofile op"] = rows[-1].pop("cprofile")
        print(
            f"{rows[-1]['variant']:22s} wall {rows[-1]['wall_ms']:7.3f} ms  host {rows[-1]['host_ms']:7.3f} ms  "
            f"GPU {rows[-1]['gpu_us'] / 1e3:7.3f} ms"
        )
    for title, text in texts.items():
        print(f"\n===== {title}\n{text}")
    return dict(
        torch=torch.__version__,
        device=where,
        model=model,
        img_size=size,
        batch=args.batch,
        mode=args.mode,
        amp="bf16" if cuda else "none",
        reduction_pattern=REDUCTION_KERNELS,
        rows=rows,
        texts=texts,
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="deit_small_patch16_224", help="timm name(s), comma-separated")
    p.add_argument("--variants", default="dense,limit[etps]@0.7,etps@0.7,limit[dtps]@0.7,dtps@0.7,dynamicvit@0.7")
    p.add_argument("--detail", default="etps@0.7", help="variants to profile by operator and with cProfile")
    p.add_argument("--code", default="", help="variants whose Inductor output code to save")
    p.add_argument("--op", action="store_true", help="also the squeeze operator alone (cuda)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=None, help="pixels (default: each model's own)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", choices=("default", "eager"), default="default", help="torch.compile, or eager")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-triton-squeeze", action="store_true", help="the reference kernels on CUDA")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: pass --device cpu (operator times instead of kernel times)", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from tokenreduce import ops

    if args.no_triton_squeeze:
        ops.enable_triton_kernels(False)
    os.makedirs(args.out, exist_ok=True)
    for model in [m.strip() for m in args.model.split(",") if m.strip()]:
        result = profile_model(model, args)
        with open(os.path.join(args.out, f"profile-{model}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
