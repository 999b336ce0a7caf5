#!/usr/bin/env bash
# Everything worth a lent GPU, in one run of about 15 minutes (the device tool's budget):
#   1. speed: the bundled models against the machine's ceiling, and the GPU levers (AMP, channels_last,
#      compile) against the naive float32 baseline (benchmarks/speed.py);
#   2. the defaults at GPU scale: pretraining + both fine-tunings with the small preset, 256-px patches,
#      written to $OUT/models (NOT over resources/models: compare them first);
#   3. the `gpu` quality budget: pretrained vs scratch, 3 seeds x 2 label fractions, paired intervals.
# Each stage has its own time limit, so a slow stage cannot eat the others; results land in $OUT.
#     OUT=/tmp/gpu bash benchmarks/gpu_run.sh        (on the device machine: $OUT is set for you)
# Test it on a CPU first with SMOKE=1 (tiny schedules, minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT/models"
if [ "${SMOKE:-0}" = 1 ]; then
  PRE=20; FT=10; NUC=10; BUDGET=smoke; LIM=600; PRESET=tiny; PATCH=64; BATCH=4; SPEED="--preset tiny --patch 64 --batch 2 --infer-size 128"
else
  PRE=3000; FT=800; NUC=1200; BUDGET=gpu; LIM=300; PRESET=small; PATCH=256; BATCH=16; SPEED="--preset small --patch 256 --batch 16 --compile"
fi
nvidia-smi -L 2>/dev/null | tee "$OUT/gpu.txt"
timeout 120 "$PY" benchmarks/speed.py $SPEED > "$OUT/speed_vs_baseline.txt" 2>&1
timeout 120 "$PY" benchmarks/speed.py --ceiling --json "$OUT/speed_ceiling.json" > "$OUT/speed_ceiling.txt" 2>&1
timeout "$LIM" "$PY" benchmarks/train_defaults.py --preset "$PRESET" --pretrain-steps "$PRE" --finetune-steps "$FT" \
  --nuclei-steps "$NUC" --patch "$PATCH" --gland-patch "$PATCH" --batch "$BATCH" --work "$OUT/defaults" --bundle-to "$OUT/models" \
  --scratch monuseg --nuclei-loss focal+ssl+dice --fresh > "$OUT/train_defaults.log" 2>&1
timeout "$LIM" "$PY" benchmarks/quality.py --budget "$BUDGET" --work "$OUT/quality" > "$OUT/quality.log" 2>&1
cp "$OUT"/quality/quality.md "$OUT"/ 2>/dev/null
tail -n 3 "$OUT"/*.log "$OUT"/*.txt
