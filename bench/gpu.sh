#!/usr/bin/env bash
# cvt_jax on a real NVIDIA GPU, prepared before one was lent: at most ~8 minutes on one H100 or H200.
#
#   bench/gpu_wheels.sh                           # here, once: the wheels the GPU image lacks, into .whl/
#   bench/gpu.sh                                  # there: -> bench/results/gpu-<device>-<UTC time>/
#   PYTHON=.venv/bin/python MAX_BATCH=1024 DEADLINE_S=420 bench/gpu.sh
#
# Needs jax with CUDA, flax, optax, orbax-checkpoint and torch with CUDA, plus cvt_jax's own small
# dependencies (absl, etils, PIL, huggingface_hub, and ml_collections: installed from .whl/ when that
# folder is there, into a folder of its own on PYTHONPATH, with nothing downloaded). TensorFlow, grain,
# tensorboardX and ArrayRecord are not used; the PyTorch side is Hugging Face's CvT where transformers is
# installed, else bench.torch_models.CvT.
# Stages, in order of importance, each cut short so that the whole run ends within DEADLINE_S:
#   1. train-steps: 50 steps of the real train step (cvt_jax.train.trainer.build_steps: RandAugment, mixup/cutmix,
#      forward, backward, AdamW), CvT-13 @224, bf16, batch 256, synthetic images; step times, img/s, peak memory
#   2. compile: `cvt-jax compile` on this device (memory as compiled, kernel census, modelled bytes and the
#      breakdown by part); its train step comes from stage 1's persistent compilation cache
#   3. bench-train: the bench's GPU half, cvt_jax bf16 against PyTorch AMP eager and torch.compile, training
#      step at batch 256 and at the largest power of two up to MAX_BATCH that fits every contender
#   4. bench-infer: the same for inference at batch 256
# Each stage writes <stage>.log and its JSON/Markdown into the results folder; summary.md lists them all.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
MAX_BATCH="${MAX_BATCH:-512}"
DEADLINE=$((SECONDS + ${DEADLINE_S:-450}))
device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-')"
OUT="bench/results/gpu-${device:-unknown}-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$OUT/site" .whl/*.whl \
      || { echo "[gpu.sh] could not install .whl/*.whl" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$PWD/$OUT/site"
fi
export JAX_COMPILATION_CACHE_DIR="$OUT/jax-cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export TF_CPP_MIN_LOG_LEVEL=1

# stage NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (less if the deadline is nearer), logged.
stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 30)); then
    echo "| $name | skipped: the time was spent | |" >> "$OUT/stages.md"
    return
  fi
  echo "[gpu.sh] $name (at most ${limit} s)" >&2
  local started=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "| $name | exit $status$( ((status == 124)) && echo ' (timed out)') | $((SECONDS - started)) s |" \
      >> "$OUT/stages.md"
  tail -n 3 "$OUT/$name.log" >&2
}

"$PYTHON" - > "$OUT/machine.json" <<'EOF' || { echo "[gpu.sh] jax or torch is missing or sees no GPU" >&2; exit 1; }
import json, platform, jax, torch
assert jax.default_backend() == "gpu" and torch.cuda.is_available(), (jax.devices(), torch.cuda.is_available())
print(json.dumps({"host": platform.node(), "jax_devices": [d.device_kind for d in jax.devices()],
                  "torch_device": torch.cuda.get_device_name(0), "jax": jax.__version__,
                  "torch": torch.__version__}))
EOF
echo "| stage | result | time |" > "$OUT/stages.md"
echo "|---|---|---|" >> "$OUT/stages.md"

stage train-steps 170 "$PYTHON" -m bench.train_steps --config cvt13:batch=256 --steps 50 \
    --json "$OUT/train-steps.json"
stage compile 100 "$PYTHON" -m cvt_jax.cli.main compile --config cvt13:batch=256 --breakdown \
    --json "$OUT/compile.json"
stage bench-train 230 "$PYTHON" -m bench.run --models cvt-13 --res 224 --infer_batches= \
    --train_batches 256 --max_batch "$MAX_BATCH" --pipeline_images 0 --loop_steps 0 --rounds 3 --warmup 2 \
    --out "$OUT/bench-train"
stage bench-infer 90 "$PYTHON" -m bench.run --models cvt-13 --res 224 --infer_batches 256 \
    --train_batches= --max_batch 0 --pipeline_images 0 --loop_steps 0 --rounds 3 --warmup 2 \
    --out "$OUT/bench-infer"

{
  echo "# cvt_jax on $(cat "$OUT/machine.json")"
  echo
  cat "$OUT/stages.md"
  for name in train-steps compile; do
    [[ -f "$OUT/$name.log" ]] &&
        printf '\n## %s\n\n```\n%s\n```\n' "$name" "$(grep -v '^[WI][0-9]' "$OUT/$name.log" | tail -n 40)"
  done
  for md in "$OUT"/bench-*/*.md; do
    [[ -f "$md" ]] && printf '\n## %s\n\n%s\n' "$(basename "$(dirname "$md")")" "$(cat "$md")"
  done
} > "$OUT/summary.md"
rm -rf "$OUT/jax-cache" "$OUT/site"
echo "[gpu.sh] wrote $OUT/summary.md ($SECONDS s)" >&2
