#!/usr/bin/env bash
# The equivariance study (issue #17) on the GPU machine, detached, and its collection.
#   bash benchmarks/study_gpu.sh launch OUT   # start benchmarks/equivariance_study.py run with setsid
#   bash benchmarks/study_gpu.sh collect OUT  # summarise what finished (partial results too)
# Needs (carried) .device_carry/study_data (organics-xtb frames: 8 x 2,000 train, 500 val, 500 test)
# and .device_carry/mace_wheels (mace-torch 0.3.16, e3nn 0.4.4 and MACE's training deps).
# STUDY_SECONDS: the whole study's wall budget (default 700 s), STUDY_RUN_SECONDS per run,
# STUDY_PARALLEL runs at once (default 14: the machine's 16 cores, each run one host thread);
# STUDY_SIZES, STUDY_MODES, STUDY_SEEDS narrow the grid (fewer, longer runs in one call).
# The runs share the GPU through an MPS daemon (benchmarks/mps.sh; STUDY_MPS=0: time-slicing):
# launch-bound small-model trainings otherwise time-slice the GPU (the 2026-12-01 study ran 20
# at once without MPS, and none converged in its 270 s).
set -uo pipefail
CMD=${1:?launch|collect}; OUT=${2:?output dir}
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
log() { echo "== $(date +%T) $*"; }
source "$ROOT/benchmarks/mps.sh"
S=${STUDY_DIR:-/tmp/study}; D=.device_carry/study_data
TOTAL=${STUDY_SECONDS:-700}; RUN=${STUDY_RUN_SECONDS:-270}
export PYTHONPATH=/tmp/study_site:$ROOT TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONUNBUFFERED=1
case $CMD in
launch)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/study_site \
        .device_carry/mace_wheels/*.whl 2>&1 | tail -1
    mkdir -p "$S"
    [[ ${STUDY_MPS:-1} == 1 ]] && mps_start "$S/mps" python3
    setsid nohup python3 benchmarks/equivariance_study.py run --train $D/train_chunk*.extxyz \
        --val $D/val.extxyz --test $D/test.extxyz --sizes ${STUDY_SIZES:-250 1000 4000 16000} \
        --modes ${STUDY_MODES:-none augment learned-mse learned-contrastive mace} --seeds ${STUDY_SEEDS:-0 1} \
        --run-seconds "$RUN" --total-seconds "$TOTAL" --grace-seconds 75 --parallel ${STUDY_PARALLEL:-14} --out "$S" \
        --json "$S/equivariance_study_h200.json" --worker-args --config transip-xs --batch-atoms 1024 \
        --device cuda --val-interval-steps 200 --patience 6 > "$S/orchestrator.log" 2>&1 < /dev/null &
    echo "study started (pid $!), log $S/orchestrator.log"
    ;;
collect)
    (cd "$S" && python3 "$ROOT/benchmarks/equivariance_study.py" collect --out "$S" \
        --json "$OUT/equivariance_study_h200.json") 2>&1 | tail -30
    cp "$S"/*.png "$OUT/" 2>/dev/null
    tail -5 "$S/orchestrator.log"
    tar czf "$OUT/study_runs.tgz" -C "$S" results logs orchestrator.log 2>/dev/null
    pgrep -f equivariance_study.py > /dev/null || mps_stop "$S/mps"  # once the study has ended
    ;;
esac
