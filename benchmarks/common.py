"""Shared pieces of the benchmarks: timing, XLA cost analysis, a measured peak, memory, JSON output.

Every benchmark prints one JSON object to stdout (and writes it to --out if given). Timings are
wall-clock seconds of blocked (`block_until_ready`) work, so asynchronous dispatch is included;
most also report the process CPU seconds of the same calls (`cpu_s`), which other programs on the
same cores inflate much less than they inflate wall time.

Importing this module is cheap: jax and the project are imported inside the functions that need
them, and the project functions come from one place, `api()`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import types
from typing import Any, Callable

import numpy as np
from absl import flags

OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")


def _package_has(relpath: str) -> bool:
  """Whether the imported sami_jax package has this file. Asked before importing a module that
  older trees lack: an editable install of another checkout would otherwise supply it."""
  import sami_jax  # pylint: disable=g-import-not-at-top
  return os.path.exists(os.path.join(os.path.dirname(os.path.abspath(sami_jax.__file__)),
                                     relpath))


def api() -> types.SimpleNamespace:
  """The project functions the benchmarks use, imported here and nowhere else.

  The train state and step live in `sami_jax.train_state`, inference helpers in
  `sami_jax.inference` and the loss in `sami_jax.kinds`; older trees have them in
  `sami_jax.train` and `sami_jax.objective` (so that
  benchmarks/ab_step.py can also run a baseline checkout).
  """
  if _package_has("train_state.py"):
    from sami_jax import inference  # pylint: disable=g-import-not-at-top
    from sami_jax import kinds  # pylint: disable=g-import-not-at-top
    from sami_jax import train_state  # pylint: disable=g-import-not-at-top

    def loss_fn(config):
      comp = inference.components(config)
      return kinds.make_loss_fn(config, comp.image_model, comp.encoder, comp.schedule)
    return types.SimpleNamespace(
        loss_fn=loss_fn,
        init_state=train_state.init_state, make_train_step=train_state.make_train_step,
        jit_train_step=lambda config, mesh, shardings: train_state.jit_train_step(config, mesh),
        create_sharded_state=lambda config, mesh: (
            train_state.create_sharded_state(config, mesh),
            train_state.state_shardings(config, mesh)),
        components=inference.components,
        restore_for_inference=lambda config, workdir: inference.restore(workdir, given=config))
  from sami_jax import objective  # pylint: disable=g-import-not-at-top
  from sami_jax import train  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(
      loss_fn=lambda config: objective.make_loss_fn(config, *train.components(config)),
      init_state=train.init_state, make_train_step=train.make_train_step,
      jit_train_step=train.jit_train_step, create_sharded_state=train.create_sharded_state,
      components=train.components, restore_for_inference=train.restore_for_inference)


def device_info() -> dict[str, Any]:
  """What the figures were measured on."""
  import jax  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import host_memory  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = None
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "host_cpus": os.cpu_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_1min": load,
          "allocator": host_memory.active_allocator()}


def block(tree) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def cost_of(compiled) -> dict[str, float]:
  """XLA's HLO cost analysis of a compiled program: {"flops", "bytes_accessed"} (those reported).

  The FLOPs one device executes per call (for an SPMD program, each device's share). Loops
  (`lax.scan`) are not multiplied by their trip count by XLA, so only loop-free programs (a train
  step) give a meaningful total.
  """
  out = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
      cost = cost[0] if cost else None
    if cost:
      if cost.get("flops", -1) > 0:
        out["flops"] = float(cost["flops"])
      if cost.get("bytes accessed", -1) > 0:
        out["bytes_accessed"] = float(cost["bytes accessed"])
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    pass
  return out


def compile_with_cost(jitted, *args, compiler_options: dict[str, Any] | None = None
                      ) -> tuple[Any, float, float | None]:
  """Lowers and compiles `jitted` for `args`. Returns (compiled, compile seconds, flops or None)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = (lowered.compile(compiler_options=compiler_options) if compiler_options
              else lowered.compile())
  seconds = time.perf_counter() - t0
  return compiled, seconds, cost_of(compiled).get("flops")


def _stats(values) -> dict[str, float]:
  arr = np.asarray(values, np.float64)
  return {"median_s": float(np.median(arr)), "mean_s": float(arr.mean()),
          "min_s": float(arr.min()), "max_s": float(arr.max())}


def timed_call(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one blocked call of fn()."""
  t0, c0 = time.perf_counter(), time.process_time()
  block(fn())
  return time.perf_counter() - t0, time.process_time() - c0


def second_call_seconds(fn: Callable[[], Any]) -> float:
  """Wall seconds of fn()'s second blocked call, the first one untimed.

  For the matmul paired with each train step: the first matmul after a step runs 20-45% slower
  than the next ones on the 2-core CPU (see `benchmark_train_step`)."""
  block(fn())
  return timed_call(fn)[0]


def time_calls(fn: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, Any]:
  """Calls fn() warmup + iters times, blocking on each result; per-call wall-clock statistics
  (median_s, mean_s, min_s, max_s, iters) and the median process CPU seconds (cpu_median_s)."""
  for _ in range(warmup):
    block(fn())
  walls, cpus = zip(*[timed_call(fn) for _ in range(iters)])
  out = _stats(walls)
  out.update(iters=int(iters), cpu_median_s=float(np.median(cpus)))
  return out


def matmul_probe(dtype: str, size: int | None = None):
  """(call, flops per call, size): a jitted square matmul in `dtype` on the first device, the
  practical peak that model FLOP/s are compared with. Size: 2048 on CPU, 8192 elsewhere."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if size is None:
    size = 2048 if dev.platform == "cpu" else 8192
  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dt), dev)
  b = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dt), dev)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
  block(mm(a, b))
  return (lambda: mm(a, b)), 2.0 * size ** 3, size


def measured_peak_flops(dtype: str, size: int | None = None, iters: int = 5) -> dict[str, Any]:
  """Best achieved FLOP/s of one device on a square matmul in `dtype` (see `matmul_probe`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  call, flops, size = matmul_probe(dtype, size)
  stats = time_calls(call, warmup=1, iters=iters)
  return {"dtype": str(jnp.dtype(dtype)), "size": size, "flops_per_sec": flops / stats["min_s"],
          "flops_per_cpu_sec": flops / stats["cpu_median_s"], "seconds_best": stats["min_s"]}


def memory_report() -> dict[str, Any]:
  """Peak host RSS of this process, and the first device's allocator statistics if it has them."""
  import jax  # pylint: disable=g-import-not-at-top
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


def compiler_options(spec: str) -> dict[str, Any]:
  """The XLA options a benchmark adds to the project's own jit (--xla_options).

  "jit": none (the step compiles exactly as the project compiles it); "recommended": the
  options `sami_jax.utils.xla_options.recommended_compiler_options()` gives for the default
  backend (none in a tree that predates it); otherwise a JSON object of XLA debug options, e.g.
  '{"xla_cpu_experimental_ynn_fusion_type": ""}'.
  """
  if spec == "jit":
    return {}
  if spec == "recommended":
    # utils/ since the process-wide flags; models/ in the trees before them; none before that.
    if _package_has(os.path.join("utils", "xla_options.py")):
      from sami_jax.utils import xla_options  # pylint: disable=g-import-not-at-top
    elif _package_has(os.path.join("models", "xla_options.py")):
      from sami_jax.models import xla_options  # pylint: disable=g-import-not-at-top
    else:
      return {}
    return xla_options.recommended_compiler_options()
  try:
    value = json.loads(spec)
  except json.JSONDecodeError as e:
    raise ValueError(f"--xla_options={spec!r}: use 'jit', 'recommended' or a JSON object of XLA "
                     "debug options.") from e
  if not isinstance(value, dict):
    raise ValueError(f"--xla_options={spec!r} must be 'jit', 'recommended' or a JSON object.")
  return value


def benchmark_train_step(config, *, steps: int, warmup: int = 2,
                         xla_options: dict[str, Any] | None = None,
                         peak_call: Callable[[], Any] | None = None,
                         peak_flops_per_call: float | None = None) -> dict[str, Any]:
  """Compile time, first-step time, steady-state step time, images/s and FLOPs of the jitted,
  sharded train step of `config` (synthetic data, config.train.batch_size images per step).

  With `peak_call` (a matmul of `peak_flops_per_call` FLOPs) every timed step is followed by one
  untimed and one timed matmul, so that both see the same load from other programs:
  `paired_fraction_of_peak` is the median over steps of (step FLOP/s) / (that matmul's FLOP/s).
  The first matmul after a step is not the one timed: on the 2-core CPU it runs 20-45% slower
  than the matmuls after it (32x32 plain step: 71-109 GF/s, then 117-127; alone 132-137), so
  pairing with it overstated the fraction by about that much. `xla_options` are passed
  to the compiler (replacing whatever the project's jit would use).
  """
  from sami_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  project = api()

  mesh = sharding_lib.make_mesh(config)
  t0 = time.perf_counter()
  state, shardings = project.create_sharded_state(config, mesh)
  block(state)
  init_s = time.perf_counter() - t0
  step_fn = project.jit_train_step(config, mesh, shardings)
  batch = sharding_lib.global_batch(synthetic_batch(config, config.train.batch_size), mesh)
  compiled, compile_s, flops = compile_with_cost(step_fn, state, batch,
                                                 compiler_options=xla_options)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics
  first_step_s, _ = timed_call(one_step)
  for _ in range(warmup):
    block(one_step())
  walls, cpus, ratios = [], [], []
  for _ in range(steps):
    wall, cpu = timed_call(one_step)
    walls.append(wall)
    cpus.append(cpu)
    if peak_call is not None and flops:
      peak_wall = second_call_seconds(peak_call)
      ratios.append((flops / wall) / (peak_flops_per_call / peak_wall))
  stats = _stats(walls)
  stats.update(iters=int(steps), cpu_median_s=float(np.median(cpus)))
  step_s = stats["median_s"]
  out = {
      "model_kind": config.model.kind,
      "dtype": config.model.dtype,
      "batch_size": int(config.train.batch_size),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "xla_options": dict(xla_options or {}),
      "init_s": init_s,
      "compile_s": compile_s,
      "first_step_s": first_step_s,
      "step_time": stats,
      "images_per_sec": config.train.batch_size / step_s,
      "flops_per_step_per_device": flops,
  }
  if flops is not None:
    out["gflops_per_step_per_device"] = flops / 1e9
    out["achieved_flops_per_sec_per_device"] = flops / step_s
    out["achieved_flops_per_cpu_sec"] = flops / stats["cpu_median_s"]
  if ratios:
    out["paired_fraction_of_peak"] = float(np.median(ratios))
  return out
