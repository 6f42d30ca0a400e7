r"""Train-step benchmark: SAMI vs plain diffusion (model.kind="ddpm") with the same U-Net.

  python benchmarks/train_step.py --config=configs/disks.py:cpu [--batch=64] [--steps=10] \
      [--config.model.dtype=bfloat16] [--out=results/train_step.json]

Prints one JSON object: for each of "sami" and "ddpm" the compile time, steady-state step time
(median of --steps blocked steps after 2 warm-up steps), images/s, XLA's FLOPs per step (per
device), achieved FLOP/s and that as a fraction of the device's peak measured in the same run (a
large matmul in the model's compute dtype); then the SAMI/plain ratios and the peak memory.
Data are synthetic (uniform noise images), so the input pipeline is not part of the figure
(benchmarks/input_pipeline.py measures it).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/disks.py:cpu", "Config file[:variant]; --config.x=y overrides apply.",
    lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None,
                              "Global batch size (default: config.train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_MATMUL = flags.DEFINE_integer("matmul_size", None, "Side of the peak-FLOP/s matmul "
                               "(default 2048 on CPU, 8192 on accelerators).")


def main(argv):
  del argv
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _BATCH.value is not None:
    config.train.batch_size = _BATCH.value
  configlib.validate(config, jax.device_count(), jax.process_count())
  result = {"benchmark": "train_step", "device": common.device_info(),
            "config": {"model.denoiser.ch": config.model.denoiser.ch,
                       "model.denoiser.ch_mult": list(config.model.denoiser.ch_mult),
                       "model.denoiser.num_res_blocks": config.model.denoiser.num_res_blocks,
                       "model.denoiser.remat": config.model.denoiser.remat,
                       "data.image_size": config.data.image_size, "mesh": config.mesh}}
  peak = common.measured_peak_flops(config.model.dtype, _MATMUL.value)
  result["peak"] = peak

  # Plain diffusion first: peak memory figures only grow, so measured after SAMI they would
  # report SAMI's peak for both.
  plain_config = config.copy_and_resolve_references()
  with plain_config.unlocked():
    plain_config.model.kind = "ddpm"
  for name, cfg in (("ddpm", plain_config), ("sami", config)):
    r = common.benchmark_train_step(cfg, steps=_STEPS.value)
    if "achieved_flops_per_sec_per_device" in r:
      r["fraction_of_measured_peak"] = (r["achieved_flops_per_sec_per_device"] /
                                        peak["flops_per_sec"])
    r["memory_after"] = common.memory_report()
    result[name] = r

  s, p = result["sami"], result["ddpm"]
  result["sami_over_plain"] = {
      "step_time": s["step_time"]["median_s"] / p["step_time"]["median_s"],
      "compile_time": s["compile_s"] / p["compile_s"],
  }
  if s["flops_per_step_per_device"] and p["flops_per_step_per_device"]:
    result["sami_over_plain"]["flops"] = (s["flops_per_step_per_device"] /
                                          p["flops_per_step_per_device"])
  result["memory"] = common.memory_report()
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
