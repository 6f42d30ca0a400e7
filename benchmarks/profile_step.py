r"""Where a train step's time goes, op by op (XLA's compiled HLO + a jax.profiler trace).

  python benchmarks/profile_step.py --config=configs/disks.py:cpu [--kinds=ddpm,sami] \
      [--batch=64] [--steps=3] [--xla_options=recommended] [--single_thread] [--top=25] \
      [--out=results/profile.json]

For each model kind it compiles the train step (as train_step.py does), runs --steps steps under
`jax.profiler.trace`, and sums the duration of every executed XLA operation (a "thunk": one fusion,
convolution, dot, copy, ...) over the trace. Each operation is put in a category read from the
compiled HLO (`compiled.as_text()`): convolutions split into forward/input-gradient and weight
gradient (XLA writes the latter as a convolution whose window is the whole feature map), dots,
layout changes (transposes, copies), concatenations, and the elementwise/reduction fusions by the
module they come from (GroupNorm, dropout, optimizer, other). It prints two Markdown tables per
kind (categories; the --top most expensive operations with their HLO shapes and source op) and
one JSON object with the same figures.

--single_thread compiles with `xla_cpu_multi_thread_eigen=false`: XLA's Eigen convolutions then
run on the calling thread, so their trace events hold their real duration (multi-threaded, an
Eigen convolution's event ends when its work is handed to the thread pool). Run it pinned to
one core (`taskset -c 1 python benchmarks/profile_step.py --single_thread ...`): the shares are
then of one core's time, comparable across runs on a loaded machine.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

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
_KINDS = flags.DEFINE_list("kinds", ["ddpm", "sami"], "model.kind values to profile.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (after 2 untraced ones).")
_XLA = flags.DEFINE_string("xla_options", "jit", "XLA options added to the project's jit: "
                           "'jit' (none), 'recommended', or a JSON object.")
_SINGLE = flags.DEFINE_bool("single_thread", False,
                            "Compile with xla_cpu_multi_thread_eigen=false (see the docstring).")
_TOP = flags.DEFINE_integer("top", 25, "Operations listed individually.")
_ALL_OPS = flags.DEFINE_bool("all_ops", False, "Also list every operation in the JSON.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Also write each compiled HLO text here.")

# Trace events that are not XLA operations.
_NOT_OPS = ("end: ", "ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool")


def _hlo_index(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
  """(instruction name -> its line, computation name -> its body) of an HLO module's text."""
  instructions = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)$", hlo, re.M):
    instructions.setdefault(m.group(1), m.group(2))
  computations = {}
  for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S):
    computations[m.group(1)] = m.group(2)
  return instructions, computations


def _describe(name: str, instructions, computations) -> dict[str, Any]:
  """Category, output shape, the heavy HLO op it wraps and its source op_name(s)."""
  line = instructions.get(name)
  if line is None:
    return {"category": "runtime (not an HLO op)", "shape": "", "op": "", "source": ""}
  called = re.search(r"calls=%?([\w.\-]+)", line)
  body = computations.get(called.group(1), "") if called else ""
  text = line + "\n" + body
  shape = line.split(" ")[0]
  sources = re.findall(r'op_name="([^"]*)"', text)
  source = sources[0] if sources else ""
  conv = re.search(r"convolution\(([^\n]*?)\), window=\{([^}]*)\}, dim_labels=([\w>\-]+)", text)
  if conv:
    size = re.search(r"size=(\d+)x(\d+)", conv.group(2))
    big_window = size and int(size.group(1)) * int(size.group(2)) > 9
    generic = "kind=kLoop" in line  # XLA's loop emitter, not a library call
    cat = ("conv: weight gradient" if big_window else "conv: forward / input gradient")
    if generic:
      cat = "conv: generic loop emitter"
    return {"category": cat, "shape": shape, "source": source,
            "op": f"conv {conv.group(3)} window {{{conv.group(2)}}}"}
  if re.search(r"\bdot\(", text):
    return {"category": "dot", "shape": shape, "source": source, "op": "dot"}
  joined = " ".join(sources)
  if re.match(r"(transpose|copy)", name) or re.search(r"= \S+ (transpose|copy)\(", body):
    cat = "layout: transpose / copy"
  elif name.startswith("concatenate") or re.search(r"= \S+ concatenate\(", body):
    cat = "concatenate"
  elif "GroupNorm" in joined or re.search(r"/norm(_\d+|_out)?/", joined):
    # layers.GroupNorm modules are named norm, norm_0, norm_1, norm_out (their ops carry the name).
    cat = "GroupNorm (with fused elementwise)"
  elif "Dropout" in joined or "random" in joined:
    cat = "dropout / RNG"
  elif re.search(r"(UNet|Encoder|ConvDecoder)\)*/[^ ]*/(pad|slice|jit\(_pad\))", joined):
    cat = "pad / slice (patches, skips)"
  elif re.search(r"(UNet|Encoder|ConvDecoder)\)*/", joined):
    cat = "other model elementwise"
  elif "opt_state" in line or not joined or "jit(train_step)/" in source:
    cat = "optimizer, EMA, loss, metrics"
  else:
    cat = "other"
  return {"category": cat, "shape": shape, "source": source, "op": line.split("(")[0][-40:]}


def op_times_from_trace(trace_dir: str, steps: int) -> dict[str, float]:
  """Seconds per step of every XLA operation in a jax.profiler trace (summed over threads)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if plane.name.startswith("/host:CPU") and not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name.startswith(_NOT_OPS):
          continue
        totals[event.name] += event.duration_ns * 1e-9 / steps
  return dict(totals)


def profile_kind(config, *, steps: int, options: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  project = common.api()
  state = project.init_state(config, jax.random.PRNGKey(config.seed))
  batch = {"image": jnp.asarray(common.synthetic_batch(config, config.train.batch_size)["image"])}
  compiled, compile_s, flops = common.compile_with_cost(
      jax.jit(project.make_train_step(config)), state, batch, compiler_options=options)
  hlo = compiled.as_text()
  for _ in range(2):
    common.block(compiled(state, batch))
  walls = [common.timed_call(lambda: compiled(state, batch))[0] for _ in range(steps)]
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        common.block(compiled(state, batch))
    times = op_times_from_trace(tmp, steps)
  instructions, computations = _hlo_index(hlo)
  ops = []
  for name, seconds in times.items():
    ops.append(dict(_describe(name, instructions, computations), name=name, seconds=seconds))
  total = sum(o["seconds"] for o in ops)
  cats: dict[str, float] = collections.defaultdict(float)
  counts: collections.Counter = collections.Counter()
  for o in ops:
    cats[o["category"]] += o["seconds"]
    counts[o["category"]] += 1
  ops.sort(key=lambda o: -o["seconds"])
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {"kind": config.model.kind, "batch_size": int(config.train.batch_size),
          "compile_s": compile_s, "gflops": (flops or 0) / 1e9,
          "step_wall_median_s": float(np.median(walls)),
          "op_seconds_per_step": total,
          "categories": [{"category": c, "seconds": s, "share": s / total, "ops": counts[c]}
                         for c, s in sorted(cats.items(), key=lambda kv: -kv[1])],
          "top_ops": ops[:_TOP.value], "all_ops": ops if _ALL_OPS.value else None, "hlo": hlo}


def markdown(result: dict[str, Any]) -> str:
  lines = [f"### {result['kind']}: batch {result['batch_size']}, {result['gflops']:.1f} GFLOP, "
           f"step {result['step_wall_median_s']:.3f} s, op time {result['op_seconds_per_step']:.3f}"
           " s/step", "", "| category | ms / step | share | ops |", "|---|---:|---:|---:|"]
  for c in result["categories"]:
    lines.append(f"| {c['category']} | {1e3 * c['seconds']:.1f} | {100 * c['share']:.1f}% | "
                 f"{c['ops']} |")
  lines += ["", "| op | ms / step | category | HLO | shape | source |", "|---|---:|---|---|---|---|"]
  for o in result["top_ops"]:
    src = o["source"].replace("jit(train_step)/", "")
    lines.append(f"| {o['name']} | {1e3 * o['seconds']:.1f} | {o['category']} | {o['op']} | "
                 f"{o['shape']} | {src} |")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  options = dict(common.compiler_options(_XLA.value))
  if _SINGLE.value:
    options["xla_cpu_multi_thread_eigen"] = False
  result = {"benchmark": "profile_step", "device": common.device_info(),
            "xla_options": options, "single_thread": _SINGLE.value, "kinds": {}}
  for kind in _KINDS.value:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model.kind = kind
      if _BATCH.value:
        cfg.train.batch_size = _BATCH.value
    t0 = time.perf_counter()
    r = profile_kind(cfg, steps=_STEPS.value, options=options)
    hlo = r.pop("hlo")
    if _HLO_DIR.value:
      os.makedirs(_HLO_DIR.value, exist_ok=True)
      with open(os.path.join(_HLO_DIR.value, f"{kind}.hlo.txt"), "w") as f:
        f.write(hlo)
    r["wall_s"] = time.perf_counter() - t0
    result["kinds"][kind] = r
    print(markdown(r) + "\n", file=sys.stderr)
  result["jax"] = jax.__version__
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
