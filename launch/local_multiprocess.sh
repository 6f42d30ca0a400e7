#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes with a localhost coordinator, each with
# its own (fake) CPU devices. Every setting is an environment variable with a default.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 CONFIG=configs/disks.py:test WORKDIR=/tmp/sami_mp \
#     bash launch/local_multiprocess.sh [--config.field=value ...]
set -euo pipefail
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
CONFIG="${CONFIG:-configs/disks.py:test}"
WORKDIR="${WORKDIR:-/tmp/sami_multiprocess}"
MODE="${MODE:-train}"
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
PYTHON="${PYTHON:-python}"
LOGDIR="${LOGDIR:-$WORKDIR/logs}"
mkdir -p "$LOGDIR"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m sami_jax.main --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" \
      --coordinator_address="127.0.0.1:${PORT}" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" "$@" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "Started ${NUM_PROCESSES} processes (coordinator 127.0.0.1:${PORT}); logs in $LOGDIR"
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGDIR/process_$i.log" >&2
    status=1
  fi
done
tail -n 5 "$LOGDIR/process_0.log"
exit "$status"
