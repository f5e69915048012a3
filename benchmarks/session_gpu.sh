#!/usr/bin/env bash
# One H200 session for the position-table, 384 px and hybrid measurements, in 8-9 minutes of wall time (TOTAL); JSON under $OUT.
#
#   (1) RoPE ViT (vit_small_patch16_rope_224), BEiT-B, EVA-02-S: dense, limit and reduced (etps, dtps)
#   (2) DeiT-S (img_size=384) and DeiT-B/384: the same, target >= 0.95 of the limit, speed-up over dense
#   (3) PVT-Tiny (dtps 0.7) and CvT-13 (dtps 0.5): reduced against dense, with kernel time by family
#       and the share in the site's ops (profiling.py; the limit is not defined for grid models)
#
# bf16 autocast, torch.compile (default mode), batch 256, keep 0.7 at blocks 3, 6, 9 for the ViTs.
#
# Phase 1 compiles every variant once in parallel processes (throughput.py --compile-only, 12 of
# them; nothing is timed while they run) to fill Inductor's on-disk caches. Phase 2 measures one
# variant at a time on the idle GPU, compiling from those caches; its compile_s are warm-cache
# times. A compilation that would end past the deadline is skipped and recorded in the JSON.
#
#   bash benchmarks/session_gpu.sh              # writes $OUT (default ./bench-out)
#   TOTAL=540 bash benchmarks/session_gpu.sh    # seconds for the whole session (default 540)
#   PY=.venv/bin/python TP_EXTRA="--device cpu --img-size 64 --timings 2:eager --quick" \
#       PROF_EXTRA="--device cpu --mode eager --img-size 64 --batch 2" bash benchmarks/session_gpu.sh  # CPU smoke
#
# Files back (5): vit/throughput.json, vit/throughput.md, profile-pvt_tiny.json,
# profile-cvt_13.json, session.log (the timeline and every phase-2 line; phase-1 logs' tails).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench-out}
PY=${PY:-python}
TOTAL=${TOTAL:-540}
WARM_MAX=${WARM_MAX:-180}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/tokenreduce-inductor-cache}
mkdir -p "$OUT" /tmp/tokenreduce-session
LOG="$OUT/session.log"
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

VITS=${VITS:-"deit_small_patch16_224@384 deit_base_patch16_384 vit_small_patch16_rope_224 beit_base_patch16_224 eva02_small_patch14_224"}
VIT_ARGS="--methods etps,dtps --ratios 0.7 --timings 256:default --iters 20 --warmup 5 --repeats 5"
HYB_ARGS="--methods dtps --timings 256:default"  # the papers' ratios: PVT 0.7, CvT 0.5
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
for m in $VITS; do  # two processes per ViT: dense + etps's limit and model; dtps's limit and model
    warm "$m-etps" --models "$m" $VIT_ARGS --methods etps
    warm "$m-dtps" --models "$m" $VIT_ARGS --methods dtps --no-dense
done
for m in pvt_tiny cvt_13; do
    warm "$m" --models "$m" $HYB_ARGS
done
for pid in "${pids[@]}"; do wait "$pid"; done
for f in /tmp/tokenreduce-session/warm-*.log; do
    { echo "--- $f (tail)"; grep -E "compiled|failed|Error" "$f" | tail -8; } >>"$LOG"
done
say "phase 1 done"

say "phase 2a: PVT-Tiny and CvT-13, dense against dtps, kernel families (profiling.py)"
timeout 120 $PY benchmarks/profiling.py --model pvt_tiny --variants dense,dtps@0.7 --detail "" $PROF_EXTRA --out "$OUT" \
    2>&1 | grep -v "^USDT" >>"$LOG"
timeout 120 $PY benchmarks/profiling.py --model cvt_13 --variants dense,dtps@0.5 --detail "" $PROF_EXTRA --out "$OUT" \
    2>&1 | grep -v "^USDT" >>"$LOG"

LEFT=$((TOTAL - ($(date +%s) - T0) - 15))
say "phase 2b: the ViTs, dense + limit + reduced, deadline ${LEFT} s"
$PY benchmarks/throughput.py --models "$(echo $VITS | tr ' ' ,)" $VIT_ARGS $TP_EXTRA --deadline "$LEFT" \
    --out "$OUT/vit" 2>&1 | grep -v "^USDT" >>"$LOG"
say "done; $(ls "$OUT" "$OUT/vit" | tr '\n' ' ')"
