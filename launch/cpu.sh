#!/usr/bin/env bash
# Run a command with the host settings this project measured fastest for XLA:CPU: jemalloc
# preloaded (LD_PRELOAD) and told to keep freed memory (MALLOC_CONF), so XLA's per-step
# temporaries are reused instead of page-faulted in again every step (benchmarks/README.md:
# 32x32 train step 0.6-0.75x the time on a 2-core x86 CPU). Needs jemalloc installed
# (apt-get install libjemalloc2 | dnf install jemalloc | conda install jemalloc); without it the
# command runs as it would alone, with a note saying so.
#
#   bash launch/cpu.sh python -m sami_jax.main --config=configs/disks.py:cpu --workdir=workdirs/disks
#   bash launch/cpu.sh python benchmarks/train_step.py --config=configs/disks.py:cpu
#
# SAMI_JAX_JEMALLOC=/path/to/libjemalloc.so.2 picks the library, SAMI_JAX_JEMALLOC=off skips it;
# a MALLOC_CONF or LD_PRELOAD of yours is kept. PYTHON names the interpreter that finds sami_jax.
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: bash launch/cpu.sh COMMAND [ARGS...]  (e.g. python -m sami_jax.main --config=...)" >&2
  exit 2
fi
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
exports="$("$PYTHON" -c 'import sys; from sami_jax.utils import host_memory; sys.exit(host_memory.launcher_main())')"
eval "$exports"
exec "$@"
