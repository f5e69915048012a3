#!/usr/bin/env bash
# One H200 session of throughput measurements, in at most TOTAL seconds of wall time; JSON under $OUT.
#
# By default (the 2026-12-01 position-table session):
#   (1) RoPE ViT (vit_small_patch16_rope_224), BEiT-B, EVA-02-S: dense, limit and reduced (etps, dtps)
#   (2) DeiT-S (img_size=384) and DeiT-B/384: the same, target >= 0.95 of the limit, speed-up over dense
#   (3) PVT-Tiny (dtps 0.7) and CvT-13 (dtps 0.5): reduced against dense, with kernel time by family
#       and the share in the site's ops (profiling.py; the limit is not defined for grid models)
# VITS, VIT_ARGS, WARM_METHODS and HYBRIDS choose other rows, e.g. batch 1 and 256 of DeiT-S and -B:
#
#   VITS="deit_small_patch16_224 deit_base_patch16_224" HYBRIDS="" WARM_METHODS="etps dtps evit dynamicvit" \
#   VIT_ARGS="--methods etps,dtps,evit,dynamicvit --ratios 0.7 --timings 256:default,1:reduce-overhead --kernels" \
#       bash benchmarks/session_gpu.sh
#
# bf16 autocast, torch.compile (default mode), batch 256, keep 0.7 at blocks 3, 6, 9 for the ViTs.
#
# Phase 1 compiles every variant once in parallel processes (throughput.py --compile-only, one per
# ViT and method in WARM_METHODS, one per hybrid; nothing is timed while they run) to fill
# Inductor's on-disk caches. Phase 2 measures one variant at a time on the idle GPU, compiling
# from those caches; its compile_s are warm-cache times. A compilation that would end past the
# deadline is skipped and recorded in the JSON.
#
#   bash benchmarks/session_gpu.sh              # writes $OUT (default ./bench-out)
#   TOTAL=540 bash benchmarks/session_gpu.sh    # seconds for the whole session (default 540)
#   PY=.venv/bin/python TP_EXTRA="--device cpu --img-size 64 --timings 2:eager --quick" \
#       PROF_EXTRA="--device cpu --mode eager --img-size 64 --batch 2" bash benchmarks/session_gpu.sh  # CPU smoke
#
# Files back: vit/throughput.json, vit/throughput.md, profile-HYBRID.json per hybrid, session.log
# (the timeline and every phase-2 line; phase-1 logs' tails).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench-out}
PY=${PY:-python}
TOTAL=${TOTAL:-540}
WARM_MAX=${WARM_MAX:-180}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/tokenreduce-inductor-cache}
mkdir -p "$OUT" /tmp/tokenreduce-session
rm -f /tmp/tokenreduce-session/warm-*.log  # only this session's logs go into the log
LOG="$OUT/session.log"
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

VITS=${VITS:-"deit_small_patch16_224@384 deit_base_patch16_384 vit_small_patch16_rope_224 beit_base_patch16_224 eva02_small_patch14_224"}
VIT_ARGS=${VIT_ARGS:-"--methods etps,dtps --ratios 0.7 --timings 256:default"}
VIT_ARGS="--iters 20 --warmup 5 --repeats 5 $VIT_ARGS"  # defaults first: VIT_ARGS may override them
WARM_METHODS=${WARM_METHODS:-"etps dtps"}  # one phase-1 process per ViT and method
HYBRIDS=${HYBRIDS-"pvt_tiny:0.7 cvt_13:0.5"}  # NAME:RATIO, profiled dense against dtps (the papers' ratios)
HYB_ARGS="--methods dtps --timings 256:default"
TP_EXTRA=${TP_EXTRA:-}      # appended to every throughput.py call (last wins)
PROF_EXTRA=${PROF_EXTRA:-}  # appended to every profiling.py call

say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "phase 1: compiling every variant in parallel (at most ${WARM_MAX} s), cache ${TORCHINDUCTOR_CACHE_DIR}"
pids=()
warm() {  # NAME ARGS...: one compile-only process in the background
    local tag=$1
    shift
    TORCHINDUCTOR_COMPILE_THREADS=2 timeout "$WARM_MAX" $PY benchmarks/throughput.py --compile-only "$@" $TP_EXTRA \
        --out /tmp/tokenreduce-session/warm >"/tmp/tokenreduce-session/warm-$tag.log" 2>&1 &
    pids+=($!)
}
for m in $VITS; do  # per ViT and method: its limit and model; the first also the dense model
    dense=""
    for method in $WARM_METHODS; do
        warm "$m-$method" --models "$m" $VIT_ARGS --methods "$method" $dense
        dense="--no-dense"
    done
done
for h in $HYBRIDS; do
    warm "${h%%:*}" --models "${h%%:*}" $HYB_ARGS
done
for pid in "${pids[@]}"; do wait "$pid"; done
for f in /tmp/tokenreduce-session/warm-*.log; do
    { echo "--- $f (tail)"; grep -E "compiled|failed|Error" "$f" | tail -8; } >>"$LOG"
done
say "phase 1 done"

for h in $HYBRIDS; do
    say "phase 2a: ${h%%:*}, dense against dtps@${h##*:}, kernel families (profiling.py)"
    timeout 120 $PY benchmarks/profiling.py --model "${h%%:*}" --variants "dense,dtps@${h##*:}" --detail "" $PROF_EXTRA \
        --out "$OUT" 2>&1 | grep -v "^USDT" >>"$LOG"
done

LEFT=$((TOTAL - ($(date +%s) - T0) - 15))
say "phase 2b: the ViTs, dense + limit + reduced, deadline ${LEFT} s"
$PY benchmarks/throughput.py --models "$(echo $VITS | tr ' ' ,)" $VIT_ARGS $TP_EXTRA --deadline "$LEFT" \
    --out "$OUT/vit" 2>&1 | grep -v "^USDT" >>"$LOG"
say "done; $(ls "$OUT" "$OUT/vit" | tr '\n' ' ')"
