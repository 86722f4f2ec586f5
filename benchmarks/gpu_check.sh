#!/usr/bin/env bash
# The one script to run on a GPU machine that already has torch and triton (no registry needed):
# build generalist._C with its CUDA kernels, run the `gpu` tests, run the benchmarks, and write
# logs and tables to RESULTS_DIR. Prints a short summary last.
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

$PY - <<'PY' | tee "$OUT/device.txt"
import torch, triton, platform
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  python {platform.python_version()}")
PY

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
start=$(date +%s)
if GENERALIST_CUDA=ON $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  echo "build: ok in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
else
  echo "build: FAILED (see build.log)" | tee -a "$OUT/summary.txt"; status=1
fi

$PY -m pytest -q -m gpu tests >"$OUT/pytest-gpu.log" 2>&1 || status=1
echo "gpu tests: $(tail -n 1 "$OUT/pytest-gpu.log")" | tee -a "$OUT/summary.txt"

$PY benchmarks/attention.py --out "$OUT/attention.md" >"$OUT/attention.log" 2>&1 || status=1
echo; cat "$OUT/attention.md" 2>/dev/null || tail -n 20 "$OUT/attention.log"
echo; cat "$OUT/summary.txt"
exit $status
