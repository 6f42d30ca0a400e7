"""SAMI against its baselines, side by side, on the same data, budget and seed.

  python -m sami_jax.compare --config=configs/disks.py:compare --workdir=DIR [--kinds=...]

Trains every model kind (`--kinds`, default all) in DIR/<kind> with the config's step and batch
budget and seed: first `ddpm` (the unconditional denoiser, which `sami_frozen` then starts from),
then `sami`, `sami_frozen`, `beta_vae` and `diffae`. Each is evaluated by the same suite
(evaluation/runner.py: factor R^2, MIG, DCI, SAP, FactorVAE, reconstruction MSE, latent curvature on
disks_video), and DIR/comparison.{md,json} get one table, DIR/traversals.png one figure with every
model's latent traversals side by side.

The per-kind settings (each kind's `compare_setup` in kinds.py, applied by `kind_config`) are the
only differences between the runs; they are written into the table's notes. The command is resumable: a kind whose run is finished (its summary.json
says so) is not retrained, and an evaluated step is not re-evaluated; a kind interrupted in the
middle resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sami_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base config, e.g. configs/disks.py:compare.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the comparison.")
_KINDS = flags.DEFINE_list("kinds", None, "Model kinds to compare (default: all of KINDS).")



def _comparison_order() -> tuple[str, ...]:
  """Every kind, those without latents (the denoiser pre-training that kinds on a frozen denoiser
  start from) first, then the rest in the registry's order."""
  from sami_jax import kinds  # pylint: disable=g-import-not-at-top
  pre = [k for k, v in kinds.KINDS.items() if not v.has_encoder]
  return tuple(pre + [k for k in kinds.KINDS if k not in pre])


# The order matters: a kind on a frozen denoiser starts from the ddpm run's denoiser.
KINDS = _comparison_order()
# The report sections the comparison reads (the rest of the suite does not differ by kind here).
SECTIONS = "latents,disentanglement,elbo,denoising,reconstruction,speckle,straightness,grids"


def kind_config(base, kind: str, workdir: str):
  """The config of one kind's run: the base config with model.kind and the kind's comparison
  settings (its `compare_setup` in kinds.py, described by its `compare_note`)."""
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  from sami_jax import kinds  # pylint: disable=g-import-not-at-top
  c = configlib.copy(base)
  c.model.kind = kind
  setup = kinds.get(kind).compare_setup
  if setup is not None:
    setup(c, workdir)
  c.eval.sections = SECTIONS
  return c


def _finished(run_dir: str, num_steps: int) -> dict | None:
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("step") == num_steps and "wall_time_s" in summary else None


def run_kind(base, kind: str, workdir: str) -> dict[str, Any]:
  """Trains (unless finished) and evaluates one kind; returns its summary and report."""
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  from sami_jax import train  # pylint: disable=g-import-not-at-top
  from sami_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(workdir, kind)
  config = kind_config(base, kind, workdir)
  configlib.validate(config, jax.device_count(), jax.process_count())
  summary = _finished(run_dir, config.train.num_steps)
  if summary is None:
    logging.info("compare: training %s in %s.", kind, run_dir)
    summary = train.train(config, run_dir)
    if summary.get("preempted"):
      raise train.PreemptedError(f"The {kind} run was stopped before its last step (its "
                                 "checkpoint is saved); rerun the same command to resume.")
  else:
    logging.info("compare: %s is already trained (%s).", kind, run_dir)
  report_path = os.path.join(run_dir, "eval", str(config.train.num_steps), "report.json")
  if not os.path.exists(report_path):
    t0 = time.time()
    report_path = runner.run(config, run_dir)
    logging.info("compare: evaluated %s in %.1f s.", kind, time.time() - t0)
  with open(report_path) as f:
    rep = json.load(f)
  return {"summary": summary, "report": rep, "report_path": report_path,
          "steps_per_sec": _steps_per_sec(run_dir)}


def _steps_per_sec(run_dir: str) -> float | None:
  """The last logged training rate (metrics.jsonl), or None."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rate = None
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rate = row.get("steps_per_sec", rate)
  return rate


def _section(res, name):
  """A report section's results ({} when it was skipped or not run)."""
  sec = res["report"]["sections"].get(name, {})
  return {} if "skipped" in sec else sec


def table_rows(results: dict[str, dict], factor_names: list[str]) -> tuple[list[str], list[list]]:
  """(header, rows) of the comparison table; one row per kind (latent columns n/a without one).

  Both factor sets of Disks are shown: the stored Cartesian one (x, y, ...) and the polar one
  (r, theta about the image centre, ...); "aligned" says which one the latents follow
  (evaluation/factors.py's rule), and MIG / DCI are given for both.
  """
  from sami_jax import kinds  # pylint: disable=g-import-not-at-top
  polar_names = (["r", "theta"] + [n for n in factor_names if n not in ("x", "y")]
                 if {"x", "y"} <= set(factor_names) else [])
  header = (["kind"] + [f"R2 linear {n}" for n in factor_names]
            + [f"R2 kNN {n}" for n in factor_names]
            + [f"R2 linear {n} (polar)" for n in polar_names]
            + [f"R2 kNN {n} (polar)" for n in polar_names]
            + ["aligned", "MIG", "MIG (polar)", "DCI D", "DCI D (polar)", "DCI C", "DCI I",
               "SAP", "FactorVAE", "bound (bits/dim)", "recon MSE", "bg std recon",
               "bg std samples", "latent curvature (deg)", "pixel curvature (deg)",
               "train wall (s)", "steps/s"])
  rows = []
  # The pre-training a kind on a frozen denoiser needs is part of its cost.
  ddpm_wall = results.get("ddpm", {}).get("summary", {}).get("wall_time_s")
  for kind, res in results.items():
    dis = _section(res, "disentanglement")
    sets = dis.get("sets", {})
    cart, polar = sets.get("cartesian", {}), sets.get("polar", {})
    rec = _section(res, "reconstruction")
    st = _section(res, "straightness")
    sp = _section(res, "speckle")
    bound = _section(res, "elbo")
    nf, npol = len(factor_names), len(polar_names)
    wall = res["summary"].get("wall_time_s")
    wall_cell = wall
    if (kinds.get(kind).needs_denoiser_checkpoint and wall is not None
        and ddpm_wall is not None):
      wall_cell = f"{wall:.0f} (+{ddpm_wall:.0f} ddpm)"
    rows.append([kind] + list(cart.get("linear_r2") or [None] * nf)
                + list(cart.get("knn_r2") or [None] * nf)
                + list(polar.get("linear_r2") or [None] * npol)
                + list(polar.get("knn_r2") or [None] * npol)
                + [dis.get("aligned"), cart.get("mig"), polar.get("mig"),
                   cart.get("dci_disentanglement"), polar.get("dci_disentanglement"),
                   dis.get("dci_completeness"), dis.get("dci_informativeness"), dis.get("sap"),
                   dis.get("factorvae"), bound.get("total_bpd"), rec.get("mse"),
                   sp.get("reconstructions_std"), sp.get("samples_std"),
                   st.get("latent_curvature"), st.get("pixel_curvature"),
                   wall_cell, res.get("steps_per_sec")])
  return header, rows


def _cell(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
  return str(v)


def markdown(header, rows, base, kinds_run, hardware: str) -> str:
  lines = ["# SAMI vs baselines on Disks", "",
           f"Same data ({base.data.name} {base.data.image_size}x{base.data.image_size}, "
           f"{base.data.num_train} train images), {base.train.num_steps} steps of batch "
           f"{base.train.batch_size}, seed {base.seed}, latent dim "
           f"{base.model.encoder.latent_dim}, for every kind. Hardware: {hardware}.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  lines += ["", "R^2 on the test split from latent means fitted on the train split (linear and "
            "k-nearest-neighbours probes), against the stored (Cartesian) factors and their polar "
            "view (r, theta about the image centre; theta scored on cos/sin); 'aligned' is the "
            "set the latents follow (evaluation/factors.py); DCI D and MIG for both sets, DCI C / "
            "I, SAP and the FactorVAE score for the aligned one (evaluation/disentanglement.py; "
            "DCI with disentanglement_lib's settings unless eval.dci_mode says otherwise); the "
            "bound on -log p(x) in bits/dim (evaluation/elbo.py; n/a where a kind has none); "
            "reconstruction MSE in [-1, 1] pixel units; bg std: the std of the uniform "
            "background of reconstructions and of samples (the data's is 0); curvature of latent "
            "trajectories of disks_video sequences (pixel curvature is the same data in pixel "
            "space, identical for every kind). Per-kind settings:", ""]
  from sami_jax import kinds  # pylint: disable=g-import-not-at-top
  lines += [f"- `{k}`: {kinds.get(k).compare_note}" for k in kinds_run]
  lines.append("")
  return "\n".join(lines)


def traversal_figure(results: dict[str, dict], out_path: str) -> str | None:
  """One PNG with every kind's traversals.png side by side, each under its kind's name."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from sami_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  panels = []
  for kind, res in results.items():
    grids = _section(res, "grids")
    if "traversals" not in grids:
      continue
    path = os.path.join(os.path.dirname(res["report_path"]), grids["traversals"])
    panels.append((kind, Image.open(path).convert("RGB")))
  if not panels:
    return None
  scale = max(1, 256 // max(p.width for _, p in panels))
  panels = [(k, p.resize((p.width * scale, p.height * scale), Image.NEAREST)) for k, p in panels]
  pad, title = 8, 18
  width = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
  height = max(p.height for _, p in panels) + title + 2 * pad
  fig = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(fig)
  x = pad
  for kind, p in panels:
    draw.text((x, pad // 2), kind, fill=(0, 0, 0), font=plots.font(12))
    fig.paste(p, (x, pad + title))
    x += p.width + pad
  fig.save(out_path)
  return out_path


def compare(base, workdir: str, kinds: list[str] | None = None) -> dict[str, Any]:
  """Runs the comparison; returns the JSON it writes to workdir/comparison.json."""
  import jax  # pylint: disable=g-import-not-at-top
  from sami_jax import kinds as kinds_lib  # pylint: disable=g-import-not-at-top
  from sami_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  kinds = list(kinds or KINDS)
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(f"--kinds names unknown kinds {unknown}; use a subset of {list(KINDS)}.")
  frozen = [k for k in kinds if kinds_lib.get(k).needs_denoiser_checkpoint]
  if frozen and "ddpm" not in kinds and not os.path.isdir(os.path.join(workdir, "ddpm")):
    raise ValueError(f"{', '.join(frozen)} starts from the ddpm run in WORKDIR/ddpm: add ddpm to "
                     "--kinds.")
  if base.data.name != "disks":
    raise ValueError(f"The comparison needs Disks' ground-truth factors; the config uses "
                     f"data.name={base.data.name!r}. Use --config=configs/disks.py:compare.")
  kinds = [k for k in KINDS if k in kinds]  # the dependency order
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  results = {kind: run_kind(base, kind, workdir) for kind in kinds}
  header, rows = table_rows(results, pipeline.factor_names(base))
  device = jax.devices()[0]
  hardware = (f"{jax.device_count()} x {device.device_kind} ({device.platform}), "
              f"{os.cpu_count()} CPU cores")
  out = {"header": header, "rows": rows, "kinds": kinds, "hardware": hardware,
         "num_steps": base.train.num_steps, "batch_size": base.train.batch_size,
         "seed": base.seed, "notes": {k: kinds_lib.get(k).compare_note for k in kinds},
         "reports": {k: r["report_path"] for k, r in results.items()},
         "wall_time_s": time.time() - t0}
  fig = traversal_figure(results, os.path.join(workdir, "traversals.png"))
  out["traversal_figure"] = fig
  with open(os.path.join(workdir, "comparison.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(markdown(header, rows, base, kinds, hardware))
    if fig:
      f.write("\n![traversals](traversals.png)\n")
  logging.info("compare: wrote %s (%.1f s).", os.path.join(workdir, "comparison.md"),
               time.time() - t0)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  try:
    compare(configlib.expand_user_paths(_CONFIG.value), os.path.expanduser(_WORKDIR.value),
            _KINDS.value)
  except Exception as e:  # pylint: disable=broad-except
    from sami_jax import train  # pylint: disable=g-import-not-at-top
    if isinstance(e, train.PreemptedError):
      print(f"Stopped: {e}", file=sys.stderr)
      sys.exit(train.PREEMPTED_EXIT_CODE)
    if not cli.report_user_error(e):
      raise
    sys.exit(2)
  with open(os.path.join(os.path.expanduser(_WORKDIR.value), "comparison.md")) as f:
    print(f.read())


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG))
