#!/usr/bin/env bash
# One prepared check of the train step on an accelerator, all output as JSON under OUT_DIR.
#
#   benchmarks/device_check.sh OUT_DIR          # on a GPU (an H200: about 7 minutes, at most 8)
#   benchmarks/device_check.sh OUT_DIR --tiny   # tiny configs on any machine (the test suite)
#
# Parts, each under its own time limit so that the whole check ends in time and keeps what
# finished:
#   train_step_disks   benchmarks/train_step.py at the full Disks size (configs/disks.py, 32x32)
#                      in bfloat16: plain diffusion and SAMI steps, FLOPs, images/s and the
#                      fraction of a bfloat16 matmul peak measured in the same run;
#   train_step_celeba  the same at the CelebA size (configs/celeba.py, 64x64, bfloat16; synthetic
#                      images, so no dataset is needed);
#   run_slice          python -m sami_jax.main --config=configs/disks.py, the full-size run with
#                      train.num_steps capped: steady-state steps/s and images/s from its
#                      metrics.jsonl (Disks is rendered first, data.num_train capped to keep
#                      that short).
# Then OUT_DIR/device_check.json: each part's exit code, duration, result and headline figures
# (benchmarks/device_check.py). Exit code 0 iff every part succeeded.
# Environment: PYTHON (default: python) runs everything; run from any directory.
set -u

OUT=${1:?usage: benchmarks/device_check.sh OUT_DIR [--tiny]}
MODE=${2:-full}
PY=${PYTHON:-python}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
: > "$OUT/parts.jsonl"

if [ "$MODE" = "--tiny" ]; then
  DISKS=configs/disks.py:test; CELEBA=configs/celeba.py:test; DTYPE=float32
  STEPS=1; SLICE_STEPS=3; LOG_EVERY=1; NUM_TRAIN=64; NUM_TEST=16; BATCH=8
  LIMIT_DISKS=300; LIMIT_CELEBA=300; LIMIT_SLICE=300
  EXTRA=(--matmul_size=256)
  CELEBA_KINDS=sami  # the plain step is covered at the Disks size; compiling it costs a minute
elif [ "$MODE" = "full" ]; then
  DISKS=configs/disks.py; CELEBA=configs/celeba.py; DTYPE=bfloat16
  STEPS=10; SLICE_STEPS=400; LOG_EVERY=50; NUM_TRAIN=4096; NUM_TEST=256; BATCH=128
  LIMIT_DISKS=140; LIMIT_CELEBA=170; LIMIT_SLICE=150
  EXTRA=()
  CELEBA_KINDS=ddpm,sami
else
  echo "device_check.sh: unknown mode '$MODE' (use --tiny or nothing)" >&2
  exit 2
fi

# run_part NAME LIMIT_S CMD...: runs CMD under a time limit, appends {name, rc, seconds}.
run_part() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" \
    >> "$OUT/parts.jsonl"
  echo "   rc=$rc after $((SECONDS - t0))s (log: $OUT/$name.log)" >&2
}

run_part train_step_disks "$LIMIT_DISKS" "$PY" benchmarks/train_step.py --config="$DISKS" \
  --config.model.dtype="$DTYPE" --steps="$STEPS" "${EXTRA[@]}" --out="$OUT/train_step_disks.json"
run_part train_step_celeba "$LIMIT_CELEBA" "$PY" benchmarks/train_step.py --config="$CELEBA" \
  --config.model.dtype="$DTYPE" --steps="$STEPS" --kinds="$CELEBA_KINDS" "${EXTRA[@]}" \
  --out="$OUT/train_step_celeba.json"

WORKDIR="$OUT/disks_run"
rm -rf "$WORKDIR"
run_part run_slice_train "$LIMIT_SLICE" "$PY" -m sami_jax.main --config="$DISKS" \
  --workdir="$WORKDIR" --config.data.data_dir="$OUT/tfds" \
  --config.data.num_train="$NUM_TRAIN" --config.data.num_test="$NUM_TEST" \
  --config.train.batch_size="$BATCH" \
  --config.train.num_steps="$SLICE_STEPS" --config.train.log_every="$LOG_EVERY" \
  --config.train.ckpt_every=1000000 --config.train.sample_every=0 \
  --config.train.write_grids=False --config.train.probe_at_end=False
"$PY" benchmarks/device_check.py run_slice "$WORKDIR" "$BATCH" "$OUT/run_slice.json"
echo "{\"name\": \"run_slice\", \"rc\": $?, \"seconds\": 0, \"limit_s\": 0}" >> "$OUT/parts.jsonl"

"$PY" benchmarks/device_check.py summary "$OUT"
python_rc=$?
if [ $python_rc -ne 0 ]; then exit $python_rc; fi
grep -q '"rc": [1-9]' "$OUT/parts.jsonl" && exit 1
exit 0
