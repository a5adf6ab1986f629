#!/usr/bin/env bash
# The GPU benchmark suite (shared/BENCHMARKS.md): correctness first, then ATTN-GPU and STEP-GPU.
# Installs nothing from the network: wheels missing on the GPU machine (diffusers) travel in .whl/
# (see docs/benchmarks.md). Full logs go under $OUT (default ./out); the summary is printed last.
#   bash bench/gpu_suite.sh            # the full run, ~8 minutes on an H100/H200
#   bash bench/gpu_suite.sh --dry-run  # the same scripts on the CPU at tiny sizes (tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
MODE="${1:-}"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1

status=0
run() {  # run NAME CMD...: log everything, keep going when one part fails
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$OUT/gpu_suite.log"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  cat "$OUT/$name.log" >> "$OUT/gpu_suite.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/gpu_suite.log"
  [ "$rc" = 0 ] || status=1
  return $rc
}

if [ "$MODE" = "--dry-run" ]; then
  export TRITON_INTERPRET=1
  run correctness "$PY" bench/gpu_correctness.py --dry-run
  run attn_gpu "$PY" bench/attention_gpu.py --dry-run
  run step_gpu "$PY" bench/step_gpu.py --dry-run
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_suite.log"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu_suite.log"
  STEP_BACKEND=auto
  run correctness timeout 150 "$PY" bench/gpu_correctness.py || STEP_BACKEND=flex
  run attn_gpu timeout 220 "$PY" bench/attention_gpu.py
  run step_gpu timeout 200 "$PY" bench/step_gpu.py --reps 2 --backend "$STEP_BACKEND"
fi

echo
echo "================ summary ================"
for name in correctness attn_gpu step_gpu; do
  [ -f "$OUT/$name.log" ] || continue
  echo "--- $name"
  grep -iE '^(\||headline|fail|abort|machine|device|measured|total wall| *[0-9]+x[0-9]+ )' "$OUT/$name.log" | tail -n 45
done
exit $status
