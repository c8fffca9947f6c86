#!/usr/bin/env bash
# One script for a GPU machine (one H100/H200; Python 3.12, no network; CuPy for CUDA 13, PyTorch,
# onnxruntime, pytest, nanobind, scikit-build-core, cmake and ninja preinstalled):
#   1. build and install offload offline (pip --no-build-isolation --no-deps),
#   2. run the device matrix on cuda:0 (and on opencl:0 when an OpenCL ICD is present),
#   3. run benchmarks/bench_gpu.py (offload cuda vs PyTorch eager, bandwidth probe).
# Everything goes under $OUT (or benchmarks/results): gpu_check-<stamp>.log, the pytest logs, and
# bench_gpu's gpu-<stamp>.json/.md/.log. Each step has its own timeout and the whole run stays
# under 6 minutes; a failing step is logged and the script goes on (it fails soft: the exit status
# is the number of failed steps, capped at 100).
#
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%d-%H%M)
LOG="$OUT/gpu_check-$STAMP.log"
PY=${PYTHON:-python}
START=$(date +%s)
DEADLINE=$((START + 345))   # 5m45s: everything, including the benchmark
FAILED=0
export OFFLOAD_CACHE=${OFFLOAD_CACHE:-$OUT/.offload-cache}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD with a timeout (never past the deadline), log its output
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -le 5 ]; then log "SKIP $name: out of time"; FAILED=$((FAILED + 1)); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "BEGIN $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then log "OK $name"
  else
    [ $rc -eq 124 ] && log "FAIL $name: timed out after ${limit}s" || log "FAIL $name: exit $rc"
    FAILED=$((FAILED + 1))
  fi
}

log "offload gpu_check in $ROOT, results in $OUT"
step "environment" 30 bash -c "nvidia-smi || true; $PY -V; $PY -c 'import cupy, torch;
print(\"cupy\", cupy.__version__, \"torch\", torch.__version__, torch.cuda.is_available());
cupy.show_config()'; git -C '$ROOT' rev-parse HEAD 2>/dev/null || true"

step "install" 170 $PY -m pip install --no-build-isolation --no-deps .

step "devices" 30 $PY -m offload devices

# The device matrix on cuda:0 (every test taking `device`, selected by its cuda id) and the
# driver's own tests; -p no:cacheprovider keeps the tree clean.
step "pytest cuda:0" 150 $PY -m pytest -q -p no:cacheprovider --device=cuda:0 -k cuda \
  --junitxml="$OUT/pytest-cuda-$STAMP.xml" tests

# NVIDIA's OpenCL when an ICD is registered (pyopencl from a carried wheel if not installed).
if ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
  if ! $PY -c "import pyopencl" >/dev/null 2>&1; then
    for whl in "$ROOT"/shared/wheels/pyopencl*.whl "$ROOT"/wheels/pyopencl*.whl; do
      [ -f "$whl" ] && step "install pyopencl" 60 $PY -m pip install --no-deps "$whl" && break
    done
  fi
  if $PY -c "import pyopencl" >/dev/null 2>&1; then
    step "pytest opencl" 60 $PY -m pytest -q -p no:cacheprovider -k opencl \
      --junitxml="$OUT/pytest-opencl-$STAMP.xml" tests/test_opencl.py tests/test_ops.py
  else
    log "SKIP pytest opencl: pyopencl not installed and no wheel carried"
  fi
else
  log "SKIP pytest opencl: no OpenCL ICD in /etc/OpenCL/vendors"
fi

# The benchmark gets what is left, minus a margin; it skips its remaining points itself.
LEFT=$((DEADLINE - $(date +%s) - 10))
[ $LEFT -lt 20 ] && LEFT=20
step "bench_gpu" $((LEFT + 5)) $PY benchmarks/bench_gpu.py --out "$OUT" \
  --budget-s $((LEFT * 7 / 10)) --min-time-s 0.4

log "done in $(( $(date +%s) - START ))s with $FAILED failed step(s); files:"
ls -la "$OUT" | tee -a "$LOG"
[ $FAILED -gt 100 ] && FAILED=100
exit $FAILED
