r"""Interleaved A/B timing of the train step: two source trees, two sets of XLA options, or both.

  python benchmarks/ab_step.py --a=HEAD~1 --b=. --config=configs/disks.py:cpu --kind=sami \
      [--batch=64] [--rounds=8] [--a_xla=jit] [--b_xla=recommended] \
      [--a_malloc=as_is] [--b_malloc=jemalloc] [--config.x=y ...]

--a and --b each name a source tree: a directory holding a sami_jax checkout, or a git revision of
this repository (exported with `git archive` into a temporary directory). Each side runs in its own
process with its own tree first on sys.path, builds the same config (--config and every
--config.x=y override are passed to both), and compiles the step once (--a_xla / --b_xla: the XLA
options added to the project's jit, as in train_step.py: "jit", "recommended" or a JSON object).
--a_malloc / --b_malloc=jemalloc start that side with jemalloc preloaded as launch/cpu.sh does
(the same tree on both sides then times the allocator alone).

Before any timing, both sides compute the loss and its gradient w.r.t. all params at the same
perturbed params, batch, key and step (`check`: the relative L2 difference of the whole gradient
and of the worst parameter leaf), so a speed-up that changed the math shows up next to its timing.

Then, for --rounds rounds, the driver asks the sides for one step each in the order A B B A, so
both see the same load from other programs; it reports per side the median wall and CPU seconds
of a step and the ratio B / A (median over rounds of the per-round ratio, with its quartiles).
On a shared machine read the CPU-time ratio first: other processes inflate wall time far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

# Only the helpers: each side imports sami_jax from its own tree (PYTHONPATH), not this one.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/disks.py:cpu", "Config file[:variant]; --config.x=y overrides apply.",
    lock_config=True)
_A = flags.DEFINE_string("a", "HEAD", "Side A: a directory or a git revision.")
_B = flags.DEFINE_string("b", ".", "Side B: a directory or a git revision.")
_A_XLA = flags.DEFINE_string("a_xla", "jit", "XLA options of side A (see train_step.py).")
_B_XLA = flags.DEFINE_string("b_xla", "jit", "XLA options of side B.")
_A_MALLOC = flags.DEFINE_enum("a_malloc", "as_is", ["as_is", "jemalloc"],
                              "Side A's allocator: this process's, or jemalloc preloaded as "
                              "launch/cpu.sh does.")
_B_MALLOC = flags.DEFINE_enum("b_malloc", "as_is", ["as_is", "jemalloc"], "Side B's allocator.")
_KIND = flags.DEFINE_string("kind", None, "model.kind to time (default: the config's).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: the config's).")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "ABBA rounds (each side runs 2 steps per round).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side before the rounds.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run as a worker with this XLA spec.")
_CHECK_OUT = flags.DEFINE_string("check_out", None, "Internal: where a worker saves its check.")

_PERTURB = 0.03  # params move this far (absolute, per element) from init before the check


def _worker(config) -> None:
  """Compiles the step, saves the loss/gradient check, then serves 'step' requests on stdin."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  project = common.api()
  options = common.compiler_options(_WORKER.value)
  state = project.init_state(config, jax.random.PRNGKey(config.seed))
  batch = {"image": jnp.asarray(common.synthetic_batch(config, config.train.batch_size)["image"])}

  # The check: loss and gradient at perturbed params (zero-initialised layers become active).
  leaves, treedef = jax.tree_util.tree_flatten(state["params"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(treedef, [
      x + _PERTURB * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  loss_fn = project.loss_fn(config)
  rng, step = jax.random.PRNGKey(2), jnp.asarray(10, jnp.int32)
  grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, rng, step, train=True)[0]))
  loss, grads = common.compile_with_cost(grad_fn, params, compiler_options=options)[0](params)
  flat = {jax.tree_util.keystr(path): np.asarray(g)
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  np.savez(_CHECK_OUT.value, __loss__=np.asarray(loss), **flat)

  step_fn = jax.jit(project.make_train_step(config))
  compiled, compile_s, flops = common.compile_with_cost(step_fn, state, batch,
                                                        compiler_options=options)
  for _ in range(_WARMUP.value):
    common.block(compiled(state, batch))
  from sami_jax.utils import host_memory  # pylint: disable=g-import-not-at-top
  allocator = getattr(host_memory, "active_allocator", lambda: None)()  # None: an older tree
  print(json.dumps({"ready": True, "compile_s": compile_s, "flops": flops,
                    "jax": jax.__version__, "allocator": allocator}), flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    wall, cpu = common.timed_call(lambda: compiled(state, batch))
    print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def _tree(spec: str, tmp: str, name: str) -> str:
  """A directory holding the source tree `spec` (a directory, or a git revision exported)."""
  if os.path.isdir(spec):
    return os.path.abspath(spec)
  root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                        check=True).stdout.strip()
  out = os.path.join(tmp, name)
  os.makedirs(out)
  archive = subprocess.run(["git", "-C", root, "archive", spec], capture_output=True, check=True)
  subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
  return out


def _preload(malloc: str) -> dict[str, str]:
  """The environment a side's worker gets for --a_malloc / --b_malloc."""
  if malloc == "as_is":
    return {}
  from sami_jax.utils import host_memory  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  preload = host_memory.preload_environment(env)
  if not preload:
    raise app.UsageError(f"--*_malloc=jemalloc: jemalloc not found; {host_memory.INSTALL_HINT}")
  return preload


class _Side:
  """One worker process."""

  def __init__(self, name: str, tree: str, xla: str, forwarded: list[str], tmp: str,
               preload: dict[str, str]):
    self.name, self.tree = name, tree
    self.check_path = os.path.join(tmp, f"check_{name}.npz")
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **preload)
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={xla}",
           f"--check_out={self.check_path}", f"--warmup={_WARMUP.value}", *forwarded]
    self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.ready = None
    self.wall, self.cpu = [], []

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"side {self.name} ({self.tree}) exited with code "
                         f"{self.proc.wait()}; its error is above.")
    return json.loads(line)

  def step(self) -> tuple[float, float]:
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    r = self.read()
    self.wall.append(r["wall"])
    self.cpu.append(r["cpu"])
    return r["wall"], r["cpu"]

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait()


def compare_checks(path_a: str, path_b: str) -> dict:
  """Largest differences between two saved loss/gradient checks (B relative to A)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.load(path_a), np.load(path_b)
  la, lb = float(a["__loss__"]), float(b["__loss__"])
  out = {"loss_a": la, "loss_b": lb, "loss_rel_diff": abs(la - lb) / max(abs(la), 1e-30)}
  keys_a = set(a.files) - {"__loss__"}
  keys_b = set(b.files) - {"__loss__"}
  if keys_a != keys_b:
    out["param_paths_differ"] = sorted(keys_a ^ keys_b)
    return out
  grads = {k: (a[k].astype(np.float64), b[k].astype(np.float64)) for k in sorted(keys_a)}
  norms = {k: float(np.linalg.norm(ga)) for k, (ga, _) in grads.items()}
  # Leaves whose gradient is ~0 (e.g. a bias that the loss barely sees) have no meaningful
  # relative difference: compare only leaves within 1e-3 of the largest leaf's norm.
  floor = 1e-3 * max(norms.values(), default=0.0)
  worst, worst_key, num, den = 0.0, None, 0.0, 0.0
  for k, (ga, gb) in grads.items():
    diff = float(np.linalg.norm(ga - gb))
    if norms[k] > floor and diff / norms[k] > worst:
      worst, worst_key = diff / norms[k], k
    num += diff ** 2
    den += norms[k] ** 2
  out.update(grad_rel_l2_diff=(num / den) ** 0.5 if den > 0 else 0.0,
             worst_leaf_rel_l2_diff=worst, worst_leaf=worst_key)
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  with config.unlocked():
    if _KIND.value:
      config.model.kind = _KIND.value
    if _BATCH.value:
      config.train.batch_size = _BATCH.value
  if _WORKER.value is not None:
    _worker(config)
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  forwarded = [a for a in sys.argv[1:] if a.startswith(("--config", "--kind", "--batch"))]
  preloads = [_preload(m.value) for m in (_A_MALLOC, _B_MALLOC)]
  with tempfile.TemporaryDirectory() as tmp:
    a_tree, b_tree = _tree(_A.value, tmp, "a"), _tree(_B.value, tmp, "b")
    sides = [_Side("a", a_tree, _A_XLA.value, forwarded, tmp, preloads[0]),
             _Side("b", b_tree, _B_XLA.value, forwarded, tmp, preloads[1])]
    try:
      # One at a time: compiling both at once would slow both and say nothing.
      for side in sides:
        side.ready = side.read()
      check = compare_checks(sides[0].check_path, sides[1].check_path)
      ratios_wall, ratios_cpu = [], []
      t0 = time.perf_counter()
      for _ in range(_ROUNDS.value):
        a1, b1, b2, a2 = (sides[0].step(), sides[1].step(), sides[1].step(), sides[0].step())
        ratios_wall.append((b1[0] + b2[0]) / (a1[0] + a2[0]))
        ratios_cpu.append((b1[1] + b2[1]) / (a1[1] + a2[1]))
      elapsed = time.perf_counter() - t0
    finally:
      for side in sides:
        side.close()

  def q(values):
    return {"median": float(np.median(values)), "q25": float(np.percentile(values, 25)),
            "q75": float(np.percentile(values, 75))}
  result = {"benchmark": "ab_step", "device": common.device_info(),
            "kind": config.model.kind, "batch_size": int(config.train.batch_size),
            "rounds": _ROUNDS.value, "elapsed_s": elapsed, "check": check,
            "b_over_a": {"wall": q(ratios_wall), "cpu": q(ratios_cpu)}}
  for side, spec, xla in ((sides[0], _A.value, _A_XLA.value), (sides[1], _B.value, _B_XLA.value)):
    result[side.name] = {"tree": spec, "xla_options": xla, "compile_s": side.ready["compile_s"],
                         "allocator": side.ready.get("allocator"),
                         "gflops": (side.ready["flops"] or 0) / 1e9,
                         "step_wall_median_s": float(np.median(side.wall)),
                         "step_cpu_median_s": float(np.median(side.cpu))}
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
