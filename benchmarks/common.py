"""Shared pieces of the benchmarks: timing, XLA cost analysis, a measured peak, memory, JSON output.

Every benchmark prints one JSON object to stdout (and writes it to --out if given). Timings are
wall-clock seconds of blocked (`block_until_ready`) work, so asynchronous dispatch is included.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")


def device_info() -> dict[str, Any]:
  """What the figures were measured on."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "host_cpus": os.cpu_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def block(tree) -> None:
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def compile_with_cost(jitted, *args) -> tuple[Any, float, float | None]:
  """Lowers and compiles `jitted` for `args`. Returns (compiled, compile seconds, flops).

  flops is XLA's HLO cost analysis of the compiled program: the FLOPs one device executes per
  call (for an SPMD program over several devices, each device's share). None when the backend
  does not report it. Loops (`lax.scan`) are not multiplied by their trip count by XLA, so only
  loop-free programs (a train step) give a meaningful total.
  """
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
      cost = cost[0] if cost else None
    if cost and cost.get("flops", -1) > 0:
      flops = float(cost["flops"])
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    flops = None
  return compiled, seconds, flops


def time_calls(fn: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, float]:
  """Calls fn() warmup + iters times, blocking on each result; per-call seconds statistics."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  arr = np.asarray(times)
  return {"mean_s": float(arr.mean()), "median_s": float(np.median(arr)),
          "min_s": float(arr.min()), "max_s": float(arr.max()), "iters": int(iters)}


def measured_peak_flops(dtype: str, size: int | None = None, iters: int = 5) -> dict[str, Any]:
  """Best achieved FLOP/s of one device on a square matmul in `dtype` (the practical peak that
  the model's FLOP/s are compared with). The size defaults to 2048 on CPU and 8192 elsewhere."""
  dev = jax.devices()[0]
  if size is None:
    size = 2048 if dev.platform == "cpu" else 8192
  dt = jnp.dtype(dtype)
  a = jax.device_put(jnp.ones((size, size), dt), dev)
  b = jax.device_put(jnp.ones((size, size), dt), dev)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
  stats = time_calls(lambda: mm(a, b), warmup=2, iters=iters)
  flops = 2.0 * size ** 3
  return {"dtype": str(dt), "size": size, "flops_per_sec": flops / stats["min_s"],
          "seconds_best": stats["min_s"]}


def memory_report() -> dict[str, Any]:
  """Peak host RSS of this process, and the first device's allocator statistics if it has them."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  rss_bytes = rss if sys.platform == "darwin" else rss * 1024
  out: dict[str, Any] = {"host_peak_rss_mib": rss_bytes / 2 ** 20}
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats:
    for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
      if key in stats:
        out[f"device_{key.replace('bytes', 'mib')}"] = stats[key] / 2 ** 20
  return out


def emit(result: dict[str, Any]) -> None:
  """Prints the result as JSON on stdout and writes it to --out if given."""
  text = json.dumps(result, indent=2, sort_keys=True, default=float)
  print(text)
  if OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(OUT.value)), exist_ok=True)
    with open(OUT.value, "w") as f:
      f.write(text + "\n")


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the config's image shape, uniform in [-1, 1] (isolates compute from input)."""
  rng = np.random.default_rng(seed)
  s, c = config.data.image_size, config.data.channels
  return {"image": rng.uniform(-1.0, 1.0, (batch_size, s, s, c)).astype(np.float32)}


def benchmark_train_step(config, *, steps: int, warmup: int = 2) -> dict[str, Any]:
  """Compile time, steady-state step time, images/s and FLOPs of the jitted, sharded train step
  of `config` (synthetic data, config.train.batch_size images per step)."""
  from sami_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from sami_jax import train  # pylint: disable=g-import-not-at-top

  mesh = sharding_lib.make_mesh(config)
  t0 = time.perf_counter()
  state, shardings = train.create_sharded_state(config, mesh)
  block(state)
  init_s = time.perf_counter() - t0
  step_fn = train.jit_train_step(config, mesh, shardings)
  batch = sharding_lib.global_batch(synthetic_batch(config, config.train.batch_size), mesh)
  compiled, compile_s, flops = compile_with_cost(step_fn, state, batch)

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics
  stats = time_calls(one_step, warmup=warmup, iters=steps)
  step_s = stats["median_s"]
  out = {
      "model_kind": config.model.kind,
      "dtype": config.model.dtype,
      "batch_size": int(config.train.batch_size),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "init_s": init_s,
      "compile_s": compile_s,
      "step_time": stats,
      "images_per_sec": config.train.batch_size / step_s,
      "flops_per_step_per_device": flops,
  }
  if flops is not None:
    out["achieved_flops_per_sec_per_device"] = flops / step_s
  return out
