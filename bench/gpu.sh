#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (what docs/benchmarks.md's GPU section reports):
# the kernel and pooling tests on CUDA, then bench/inference.py at batch 1 and 8 and
# bench/train_step.py (AMP, with a profile of both models' steps), ours vs torchvision on
# the same card, then bench/kernels.py.
#
#     bash bench/gpu.sh [LOG_DIR]      # logs go to LOG_DIR (default: $OUT or gpu_logs)
#
# Needs a visible GPU, libs/build/libmrcnn_cuda.so (python libs/build_libs.py auto) and the
# Python packages of requirements.txt. PYTHON picks the interpreter (default python3).
# Each step has its own time limit, and a failing step does not stop the later ones.
set -u
LOGS=${1:-${OUT:-gpu_logs}}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

step() {   # step NAME SECONDS COMMAND...: runs COMMAND with a limit, logs to LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, torch.cuda.get_device_name())"
step tests_cuda 120 $PY -m pytest -q -p no:warnings -n 8 -k cuda tests/libs tests/pooling \
    tests/proposal
step inference_b1 90 $PY bench/inference.py --device cuda --batch 1 --runs 20 --warmup 3
step inference_b8 100 $PY bench/inference.py --device cuda --batch 8 --runs 10 --warmup 2
step train_amp 120 $PY bench/train_step.py --device cuda --runs 10 --warmup 3 --profile
step kernels 60 $PY bench/kernels.py --quick
