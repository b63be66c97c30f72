#!/usr/bin/env bash
# One GPU-machine session: install the carried wheels, run the GPU tests, then the speed runs.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [tests|openmm|transip|all]...
#
# Expects (carried, not committed) .device_carry/wheels/*.whl: openmm, openmmtorch,
# openmm-cuda-13, openmm-torch-cuda-13 (cp312, for the GPU image's torch 2.11+cu130), ase,
# pyyaml, tqdm. OpenMM-Torch 1.5's base library lists libnvrtc.so.12 as NEEDED without calling
# it; the GPU image has only CUDA 13, so an empty stub of that name is preloaded — a trick for
# this test machine (see shared/PLATFORM.md), not something users need.
set -uo pipefail
OUT=${1:?output directory}; shift
PARTS=${*:-all}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "== $(date +%T) $*"; }

log "install carried wheels"
python3 -m pip install -q --no-deps --no-index .device_carry/wheels/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
STUB=/tmp/libnvrtc.so.12
gcc -shared -fPIC -x c /dev/null -o $STUB -Wl,-soname,libnvrtc.so.12
export LD_PRELOAD=$STUB  # satisfies the NEEDED entry by soname in every process below
python3 - <<'EOF'
import torch
import openmm, openmmtorch
print("torch", torch.__version__, torch.cuda.get_device_name(0), "| openmm", openmm.__version__,
      "| platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
EOF

want() { [[ " $PARTS " == *" all "* || " $PARTS " == *" $1 "* ]]; }

if want tests; then
    log "GPU tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_static_neighbors.py \
        tests/test_openmm_static.py tests/test_openmm.py -k "CUDA or cuda or gpu or capture" \
        2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
fi
if want openmm; then
    log "OpenMM steps/s, CUDA graphs vs none (shipped model, float32)"
    timeout 300 python3 benchmarks/openmm_gpu.py --platform CUDA \
        --json "$OUT/openmm_gpu_h200.json" 2>&1 | tail -30
fi
if want transip; then
    log "TransIP-S energy+forces per call"
    timeout 300 python3 benchmarks/gpu_bench.py --parts transip,profile --sizes 1536 6144 24576 \
        --out "$OUT" 2>&1 | tail -40
fi
log "done"
