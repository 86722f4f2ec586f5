#!/usr/bin/env bash
# The one script to run on a GPU machine that already has torch and triton (no registry needed):
# build generalist._C with its CUDA kernels, run the `gpu` tests, run the benchmarks, and write
# logs and tables to RESULTS_DIR. Prints a short summary last.
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# QUICK=1 benchmarks fewer sizes and providers (and adds moe.py's kernel breakdown, moe-kernels.md,
# to its grid); RESULTS_DIR is taken relative to where the script is started. It writes a dozen
# files: where only a few may be carried back, point RESULTS_DIR at scratch space and archive it
# (tar czf results.tgz -C DIR .).
# Each step has a time limit (seconds: T_BUILD, default 300, for the build; 60 for the C++ error
# check; T_TESTS, default 170, and 120 for the model tests, the last of which compiles the blocks;
# T_NCU, default 120; T_BENCH, default 150 per benchmark), so that a slow step cannot eat the rest,
# cut to what is left of T_TOTAL (default 470) from the start of the build, less the 15 s a
# killed step is given to exit: the script ends within T_TOTAL plus about 20 s, and a step with
# under 20 s left is skipped, and said to be (a benchmark cut short still writes the rows it
# measured). PYTHON names the interpreter (default python3). BENCHES picks the benchmarks and
# their order (default "moe ncu attention train_step decode host_overhead bench": the MoE grid
# tunes fewer kernels than attention's, so it finishes first; ncu profiles what it tuned; train_step times whole training steps of the demo
# model with --profile, GPU busy time, eager and with its blocks compiled; bench runs
# `generalist bench`, the users' command, to bench.md and bench.json);
# ATTENTION_ARGS are passed to attention.py (e.g. "--providers cuda,sdpa-flash --passes fwd", or
# "--shapes D128"). TEST_MARKS selects the op tests (default "gpu": those written for the GPU,
# every kernel configuration against float64 among them; "gpu or not slow" also runs the
# device-independent op tests on CUDA, for about two minutes of the benchmarks' time). BUILD=0
# uses the extension already built; DIAGNOSE=1 investigates a crash of the C++ error check (a
# backtrace, a minimal extension). The "benchmark" ncu (second by default, when ncu is installed)
# reads the hardware counters of one launch of each MoE kernel at 64 experts, dw also under its first
# configuration (ncu-moe.md).
set -uo pipefail
OUT=${1:-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # relative to where the script was started
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

$PY - <<'PY' | tee "$OUT/device.txt"
import torch, triton, platform
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
      f"python {platform.python_version()}  cuda {torch.version.cuda}")
PY

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
start=$(date +%s)
deadline=$(( start + ${T_TOTAL:-470} ))
# a step's time limit: its own ($1 seconds), cut to what is left before the deadline less the
# 15 s `timeout -k` grants a killed step
limit() { local left=$(( deadline - $(date +%s) - 15 )); echo $(( $1 < left ? $1 : left )); }
# whether a step named $1 still has time (20 s or more); if not, it is reported as skipped
has_time() { [ "$(limit 20)" -ge 20 ] && return 0; step "$1: skipped (out of time)"; status=1; return 1; }
cuda_built() { $PY -c 'import generalist._ext as e; print(e.cuda_built())' 2>/dev/null; }
if [ "${BUILD:-1}" = 0 ]; then
  step "build: skipped (BUILD=0); cuda_built=$(cuda_built)"
elif GENERALIST_CUDA=ON timeout -k 15 "$(limit "${T_BUILD:-300}")" $PY -m pip install --no-deps --no-build-isolation -e . \
    >"$OUT/build.log" 2>&1; then
  built=$(cuda_built)
  step "build: ok in $(( $(date +%s) - start )) s; cuda_built=$built"
  [ "$built" = True ] || { step "build: the CUDA kernels are missing (see build.log)"; status=1; }
else
  step "build: FAILED (see build.log)"; status=1; tail -n 30 "$OUT/build.log"
fi

# An error raised from C++ with a formatted message must reach Python as a RuntimeError (it
# crashed once in a CUDA build against torch 2.11+cu130); on a crash, a backtrace goes to the log.
THROW='import torch, generalist._ext
try:
    torch.ops.generalist._varlen_positions(torch.tensor([0, 3, 2], dtype=torch.int32), 2)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
INLINE='import torch, torch.utils.cpp_extension as ext
m = ext.load_inline("throw_check", cpp_sources="void f(int64_t x) { TORCH_CHECK(x == 0, \"x must be 0, got \", x); }",
                    functions=["f"])
try:
    m.f(3)
except RuntimeError as e:
    print("minimal extension raised:", str(e).splitlines()[0])'
if ! has_time "C++ errors"; then :
elif timeout -k 5 "$(limit 60)" $PY -c "$THROW" >"$OUT/cpp-errors.log" 2>&1; then
  step "C++ errors: $(tail -n 1 "$OUT/cpp-errors.log")"
else
  step "C++ errors: CRASHED (DIAGNOSE=1 for a backtrace and a minimal extension's behaviour)"; status=1
  # seen with torch 2.11+cu130 and GCC 13.3, where a minimal load_inline extension crashes the
  # same way (BENCHMARKS.md): the diagnosis costs minutes, so it runs only on request
  [ "${DIAGNOSE:-0}" = 1 ] && { echo "--- compiler: $(c++ --version | head -n 1)"; $PY -c "import torch; print('torch cxx11 abi', torch.compiled_with_cxx11_abi())"
    command -v cuda-gdb >/dev/null && timeout -k 5 90 cuda-gdb -batch -ex run -ex bt --args $PY -c "$THROW" 2>&1 | tail -n 60
    # the same kind of error from a minimal CPU-only extension built here by torch itself: a crash
    # there too points at this torch and compiler, none at our CMake build
    echo "--- minimal extension (torch.utils.cpp_extension.load_inline):"
    timeout -k 5 120 $PY -c "$INLINE" 2>&1 | tail -n 5 || echo "minimal extension: CRASHED too"; } >>"$OUT/cpp-errors.log" 2>&1
fi

# the gpu-marked op tests (TEST_MARKS: the others run on CUDA too when it is there) and model
# tests; the rest of the model tests are device-independent and run in CI
xdist=$($PY -c 'import xdist' 2>/dev/null && echo "-n 8" || true)
# -v under xdist prints each result as it lands, so the names of failures survive the time limit
: >"$OUT/pytest-gpu.log"
has_time "op tests" && { timeout -k 15 "$(limit "${T_TESTS:-170}")" $PY -m pytest -v -rfE $xdist -m "${TEST_MARKS:-gpu}" \
  -p no:cacheprovider tests/ops >>"$OUT/pytest-gpu.log" 2>&1 || status=1; }
has_time "model tests" && { timeout -k 15 "$(limit 120)" $PY -m pytest -v -rfE -m gpu -p no:cacheprovider tests/models \
  >>"$OUT/pytest-gpu.log" 2>&1 || status=1; }
step "gpu tests: $(grep -c ' PASSED ' "$OUT/pytest-gpu.log") passed, $(grep -c ' FAILED ' "$OUT/pytest-gpu.log") failed, $(grep -c 'node down' "$OUT/pytest-gpu.log") crashed workers; $(tail -n 1 "$OUT/pytest-gpu.log")"
grep -E "( FAILED |^FAILED|^ERROR)" "$OUT/pytest-gpu.log" | head -n 20

# Hardware counters of the MoE kernels at 64 experts (DRAM and SM throughput, occupancy, stall
# reasons) next to the dense matmul's, one launch each: where a kernel's time goes.
NCU_BIN=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
run_ncu() {
  [ -n "$NCU_BIN" ] || { step "ncu: skipped (no ncu found)"; return; }
  has_time ncu || return
  timeout -k 15 "$(limit "${T_NCU:-120}")" "$NCU_BIN" --profile-from-start off --clock-control none -f -o "$OUT/ncu-moe" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --metrics dram__bytes_read.sum,dram__bytes_write.sum \
    $PY benchmarks/moe.py --ncu >"$OUT/ncu-moe.log" 2>&1
  local code=$?
  if [ -f "$OUT/ncu-moe.ncu-rep" ] && "$NCU_BIN" --import "$OUT/ncu-moe.ncu-rep" --csv --page raw --print-units base >"$OUT/ncu-moe.csv" \
       2>>"$OUT/ncu-moe.log" && $PY benchmarks/moe.py --ncu-summary "$OUT/ncu-moe.csv" --out "$OUT/ncu-moe.md" \
       >>"$OUT/ncu-moe.log" 2>&1; then
    step "ncu: exit $code; MoE kernels profiled (ncu-moe.md)"
  else
    step "ncu: exit $code; no summary (see ncu-moe.log)"; status=1; tail -n 5 "$OUT/ncu-moe.log"
  fi
}

# `generalist bench`, the command users run: every backend against PyTorch's own on this GPU, each
# checked against the reference before it is timed (exit 1 if one disagrees)
run_bench() {
  has_time "generalist bench" || return
  timeout -k 15 "$(limit "${T_BENCH:-150}")" $PY -m generalist bench $quick --json "$OUT/bench.json" \
    >"$OUT/bench.log" 2>&1
  local code=$?; [ $code = 0 ] || status=1
  { echo '```'; cat "$OUT/bench.log"; echo '```'; } >"$OUT/bench.md"
  step "generalist bench: exit $code; $(grep -c ' ok$' "$OUT/bench.log") rows of ours timed, $(grep -c 'wrong:' "$OUT/bench.log") wrong"
}

quick=; [ "${QUICK:-0}" != 0 ] && quick=--quick  # (QUICK=0 is off, as BUILD=0)
for bench in ${BENCHES:-moe ncu attention train_step decode host_overhead bench}; do
  [ "$bench" = ncu ] && { run_ncu; continue; }
  [ "$bench" = bench ] && { run_bench; continue; }
  [ -f benchmarks/$bench.py ] || { step "benchmark $bench: no benchmarks/$bench.py"; status=1; continue; }
  has_time "benchmark $bench" || continue
  extra=""; [ "$bench" = attention ] && extra=${ATTENTION_ARGS:-}; [ "$bench" = train_step ] && extra="--profile --compile"
  # shellcheck disable=SC2086  # extra holds several arguments
  # TRITON_PRINT_AUTOTUNING: each tuning (compiling and timing every candidate for one key) logs
  # its duration: on a fresh machine, about the wait of a first training step (less what the test
  # step compiled already; a choice read from Triton's cache is neither timed nor counted)
  TRITON_PRINT_AUTOTUNING=1 timeout -k 15 "$(limit "${T_BENCH:-150}")" $PY benchmarks/$bench.py $quick $extra \
    --out "$OUT/$bench.md" >"$OUT/$bench.log" 2>&1
  code=$?; [ $code = 0 ] || status=1
  step "benchmark $bench: exit $code; $(grep -o 'finished after [0-9.]*' "$OUT/$bench.log" |
    awk '{n++; t += $3} END {printf "%d tunings, %.0f s", n, t}')"
done
for bench in ${BENCHES:-moe ncu attention train_step decode host_overhead bench}; do
  for table in "$bench" "$bench-kernels" "$bench-moe"; do  # moe.py --quick writes moe-kernels.md too; ncu-moe.md
    [ -f "$OUT/$table.md" ] && { echo; echo "## $table"; cat "$OUT/$table.md"; }
  done
done
echo; cat "$OUT/summary.txt"
exit $status
