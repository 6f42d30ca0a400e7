r"""Sampling benchmark: SAMI reconstructions per second with DDIM (guided by jax.grad of the
encoder's log q at every step).

  python benchmarks/sample.py --config=configs/disks.py:cpu [--batch=64] [--sampling_steps=50] \
      [--repeats=3] [--workdir=DIR] [--out=results/sample.json]

Prints one JSON object: compile time, seconds per call (median of --repeats blocked calls after
one warm-up), reconstructions/s, seconds per reverse step, the same for unconditional generation
(no guidance) for comparison, and peak memory. Params are the EMA params of --workdir's latest
checkpoint if given, else a random init (the cost does not depend on the values).
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
_BATCH = flags.DEFINE_integer("batch", 64, "Images reconstructed per call.")
_SAMPLING_STEPS = flags.DEFINE_integer("sampling_steps", 50, "DDIM steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (after one warm-up call).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Use this run's checkpoint (default: random init).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from sami_jax import inference  # pylint: disable=g-import-not-at-top
  from sami_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from sami_jax import samplers  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _WORKDIR.value:
    config, params, step = inference.restore(_WORKDIR.value, given=config)
    source = f"{_WORKDIR.value} step {step}"
  else:
    params = models_lib.initialize(config, jax.random.PRNGKey(config.seed))
    source = "random init"
  comp = inference.components(config)
  b, n = _BATCH.value, _SAMPLING_STEPS.value
  x0 = jax.numpy.asarray(common.synthetic_batch(config, b)["image"])
  rng = jax.random.PRNGKey(0)
  # One device: sampling is per-example work; several devices would only split the batch.
  recon = jax.jit(lambda p, x, r: inference.reconstruct(
      comp, p, x, r, steps=n, gamma=config.sampling.guidance_scale))
  uncond = jax.jit(lambda p, r: samplers.generate(
      samplers.unconditional_eps_fn(comp.image_model, p), comp.schedule, b,
      comp.image_shape, r, steps=n, sampler="ddim", eta=0.0))

  result = {"benchmark": "sample", "device": common.device_info(), "params": source,
            "kind": config.model.kind, "batch": b, "sampler": f"ddim-{n}",
            "image_shape": list(x0.shape[1:]), "dtype": config.model.dtype}
  timed = [("reconstruct", recon, (params, x0, rng))]
  if comp.kind.image_model == "denoiser":
    timed.append(("generate_unguided", uncond, (params, rng)))
  for name, fn, args in timed:
    compiled, compile_s, _ = common.compile_with_cost(fn, *args)
    stats = common.time_calls(lambda c=compiled, a=args: c(*a), warmup=1,
                              iters=_REPEATS.value)
    sec = stats["median_s"]
    result[name] = {"compile_s": compile_s, "call_time": stats, "images_per_sec": b / sec,
                    "seconds_per_reverse_step": sec / n}
  result["reconstructions_per_sec"] = result["reconstruct"]["images_per_sec"]
  if "generate_unguided" in result:
    result["guided_over_unguided_time"] = (result["reconstruct"]["call_time"]["median_s"] /
                                           result["generate_unguided"]["call_time"]["median_s"])
  result["memory"] = common.memory_report()
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
