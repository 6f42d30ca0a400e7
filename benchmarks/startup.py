"""Start-up: seconds from launching `python -m sami_jax.main` to its first logged train step.

    python benchmarks/startup.py [--config=configs/disks.py:cpu] [--runs=2] [--out=startup.json]

Runs the command `--runs` times into fresh workdirs, all sharing one fresh compilation cache (so
run 1 compiles and every later run is "a second run"), each for 2 steps without grids or the
end-of-run probe, and reads the time of each log line from the child's stderr as it arrives.
Reported per run: `first_step_s` (launch -> the line of step 1, which is written right after the
step's results reach the host), `total_s`, and the seconds at which the child logged loading the
saved train step, if it did. The machine's load average is reported with it: start-up is mostly
single-threaded, so another busy process stretches it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = flags.DEFINE_string("config", "configs/disks.py:cpu", "Config (file[:variant]).")
_RUNS = flags.DEFINE_integer("runs", 2, "Runs sharing one fresh compilation cache.")
_KEEP_CACHE = flags.DEFINE_string("cache_dir", None, "Use (and keep) this cache directory "
                                  "instead of a fresh temporary one.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_run(workdir: str, env: dict[str, str]) -> dict[str, float | None]:
  cmd = [sys.executable, "-m", "sami_jax.main", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", "--config.train.num_steps=2", "--config.train.log_every=1",
         "--config.train.write_grids=False", "--config.train.probe_at_end=False"]
  t0 = time.perf_counter()
  marks: dict[str, float | None] = {"first_step_s": None, "loaded_step_s": None}
  with subprocess.Popen(cmd, cwd=_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        text=True) as proc:
    tail = []
    for line in proc.stderr:
      now = time.perf_counter() - t0
      tail = (tail + [line])[-20:]
      if marks["first_step_s"] is None and re.search(r"\] step 1/", line):
        marks["first_step_s"] = now
      if marks["loaded_step_s"] is None and "Loaded the compiled train_step" in line:
        marks["loaded_step_s"] = now
    rc = proc.wait()
  if rc != 0:
    raise RuntimeError(f"the run failed (exit {rc}):\n{''.join(tail)}")
  marks["total_s"] = time.perf_counter() - t0
  return marks


def main(argv):
  del argv
  base = tempfile.mkdtemp(prefix="sami_jax_startup_")
  cache = _KEEP_CACHE.value or os.path.join(base, "cache")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
  runs = []
  try:
    for i in range(_RUNS.value):
      marks = _one_run(os.path.join(base, f"wd{i}"), env)
      marks["load_average_1min"] = os.getloadavg()[0]
      runs.append(marks)
      print(f"run {i + 1}: {json.dumps(marks)}", file=sys.stderr)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  common.emit({"benchmark": "startup", "config": _CONFIG.value, "runs": runs,
               "python": sys.version.split()[0], "device": common.device_info()})


if __name__ == "__main__":
  app.run(main)
