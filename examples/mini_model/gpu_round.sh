#!/usr/bin/env bash
# One round of mini-model recipe variants on a GPU machine (the device tool), in one call: train the
# variants side by side from the shipped VAE (recipe_sweep.py), score their adherence,
# probe their sigma = 1 predictions (caption_probe.py), and pack logs and models under $OUT
# (at most 8 files come back: 3 logs + up to 5 models without their VAE, the shipped one).
#   run(command="bash examples/mini_model/gpu_round.sh r5-b256 r5-s1-b256", carry=[".whl"], timeout_s=570)
#   DEVICE=cpu QUICK=1 MINUTES=2 bash examples/mini_model/gpu_round.sh quick-a   # dry run on a CPU
# MINUTES is each trainer's budget (its DiT stage stops 3 minutes before it); keep
# SWEEP_SECONDS + PROBE_SECONDS + ~30 s under the call's timeout.
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT="${OUT:-$PWD/out/gpu-round}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
SWEEP=/tmp/mini-gpu-round
rm -rf "$SWEEP"
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick --eval-images 4 --eval-steps 4)
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/sweep.log"
timeout "${SWEEP_SECONDS:-470}" "$PY" examples/mini_model/recipe_sweep.py --device "${DEVICE:-cuda}" --out "$SWEEP" \
  --vae-from src/cleardit/mini/weights --minutes-budget "${MINUTES:-9}" --threads 1 \
  --render-workers "${RENDER_WORKERS:-3}" --cfg-scales 1 "${quick[@]}" --variants "$@" 2>&1 | tee -a "$OUT/sweep.log"
models=$(ls -d "$SWEEP"/model-* 2>/dev/null | head -n 5)
if [ -n "$models" ]; then
  # shellcheck disable=SC2086  # one folder per word
  timeout "${PROBE_SECONDS:-70}" "$PY" examples/mini_model/caption_probe.py --model src/cleardit/mini/weights $models \
    --sigmas 1.0 --threads 4 2>&1 | tee "$OUT/probe.log"
  for m in $models; do
    tar czf "$OUT/$(basename "$m").tgz" -C "$SWEEP" --exclude=vae "$(basename "$m")"
  done
fi
(cd "$SWEEP" && tar czf "$OUT/logs.tgz" --ignore-failed-read sweep.json train-*.log work-*/training_log.json)
ls -la "$OUT"
