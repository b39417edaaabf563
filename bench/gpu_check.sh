#!/usr/bin/env bash
# One command for a lent GPU machine (H200, sm_90; the image's python3 with torch, cupy, pytest, pytest-benchmark):
#   bash bench/gpu_check.sh [OUT_DIR]
# builds the extension in place with CUDA kernels, runs the CUDA tests, the same tests on the cupy backend, and the
# GPU benchmarks; writes gpu_check.json + gpu_check.md (+ bench.json, logs) to OUT_DIR, else $OUT, else
# bench/results/gpu-<date>. Each stage has a time limit and a failing stage does not stop the next; the whole run
# stays under BRIDGE_OPS_GPU_CHECK_BUDGET seconds (default 450). Exit status 0 only if every stage passed.
#
# Python packages missing on the machine (expecttest, which torch.library.opcheck imports, is not in the image's
# list) can be carried as wheels in .whl/ (see the device tool's README); they are installed to /tmp/site here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_check.py "$@"
