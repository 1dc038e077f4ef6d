#!/usr/bin/env bash
# Run two GPU jobs side by side on a two-GPU device machine (kind nvidia-h200-x2), one per
# GPU, each with its own flashinfer JIT cache (two compiles into one cache would race):
#
#   scripts/gpu_pair.sh OUT "JOB ON GPU 0" "JOB ON GPU 1" [SECONDS]
#
# Each job runs from the repository root under `timeout SECONDS` (default 570) with
# PYTHONPATH set to the carried wheels (.whl, see scripts/gpu_wheels.sh and docs/gpu.md);
# its output goes to OUT/gpu0.log and OUT/gpu1.log, and its exit code is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1; job0=$2; job1=$3; limit=${4:-570}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
run() {
    local gpu=$1 job=$2
    CUDA_VISIBLE_DEVICES=$gpu FLASHINFER_WORKSPACE_BASE=/tmp/fi$gpu \
        timeout "$limit" bash -c "$job" >"$out/gpu$gpu.log" 2>&1
    echo "gpu$gpu exit $?" >>"$out/gpu$gpu.log"
}
run 0 "$job0" &
run 1 "$job1" &
wait
tail -n 40 "$out/gpu0.log"
echo ------
tail -n 40 "$out/gpu1.log"
