#!/usr/bin/env bash
# The equivariance study (issue #17) on the GPU machine, detached, and its collection.
#   bash benchmarks/study_gpu.sh launch OUT   # start benchmarks/equivariance_study.py run with setsid
#   bash benchmarks/study_gpu.sh collect OUT  # summarise what finished (partial results too)
#   bash benchmarks/study_gpu.sh prepare      # here, before the device call: build the two carries
# Needs (carried) .device_carry/study_data (organics-xtb frames: 8 x 1,000 train, 500 val, 500 test;
# ~4 min on 2 cores) and .device_carry/mace_wheels (mace-torch 0.3.16, e3nn 0.4.4, MACE's import
# deps and ase, cp312, ~6 MB). `prepare` makes both on this machine (PyPI reachable) and never
# replaces a file that exists; STUDY_CHUNKS (default 8) chunks of 1,000 frames.
# STUDY_SECONDS: the whole study's wall budget (default 700 s), STUDY_RUN_SECONDS per run,
# STUDY_PARALLEL runs at once (default 14: the machine's 16 cores, each run one host thread);
# STUDY_SIZES, STUDY_MODES, STUDY_SEEDS narrow the grid (fewer, longer runs in one call);
# STUDY_VARIANTS adds TransIP architecture variants (e.g. "base filter:edge_filter=true").
# The runs share the GPU through an MPS daemon (benchmarks/mps.sh; STUDY_MPS=0: time-slicing):
# launch-bound small-model trainings otherwise time-slice the GPU (the 2026-12-01 study ran 20
# at once without MPS, and none converged in its 270 s).
set -uo pipefail
CMD=${1:?prepare|launch|collect}; OUT=${2:-}
[[ $CMD == prepare || -n $OUT ]] || { echo "usage: study_gpu.sh launch|collect OUT" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
log() { echo "== $(date +%T) $*"; }
source "$ROOT/benchmarks/mps.sh"
S=${STUDY_DIR:-/tmp/study}; D=.device_carry/study_data
TOTAL=${STUDY_SECONDS:-700}; RUN=${STUDY_RUN_SECONDS:-270}
export PYTHONPATH=/tmp/study_site:$ROOT TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONUNBUFFERED=1
case $CMD in
prepare)
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    mkdir -p $D .device_carry/mace_wheels
    gen() {  # seed, frames, name: one xTB data file, skipped if it exists (never overwritten)
        [[ -e $D/$3.extxyz ]] && { echo "kept $D/$3.extxyz"; return; }
        OMP_NUM_THREADS=1 "$PY" -m transip_md.data generate --recipe organics-xtb --n "$2" --seed "$1" \
            --out "$D/.$3.partial.extxyz" --quiet && mv -n "$D/.$3.partial.extxyz" "$D/$3.extxyz"
    }
    jobs_=("100 500 val" "101 500 test")
    for ((k = 0; k < ${STUDY_CHUNKS:-8}; k++)); do jobs_+=("$k 1000 train_chunk$k"); done
    for ((j = 0; j < ${#jobs_[@]}; j += 2)); do  # two at a time: this machine's two cores
        gen ${jobs_[j]} & [[ -n ${jobs_[j+1]:-} ]] && gen ${jobs_[j+1]} &
        wait
    done
    # --no-deps: torch, numpy, scipy, matplotlib come from the GPU image
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device_carry/mace_wheels mace-torch==0.3.16 e3nn==0.4.4 opt-einsum opt-einsum-fx torch-ema \
        matscipy prettytable configargparse lmdb orjson GitPython gitdb smmap wcwidth ase
    ls .device_carry/mace_wheels/python_hostlist-*.whl > /dev/null 2>&1 ||  # sdist only on PyPI
        "$PY" -m pip wheel -q --no-deps -w .device_carry/mace_wheels python-hostlist
    du -sh $D .device_carry/mace_wheels
    ;;
launch)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/study_site \
        .device_carry/mace_wheels/*.whl 2>&1 | tail -1
    mkdir -p "$S"
    [[ ${STUDY_MPS:-1} == 1 ]] && mps_start "$S/mps" python3
    setsid nohup python3 benchmarks/equivariance_study.py run --train $D/train_chunk*.extxyz \
        --val $D/val.extxyz --test $D/test.extxyz --sizes ${STUDY_SIZES:-250 1000 4000 16000} \
        --modes ${STUDY_MODES:-none augment learned-mse learned-contrastive mace} --seeds ${STUDY_SEEDS:-0 1} \
        --variants ${STUDY_VARIANTS:-base} --run-seconds "$RUN" --total-seconds "$TOTAL" --grace-seconds 75 --parallel ${STUDY_PARALLEL:-14} --out "$S" \
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
