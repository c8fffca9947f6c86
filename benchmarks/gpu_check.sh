#!/usr/bin/env bash
# The GPU check, staged for one short slot (one H200, ~15 min of device time, 10 min per command,
# 8 files back from $OUT). Under 6 minutes, so a rerun still fits:
#   1. preflight (20 s, before any build): nvidia-smi, CuPy/CUDA/cuBLAS/NVRTC versions, cuda:0
#      opened, a small GEMM, graph captures with and without a GEMM (benchmarks/gpu_preflight.py);
#      stops here, with the reason, when the GPU cannot be used at all;
#   2. install (bounded): pip install --no-build-isolation --no-deps . (offline), then
#      `offload devices --require $DEVICE`: stops here unless the device is available (a run
#      whose tests all skip must not look like a pass);
#   3. tests in priority order, each its own pytest run (--require-device, --timeout per test,
#      -v --tb=short) with its own log, bundled into $OUT/logs.tgz as each finishes:
#      the CUDA driver's tests, ops/ONNX cases, precisions/copies/host memory, zoo/export;
#   4. benchmarks/bench_gpu.py, writing its JSON after each point, most informative first;
#   5. where time remains: compute-sanitizer --tool memcheck on jet_mlp.
# Caches and scratch (offload's, CuPy's kernel cache, pip's build, pytest's tmp) live in /tmp.
# $OUT gets at most 6 files: gpu_check.log, logs.tgz, and bench_gpu's gpu-<stamp>.json/.md/.log.
# The exit status is the number of failed stages (0: all passed).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: cuda:0, CuPy, the install
#   bash benchmarks/gpu_check.sh --dry-run    # here: the same stages on cuda-emu:0 with the
#                                             # checkout's environment (.venv), no install
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  DEVICE=cuda-emu:0
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  OUT=${OUT:-/tmp/offload-gpu-check-dry}
else
  DEVICE=cuda:0
  PY=${PYTHON:-python3}
  OUT=${OUT:-$ROOT/benchmarks/results/gpu_check-$(date -u +%Y%m%d-%H%M)}
fi
mkdir -p "$OUT"
SCRATCH=$(mktemp -d /tmp/offload-gpu-check.XXXXXX)
LOGS=$SCRATCH/logs
mkdir -p "$LOGS"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export OFFLOAD_CACHE=$SCRATCH/offload-cache CUPY_CACHE_DIR=$SCRATCH/cupy-cache TMPDIR=$SCRATCH \
       PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
       PYTHONDONTWRITEBYTECODE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
START=$(date +%s)
DEADLINE=$((START + 350))  # 5m50s for everything
FAILED=0

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
bundle() { tar -czf "$OUT/.logs.tgz" -C "$SCRATCH" logs && mv "$OUT/.logs.tgz" "$OUT/logs.tgz"; }

# stage NAME SECONDS CMD...: run CMD bounded by SECONDS (never past the deadline) into
# $LOGS/NAME.log, then bundle the logs; returns CMD's status
stage() {
  local name=$1 limit=$2 rc; shift 2
  local l; l=$(left)
  if [ "$l" -le 10 ]; then log "SKIP $name: out of time"; FAILED=$((FAILED + 1)); return 124; fi
  [ "$limit" -gt "$l" ] && limit=$l
  log "BEGIN $name (at most ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then log "OK $name"
  elif [ $rc -eq 124 ]; then log "FAIL $name: timed out after ${limit}s"; FAILED=$((FAILED + 1))
  else log "FAIL $name: exit $rc"; FAILED=$((FAILED + 1)); fi
  tail -n 1 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  bundle
  return $rc
}

finish() {
  log "done in $(( $(date +%s) - START ))s, $FAILED failed stage(s); files in $OUT:"
  ls -la "$OUT" | tee -a "$LOG"
  bundle
  rm -rf "$SCRATCH"
  [ $FAILED -gt 100 ] && FAILED=100
  exit $FAILED
}

log "offload gpu_check ($([ $DRY = 1 ] && echo "DRY RUN on $DEVICE, an emulation: no GPU" || echo "$DEVICE")) in $ROOT; results in $OUT; scratch $SCRATCH"
log "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"

# 1. preflight --------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  stage preflight 20 bash -c "echo 'nvidia-smi: not run (dry run)'; '$PY' -V; '$PY' benchmarks/gpu_preflight.py --emulate"
else
  stage preflight 20 bash -c "timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv; '$PY' -V; '$PY' benchmarks/gpu_preflight.py"
fi
pf=$?
sed 's/^/    /' "$LOGS/preflight.log" >>"$LOG"
if [ $pf -ne 0 ]; then log "ABORT: preflight failed (above): the GPU is not usable"; finish; fi

# 2. install ----------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  log "SKIP install: the dry run uses the checkout's own environment ($PY)"
else
  stage install 150 "$PY" -m pip install --no-build-isolation --no-deps -v . || {
    log "ABORT: the install failed (logs.tgz: logs/install.log)"; finish; }
fi
stage devices 30 "$PY" -m offload devices --require "$DEVICE" || {
  log "ABORT: $DEVICE is not available (logs.tgz: logs/devices.log)"
  sed 's/^/    /' "$LOGS/devices.log" >>"$LOG"; finish; }

# 3. tests, in priority order -----------------------------------------------------------------
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=90)
[ ${#TIMEOUT_OPT[@]} -eq 0 ] && log "note: pytest-timeout missing: no per-test timeout"
KEXPR=()
[ $DRY = 0 ] && KEXPR=(-k "not emu")  # on the GPU, not the emulation's twins of the tests
n=0
pytest_stage() {  # pytest_stage NAME SECONDS TESTS...
  local name=$1 limit=$2; shift 2
  n=$((n + 1))
  stage "$n-$name" "$limit" "$PY" -m pytest -v --tb=short -p no:cacheprovider \
    "${TIMEOUT_OPT[@]}" --basetemp="$SCRATCH/pytest-$n" --junitxml="$LOGS/$n-$name.xml" \
    --device="$DEVICE" --require-device="$DEVICE" "${KEXPR[@]}" "$@"
}
pytest_stage driver 70 tests/test_cuda.py tests/test_nvrtc.py
pytest_stage ops 60 tests/test_ops.py tests/test_onnx_ops.py
pytest_stage precision-copies 80 tests/test_precision.py tests/test_copies.py \
  tests/test_hostmem.py tests/test_concurrency.py
pytest_stage zoo-export 70 tests/test_zoo.py tests/test_torch_export.py

# 4. benchmark --------------------------------------------------------------------------------
L=$(( $(left) - 45 ))  # keep ~45 s for memcheck
CASES=()  # bench_gpu's own order on the GPU; small points on the emulation (~3 s per image)
[ $DRY = 1 ] && CASES=(--cases blas:jet_mlp:1,jet_mlp:1,hcal_mlp:64,jet_cnn:8:float16)
if [ $L -gt 30 ]; then
  stage bench $L "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --out "$OUT" "${CASES[@]}" \
    --budget-s $((L * 3 / 4)) --min-time-s 0.3 --compile-budget-s 1000
else
  log "SKIP bench: ${L}s left"
fi

# 5. memcheck on jet_mlp, where time remains ----------------------------------------------------
if command -v compute-sanitizer >/dev/null 2>&1 && [ $DRY = 0 ]; then
  L=$(( $(left) - 5 ))
  if [ $L -gt 20 ]; then
    stage memcheck $L compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "
import offload
from offload import zoo
m = offload.load(zoo.path('jet_mlp'), device='$DEVICE')
for b in (1, 7, 64):
    m(zoo.sample_input('jet_mlp', b))
print('jet_mlp ran under memcheck')"
  else
    log "SKIP memcheck: ${L}s left"
  fi
else
  log "SKIP memcheck: $([ $DRY = 1 ] && echo 'dry run (no GPU)' || echo 'compute-sanitizer not on PATH')"
fi
finish
