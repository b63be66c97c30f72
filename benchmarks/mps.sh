# NVIDIA MPS for several GPU jobs side by side on one GPU (sourced by long_runs.sh and
# study_gpu.sh). Seen on the H200 machine 2026-12-01: without MPS, 4 launch-bound MD runs
# time-sliced at ~95 steps/s each where one alone ran ~640 (the GPU switches between the
# processes' contexts); with MPS their small kernels run side by side (10 runs: 215-227 steps/s
# each). MPS changes no device setting: the daemon is started for the jobs and stopped after.
#
#   source benchmarks/mps.sh
#   mps_start DIR PYTHON   # daemon with pipe/log under DIR; exports the client variables
#   mps_stop DIR           # once every client has ended
# Needs log() from the caller. A client that cannot reach the daemon fails instead of falling
# back, so mps_start probes one first and stops the daemon again if the probe fails.

mps_env() {  # DIR: clients find the daemon through these (set before the first CUDA call)
    export CUDA_MPS_PIPE_DIRECTORY=$1/pipe CUDA_MPS_LOG_DIRECTORY=$1/log
}

mps_start() {
    local dir=$1 py=${2:-python3}
    if ! command -v nvidia-cuda-mps-control > /dev/null; then
        log "no nvidia-cuda-mps-control: the jobs time-slice the GPU"
        return 0
    fi
    mkdir -p "$dir/pipe" "$dir/log"
    mps_env "$dir"
    if nvidia-cuda-mps-control -d; then
        touch "$dir/started"
        if timeout 60 $py -c "import torch; torch.ones(1, device='cuda').sum().item()" > "$dir/probe.log" 2>&1; then
            log "MPS daemon started (pipe $CUDA_MPS_PIPE_DIRECTORY), a CUDA client ran through it"
        else
            log "MPS client probe failed ($(tail -1 "$dir/probe.log")): daemon stopped, the jobs time-slice the GPU"
            mps_stop "$dir"
            unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        fi
    else
        log "MPS daemon did not start: the jobs time-slice the GPU"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
}

mps_stop() {
    local dir=$1
    [[ -f $dir/started && ! -f $dir/stopped ]] || return 0
    mps_env "$dir"
    echo quit | nvidia-cuda-mps-control && touch "$dir/stopped" && log "MPS daemon stopped"
}
