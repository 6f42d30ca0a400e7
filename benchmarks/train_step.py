r"""Train-step benchmark: SAMI vs plain diffusion (model.kind="ddpm") with the same U-Net.

  python benchmarks/train_step.py --config=configs/disks.py:cpu [--batch=64] [--steps=10] \
      [--kinds=ddpm,sami] [--xla_options=recommended] [--config.model.dtype=bfloat16] \
      [--out=results/train_step.json]

Prints one JSON object. For each step kind ("ddpm": the same U-Net trained as plain diffusion, no
encoder or guidance; "sami": the config's kind):
  init_s, compile_s       state creation; train-step lowering + compilation;
  first_step_s            the first call of the compiled step (what a run waits for before its
                          first step, on top of compile_s and init_s);
  step_time               wall seconds per step over --steps blocked steps after 2 warm-up steps
                          (median_s, mean_s, min_s, max_s) and the median process CPU seconds;
  images_per_sec          batch / median step time;
  gflops_per_step_per_device   XLA's cost analysis of the compiled step (per device);
  achieved_flops_per_sec_per_device, fraction_of_measured_peak
                          FLOP/s at the median step time, and that over the peak below;
  paired_fraction_of_peak every timed step is followed by one untimed and one timed peak
                          matmul (the first after a step runs slow): the median over steps of
                          (step FLOP/s) / (the timed matmul's FLOP/s). On a machine shared with
                          other programs this compares like with like;
then "peak": the best FLOP/s of a square matmul in the model's compute dtype (float32 on CPU,
bfloat16 with --config.model.dtype=bfloat16 on an accelerator), measured in the same run, and
"sami_over_plain": the SAMI / plain ratios of step time and FLOPs, the step-time ratio over the
FLOP ratio (1.0 when SAMI's extra work runs as efficiently as the plain step's), and the same from
the paired fractions (paired_step_time_over_flops: not thrown off by load that changed between
the two kinds' measurements).

--xla_options: "jit" (default) times the step exactly as the project compiles it;
"recommended" adds sami_jax.utils.xla_options.recommended_compiler_options(); a JSON object adds
those XLA debug options. Data are synthetic (uniform noise images): the input pipeline is not
part of the figure (benchmarks/input_pipeline.py measures it). Importing this file runs nothing.
"""

from __future__ import annotations

import os
import sys

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
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_KINDS = flags.DEFINE_list("kinds", ["ddpm", "sami"],
                           "Step kinds: 'ddpm' (plain diffusion) and/or 'sami' (the config's kind).")
_MATMUL = flags.DEFINE_integer("matmul_size", None, "Side of the peak-FLOP/s matmul "
                               "(default 2048 on CPU, 8192 on accelerators).")
_XLA = flags.DEFINE_string("xla_options", "jit", "XLA options added to the project's jit: "
                           "'jit' (none), 'recommended', or a JSON object.")


def run(config, *, kinds=("ddpm", "sami"), steps: int = 10, matmul_size: int | None = None,
        xla_options: str = "jit") -> dict:
  """The benchmark's result for `config` (see the module docstring)."""
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  configlib.validate(config, jax.device_count(), jax.process_count())
  options = common.compiler_options(xla_options)
  result = {"benchmark": "train_step", "device": common.device_info(),
            "xla_options": options,
            "config": {"model.kind": config.model.kind,
                       "model.dtype": config.model.dtype,
                       "model.denoiser.ch": config.model.denoiser.ch,
                       "model.denoiser.ch_mult": list(config.model.denoiser.ch_mult),
                       "model.denoiser.num_res_blocks": config.model.denoiser.num_res_blocks,
                       "model.denoiser.attn_resolutions":
                           list(config.model.denoiser.attn_resolutions),
                       "model.denoiser.remat": config.model.denoiser.remat,
                       "model.encoder.ch": config.model.encoder.ch,
                       "data.image_size": config.data.image_size,
                       "train.batch_size": config.train.batch_size, "mesh": config.mesh}}
  peak_call, peak_flops, size = common.matmul_probe(config.model.dtype, matmul_size)
  peak = common.time_calls(peak_call, warmup=1, iters=5)

  # Plain diffusion first: peak memory figures only grow, so measured after SAMI they would
  # report SAMI's peak for both.
  for name in kinds:
    cfg = config.copy_and_resolve_references()
    if name == "ddpm":
      with cfg.unlocked():
        cfg.model.kind = "ddpm"
    elif name != "sami":
      raise ValueError(f"--kinds: unknown step kind {name!r}; use 'ddpm' and/or 'sami'.")
    r = common.benchmark_train_step(cfg, steps=steps, xla_options=options, peak_call=peak_call,
                                    peak_flops_per_call=peak_flops)
    r["memory_after"] = common.memory_report()
    result[name] = r

  # The peak again after the steps, so that a quiet spell at either end counts.
  after = common.time_calls(peak_call, warmup=0, iters=5)
  best = min(peak["min_s"], after["min_s"])
  result["peak"] = {"dtype": config.model.dtype if config.model.dtype else "float32",
                    "matmul_size": size, "flops_per_sec": peak_flops / best,
                    "flops_per_cpu_sec": peak_flops / min(peak["cpu_median_s"],
                                                          after["cpu_median_s"])}
  for name in kinds:
    r = result[name]
    if "achieved_flops_per_sec_per_device" in r:
      r["fraction_of_measured_peak"] = (r["achieved_flops_per_sec_per_device"] /
                                        result["peak"]["flops_per_sec"])
      r["cpu_fraction_of_peak"] = (r["achieved_flops_per_cpu_sec"] /
                                   result["peak"]["flops_per_cpu_sec"])

  if "sami" in result and "ddpm" in result:
    s, p = result["sami"], result["ddpm"]
    ratio = {"step_time": s["step_time"]["median_s"] / p["step_time"]["median_s"],
             "compile_time": s["compile_s"] / p["compile_s"]}
    if s["flops_per_step_per_device"] and p["flops_per_step_per_device"]:
      ratio["flops"] = s["flops_per_step_per_device"] / p["flops_per_step_per_device"]
      ratio["step_time_over_flops"] = ratio["step_time"] / ratio["flops"]
    if "paired_fraction_of_peak" in s and "paired_fraction_of_peak" in p:
      # The same ratio with each step time scaled by the matmul timed next to it: what it would
      # be if both kinds had run under the same load.
      ratio["paired_step_time_over_flops"] = (p["paired_fraction_of_peak"] /
                                              s["paired_fraction_of_peak"])
    result["sami_over_plain"] = ratio
  result["memory"] = common.memory_report()
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value is not None:
    config.train.batch_size = _BATCH.value
  common.emit(run(config, kinds=tuple(_KINDS.value), steps=_STEPS.value,
                  matmul_size=_MATMUL.value, xla_options=_XLA.value))


if __name__ == "__main__":
  app.run(main)
