"""Command-line entry point.

  python -m sami_jax.main --config=configs/disks.py[:variant] --workdir=DIR \
      [--config.section.field=value ...] [--mode=train|sample|eval|export]

Under a multi-process launcher (TPU pod, SLURM with several tasks, or the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables) it calls jax.distributed.initialize()
first; on a single machine it does not.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sami_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/disks.py or configs/disks.py:cpu.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "export"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run "
    "(default: $JAX_COORDINATOR_ADDRESS, or what the TPU/SLURM environment provides).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in that run.")


def multi_process_requested(env=None) -> bool:
  """Whether this process was started as one of several (so jax.distributed must initialise)."""
  env = os.environ if env is None else env
  if _COORDINATOR.present or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  # Multi-host TPU slices list their workers; a single-host slice lists one.
  workers = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([w for w in workers.split(",") if w]) > 1


def _initialize_distributed():
  import jax
  kwargs = {}
  addr = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    kwargs["coordinator_address"] = addr
  n = _NUM_PROCESSES.value or os.environ.get("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else os.environ.get("JAX_PROCESS_ID")
  if n is not None:
    kwargs["num_processes"] = int(n)
  if pid is not None:
    kwargs["process_id"] = int(pid)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d.", jax.process_index(),
               jax.process_count())


def main(argv):
  try:
    code = _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if not cli.report_user_error(e):
      raise
    sys.exit(2)
  if code:
    sys.exit(code)


def _main(argv) -> int:
  """Runs the mode; returns the exit status (0, or train.PREEMPTED_EXIT_CODE)."""
  cli.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/disks.py")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/sami_disks")
  if multi_process_requested():
    _initialize_distributed()
  from sami_jax import configlib
  from sami_jax.utils import compile_cache
  config = configlib.expand_user_paths(_CONFIG.value)
  import jax
  configlib.validate(config, jax.device_count(), jax.process_count())
  compile_cache.enable()
  workdir = os.path.expanduser(_WORKDIR.value)
  if _MODE.value == "train":
    # Before the training code is imported (seconds): a workdir that cannot be created is named
    # at once, as train.train would.
    os.makedirs(workdir, exist_ok=True)
    from sami_jax import train
    summary = train.train(config, workdir)
    logging.info("Done: %s", json.dumps(summary))
    if summary.get("preempted"):
      return train.PREEMPTED_EXIT_CODE
  elif _MODE.value == "sample":
    from sami_jax import inference
    paths = inference.sample(config, workdir)
    logging.info("Wrote %s", ", ".join(paths))
  elif _MODE.value == "eval":
    from sami_jax.evaluation import runner
    out = runner.run(config, workdir)
    logging.info("Wrote %s", out)
  elif _MODE.value == "export":
    from sami_jax import export
    out = export.run(config, workdir)
    logging.info("Wrote %s", out)
  return 0


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(argv, _CONFIG)


# Exit status of a run stopped by Ctrl-C where it could not save (128 + SIGINT, as a shell reports
# a program that Ctrl-C ended).
INTERRUPTED_EXIT_CODE = 130


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt as e:
    # One line, no stack trace: train.Interrupted says where the run stopped and which
    # checkpoints are on disk; elsewhere (the imports, the other modes) only that it stopped.
    text = str(e) if e.args else "Interrupted; the command did not finish."
    print(text, file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
  run()
