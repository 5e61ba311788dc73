#!/usr/bin/env bash
# GPU check (no network needed): builds the `bench` tiny checkpoint, exports its FP32 bundle, and compares every
# backend this machine has (PyTorch CUDA fp32/fp16/bf16, onnxruntime CPU/CUDA/TensorRT-EP, TensorRT engines) for
# fidelity and latency. Prints one table, writes JSON to --out (default $OUT/gpu_check.json), lists what was not run.
#
#   scripts/gpu_check.sh                      # on the GPU machine, from the source tree
#   scripts/gpu_check.sh --device cpu --dry-run
#
# Hard limit: GPU_CHECK_TIMEOUT seconds (default 470); the Python side stops starting new measurements after
# --budget-s (default 420) and writes its JSON after every step, so a cut-short run keeps its results.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
# SIGINT first (the script records "interrupted" and writes its JSON), SIGKILL 15 s later.
exec timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-470}" "$PYTHON" scripts/gpu_check.py "$@"
