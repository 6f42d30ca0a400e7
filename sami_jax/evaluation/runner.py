"""Runs the evaluation sections on a checkpoint: `--mode=eval`, the end-of-run probe and
`sami_jax.compare` all go through here.

    path = run(config, workdir)          # --mode=eval -> workdir/eval/<step>/report.json
    report, tables = evaluate(config, params, step, ["disentanglement"], out_dir=None)
    summary = probe(config, params)      # the end-of-run factor probe (Disks)

On the latest checkpoint (or `eval.step`), with the EMA params and the config saved with the run
(merged with the given one by configlib.for_inference: eval.*, sampling.* and the data location
come from the command line), it runs the sections of `sections.SECTIONS` that apply to the dataset
and the model kind. Every section records its wall time; a section that does not apply is listed
with the reason. Files in workdir/eval/<step>/: report.json (strict JSON: NaN is written as null),
report.md (a table per section) and the PNG figures. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from sami_jax import configlib
from sami_jax import inference
from sami_jax.evaluation import sections as sections_lib
from sami_jax.evaluation import tables as tables_lib
from sami_jax.evaluation.context import Context


def evaluate(config: ml_collections.ConfigDict, params: Any, step: int, chosen: list[str],
             out_dir: str | None, workdir: str | None = None
             ) -> tuple[dict[str, Any], dict[str, tables_lib.Tables], Context]:
  """Runs the chosen sections that apply; returns (report dict, tables per section, context).
  workdir: the run's, where a fitted latent prior is kept (None: fitted in memory if needed)."""
  ctx = Context(config, params, step, out_dir, workdir)
  report: dict[str, Any] = {
      "step": step, "dataset": config.data.name, "model_kind": ctx.kind.name,
      "image_shape": list(ctx.image_shape),
      "latent_dim": ctx.comp.latent_dim if ctx.kind.has_encoder else 0,
      "sections": {}, "figures": [],
  }
  tables: dict[str, tables_lib.Tables] = {}
  for name, section in sections_lib.SECTIONS.items():
    if name not in chosen:
      report["sections"][name] = {"skipped": "not selected by config.eval.sections"}
      continue
    reason = section.applies(ctx)
    if reason:
      report["sections"][name] = {"skipped": reason}
      continue
    t0 = time.time()
    result, section_tables = section.run(ctx)
    result["wall_time_s"] = time.time() - t0
    report["sections"][name] = result
    tables[name] = section_tables
    logging.info("Eval section %s: %.1f s.", name, result["wall_time_s"])
  report["figures"] = list(ctx.figures)
  return report, tables, ctx


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Evaluates a run's checkpoint (`--mode=eval`); returns the path of the report.json it wrote.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`.
    ConfigError: a field is wrong (before anything is compiled).
  """
  t_start = time.time()
  step_arg = None if config.eval.step < 0 else int(config.eval.step)
  cfg, params, step = inference.restore(workdir, step_arg, given=config)
  configlib.validate(cfg)
  chosen = configlib.eval_sections(cfg)
  out_dir = os.path.join(workdir, "eval", str(step))
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  logging.info("Evaluating step %d of %s (%s on %s) into %s.", step, workdir, cfg.model.kind,
               cfg.data.name, out_dir)
  report, tables, _ = evaluate(cfg, params, step, chosen, out_dir, workdir)
  report["workdir"] = os.path.abspath(workdir)
  report["wall_time_s"] = time.time() - t_start
  path = os.path.join(out_dir, "report.json")
  if is_main:
    clean = tables_lib.jsonable(report)
    with open(path, "w") as f:
      json.dump(clean, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(tables_lib.markdown(clean, tables))
  return path


def probe(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any] | None:
  """The end-of-run summary of how well the latents predict each ground-truth factor (the
  disentanglement section's probe), or None when the run has no latents or no factors."""
  ctx = Context(config, params, step=-1, out_dir=None)
  if sections_lib.SECTIONS["disentanglement"].applies(ctx):
    return None
  return sections_lib.factor_probe(ctx)


def probe_lines(summary: dict[str, Any]) -> str:
  """The probe summary as one line per factor."""
  return "\n".join(f"  {name:>12s}: linear R^2 {lin:6.3f} | kNN R^2 {knn:6.3f}" for name, lin, knn
                   in zip(summary["factors"], summary["linear_r2"], summary["knn_r2"]))
