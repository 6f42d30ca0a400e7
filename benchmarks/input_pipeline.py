r"""Input-pipeline benchmark: examples/s the grain pipeline delivers vs what the train step eats.

  python benchmarks/input_pipeline.py --config=configs/disks.py:cpu \
      --config.data.data_dir=/tmp/tfds [--batches=50] [--batch=64] [--measure_step=true] \
      [--out=results/input_pipeline.json]

Prints one JSON object: host batches (numpy, from `pipeline.train_iterator`) and device batches
(host batches made global jax.Arrays with `sharding.global_batch`, blocked) per second and
examples/s, the time to the first batch (includes preparing the dataset if it is not there yet),
and, with --measure_step, the train step's images/s on the same config (synthetic data) and the
ratio pipeline/step: above 1 means the pipeline keeps up, with that much headroom. Vary
--config.data.num_workers and --config.data.prefetch to tune it.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

# This checkout's sami_jax first (ahead of any installed copy), then the benchmarks' helpers.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/disks.py:cpu", "Config file[:variant]; --config.x=y overrides apply.",
    lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None,
                              "Global batch size (default: config.train.batch_size).")
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches (after 3 warm-up batches).")
_MEASURE_STEP = flags.DEFINE_boolean("measure_step", True,
                                     "Also time the train step (compiles it) for the ratio.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps for --measure_step.")


def _rate(it, n: int, to_device) -> dict[str, float]:
  for _ in range(3):
    common.block(to_device(next(it)))
  t0 = time.perf_counter()
  examples = 0
  for _ in range(n):
    batch = to_device(next(it))
    common.block(batch)
    examples += int(batch["image"].shape[0])
  seconds = time.perf_counter() - t0
  return {"batches_per_sec": n / seconds, "examples_per_sec": examples / seconds,
          "seconds": seconds, "batches": n}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  from sami_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from sami_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _BATCH.value is not None:
    config.train.batch_size = _BATCH.value
  configlib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding_lib.make_mesh(config)

  t0 = time.perf_counter()
  pipeline.prepare(config)
  prepare_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  it = pipeline.train_iterator(config, start_step=0)
  first = next(it)
  first_batch_s = time.perf_counter() - t0

  result = {"benchmark": "input_pipeline", "device": common.device_info(),
            "dataset": config.data.name, "image_shape": list(first["image"].shape[1:]),
            "batch_size": int(config.train.batch_size), "num_workers": config.data.num_workers,
            "prefetch": config.data.prefetch, "prepare_s": prepare_s,
            "first_batch_s": first_batch_s}
  result["host_batches"] = _rate(it, _BATCHES.value, lambda b: b)
  result["device_batches"] = _rate(it, _BATCHES.value,
                                   lambda b: sharding_lib.global_batch(b, mesh))
  if _MEASURE_STEP.value:
    step = common.benchmark_train_step(config, steps=_STEPS.value)
    result["train_step_images_per_sec"] = step["images_per_sec"]
    result["train_step_compile_s"] = step["compile_s"]
    result["pipeline_over_step"] = (result["device_batches"]["examples_per_sec"] /
                                    step["images_per_sec"])
  result["memory"] = common.memory_report()
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
