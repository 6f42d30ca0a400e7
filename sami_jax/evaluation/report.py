"""`--mode=eval`: every claim of SAMI.md's table measured on one checkpoint, written as a report.

    path = report.run(config, workdir)   # -> workdir/eval/<step>/report.json

On the latest checkpoint (or `eval.step`), with the EMA params and the config saved with the run
(its `eval.*` and `sampling.*` fields, and a non-empty `data.data_dir` / `data.manual_dir`, come
from the config given now), it runs the sections that fit the dataset and the model kind:

  latents            KL(q(z_i | x) || N(0, 1)) per latent, ranked; posterior stds.    (SAMI)
  disentanglement    factor R^2 (linear, kNN), MIG, DCI, SAP, FactorVAE score,
                     |correlation| heat map latent x factor.                           (Disks)
  elbo               the bound on -log p(x) in bits/dim, VDM-style decomposition
                     (evaluation/elbo.py), with and without guidance.                  (all)
  guidance_ablation  eps-prediction MSE per t bucket with guidance (gamma = 1) vs the
                     denoiser alone (gamma = 0), same x_t and eps for both.            (SAMI)
  reconstruction     MSE / PSNR of DDIM reconstructions (sampling.*) and their grid.   (SAMI)
  straightness       curvature of latent vs pixel trajectories on disks_video.         (Disks)
  attributes         TAD, ATTRS, single-latent and linear-probe AUROC.                 (CelebA)
  fid                FID of reconstructions and prior samples (needs eval.inception_weights).
  grids              prior samples, latent traversals, interpolations (PNG).

Every section records its wall time; a section that does not apply is listed with the reason.
Files in workdir/eval/<step>/: report.json (strict JSON: NaN is written as null), report.md (a
table per section) and the PNG figures. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from sami_jax import objective
from sami_jax import samplers
from sami_jax import train
from sami_jax.data import pipeline
from sami_jax.evaluation import attributes as attributes_lib
from sami_jax.evaluation import disentanglement
from sami_jax.evaluation import elbo as elbo_lib
from sami_jax.evaluation import fid as fid_lib
from sami_jax.evaluation import probes
from sami_jax.evaluation import straightness
from sami_jax.utils import images as images_lib

SECTIONS = ("latents", "disentanglement", "elbo", "guidance_ablation", "reconstruction",
            "straightness", "attributes", "fid", "grids")
DCI_MODES = ("regression", "classification")
# Purpose folded into the root key; train.py uses 0 (init), 1 (train) and 2 (sample grids).
_RNG_EVAL = 3
# A latent whose mean KL to the prior is below this (nats) is reported as inactive (collapsed).
ACTIVE_KL_NATS = 0.01
# Rows in traversal grids (the highest-KL latents first).
_MAX_TRAVERSAL_DIMS = 8

Tables = list[tuple[str, list[str], list[list[Any]]]]  # (title, header, rows) for report.md


# ------------------------------------------------------------------------------ public helpers


def section_key(seed: int, section: str) -> jax.Array:
  """The PRNG key of one report section: a pure function of (run seed, section name)."""
  root = jax.random.fold_in(jax.random.PRNGKey(seed), _RNG_EVAL)
  return jax.random.fold_in(root, zlib.crc32(section.encode()) & 0x7FFFFFFF)


def ablation_noise(key: jax.Array, batch_index: int, bucket: int, batch_size: int,
                   image_shape: tuple[int, int, int], num_buckets: int
                   ) -> tuple[jax.Array, jax.Array]:
  """(t [B], eps [B, H, W, C]) of one batch and t bucket of the guidance ablation.

  t is uniform in [bucket / K, (bucket + 1) / K) (kept >= 1e-5 so sigma_t > 0); both gammas are
  evaluated on these same t and eps.
  """
  k = jax.random.fold_in(jax.random.fold_in(key, batch_index), bucket)
  k_t, k_eps = jax.random.split(k)
  t = (bucket + jax.random.uniform(k_t, (batch_size,))) / num_buckets
  eps = jax.random.normal(k_eps, (batch_size,) + tuple(image_shape), jnp.float32)
  return jnp.maximum(t, 1e-5), eps


def psnr(mse: np.ndarray) -> np.ndarray:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their per-image MSE."""
  return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def eval_config(run_config: ml_collections.ConfigDict, given: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """The run's saved config with the evaluation knobs of the config given now.

  eval.* and sampling.* are evaluation choices (sample sizes, sampler steps), so the command
  line wins; the model, data and diffusion fields must be the run's. data.data_dir and
  data.manual_dir are taken from `given` only when set there (the data may have moved).
  """
  cfg = train.config_from_json(train.config_to_json(run_config))
  for section in ("eval", "sampling"):
    for key, value in given[section].items():
      cfg[section][key] = value
  for key in ("data_dir", "manual_dir"):
    if given.data[key]:
      cfg.data[key] = given.data[key]
  return cfg


def validate_eval(config: ml_collections.ConfigDict) -> list[str]:
  """Checks the eval fields (before anything compiles); returns the selected sections."""
  v = config.eval
  for field in ("batch_size", "num_examples", "num_recon", "num_elbo_examples", "elbo_t_samples",
                "num_ablation_examples", "ablation_buckets", "factorvae_votes", "num_video",
                "num_fid"):
    if not int(v[field]) > 0:
      raise ValueError(f"config.eval.{field} must be positive, got {v[field]!r}.")
  if v.num_interpolations < 0:
    raise ValueError(f"config.eval.num_interpolations must be >= 0, got {v.num_interpolations}.")
  if v.dci_mode not in DCI_MODES:
    raise ValueError(f"config.eval.dci_mode={v.dci_mode!r} is not one of {list(DCI_MODES)}.")
  if v.inception_weights and not os.path.exists(v.inception_weights):
    raise FileNotFoundError(f"config.eval.inception_weights={v.inception_weights!r} does not "
                            "exist; see sami_jax/evaluation/inception.py for how to make it, or "
                            "set it to '' to skip FID.")
  if v.sections.strip() in ("", "all"):
    return list(SECTIONS)
  chosen = [s.strip() for s in v.sections.split(",") if s.strip()]
  unknown = [s for s in chosen if s not in SECTIONS]
  if unknown:
    raise ValueError(f"config.eval.sections names unknown sections {unknown}; use 'all' or a "
                     f"comma-separated subset of {list(SECTIONS)}.")
  return chosen


# ------------------------------------------------------------------------------ the run


class _Context:
  """What every section needs: config, params, models, the output dir, cached encodings."""

  def __init__(self, config, params, step: int, out_dir: str):
    self.config = config
    self.params = params
    self.step = step
    self.out_dir = out_dir
    self.kind = config.model.kind
    self.has_latent = self.kind != "ddpm"
    self.denoiser, self.encoder, self.schedule = train.components(config)
    s, c = config.data.image_size, config.data.channels
    self.image_shape = (s, s, c)
    self.num_dims = s * s * c
    self.batch_size = int(config.eval.batch_size)
    self.figures: list[str] = []
    self._encoded: dict[str, dict[str, np.ndarray]] = {}
    self._kl_order: np.ndarray | None = None

  def key(self, section: str) -> jax.Array:
    return section_key(self.config.seed, section)

  def encoded(self, split: str) -> dict[str, np.ndarray]:
    """Posterior means/stds (+ factors/attributes) of the first eval.num_examples of a split."""
    if split not in self._encoded:
      self._encoded[split] = train.encode_dataset(self.config, self.params, split,
                                                  self.config.eval.num_examples,
                                                  batch_size=self.batch_size)
    return self._encoded[split]

  def kl_order(self) -> np.ndarray:
    if self._kl_order is None:
      enc = self.encoded("test")
      self._kl_order, _ = disentanglement.rank_latents_by_kl(enc["mean"], enc["std"])
    return self._kl_order

  def sampling_kwargs(self) -> dict[str, Any]:
    s = self.config.sampling
    return dict(schedule=self.schedule, steps=s.steps, sampler=s.sampler, eta=s.eta,
                gamma=s.guidance_scale,
                time_conditioning=self.config.model.encoder.time_conditioning, kind=self.kind)

  def batches(self, split: str, num_examples: int, config=None):
    return pipeline.eval_iterator(config or self.config, split, self.batch_size,
                                  num_examples=num_examples)

  def save_png(self, name: str, image: np.ndarray) -> str:
    if jax.process_index() == 0:
      images_lib.save_png(os.path.join(self.out_dir, name), image)
    self.figures.append(name)
    return name


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Evaluates a run's checkpoint; returns the path of the report.json it wrote.

  Raises:
    FileNotFoundError: no checkpoint in `workdir`, or eval.inception_weights does not exist.
    ValueError: an eval.* field is wrong (before anything is compiled).
  """
  chosen = validate_eval(config)
  t_start = time.time()
  step_arg = None if config.eval.step < 0 else int(config.eval.step)
  run_config, params, step = train.restore_for_inference(config, workdir, step_arg)
  cfg = eval_config(run_config, config)
  validate_eval(cfg)
  out_dir = os.path.join(workdir, "eval", str(step))
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  ctx = _Context(cfg, params, step, out_dir)
  logging.info("Evaluating step %d of %s (%s on %s) into %s.", step, workdir, ctx.kind,
               cfg.data.name, out_dir)

  report: dict[str, Any] = {
      "step": step, "workdir": os.path.abspath(workdir), "dataset": cfg.data.name,
      "model_kind": ctx.kind, "image_shape": list(ctx.image_shape),
      "latent_dim": cfg.model.encoder.latent_dim if ctx.has_latent else 0,
      "sections": {}, "figures": [],
  }
  tables: dict[str, Tables] = {}
  for name in SECTIONS:
    if name not in chosen:
      report["sections"][name] = {"skipped": "not selected by config.eval.sections"}
      continue
    reason = _not_applicable(ctx, name)
    if reason:
      report["sections"][name] = {"skipped": reason}
      continue
    t0 = time.time()
    result, section_tables = _SECTION_FNS[name](ctx)
    result["wall_time_s"] = time.time() - t0
    report["sections"][name] = result
    tables[name] = section_tables
    logging.info("Eval section %s: %.1f s.", name, result["wall_time_s"])
  report["figures"] = list(ctx.figures)
  report["wall_time_s"] = time.time() - t_start
  path = os.path.join(out_dir, "report.json")
  if is_main:
    clean = _jsonable(report)
    with open(path, "w") as f:
      json.dump(clean, f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(_markdown(clean, tables))
  return path


def _not_applicable(ctx: _Context, name: str) -> str:
  """Why a section does not apply to this run ("" when it does)."""
  data = ctx.config.data.name
  needs_latent = ("latents", "disentanglement", "guidance_ablation", "reconstruction",
                  "straightness", "attributes")
  if name in needs_latent and not ctx.has_latent:
    return "a ddpm run has no encoder, hence no latents and no guidance"
  if name == "latents" and ctx.kind == "diffae":
    return "diffae's encoder is deterministic: there is no posterior, hence no KL per latent"
  if name == "guidance_ablation" and ctx.kind not in ("sami", "sami_frozen"):
    return f"{ctx.kind} does not use score guidance"
  if name == "elbo" and ctx.kind not in ("sami", "sami_frozen", "ddpm"):
    return (f"the diffusion ELBO needs a latent with a posterior (or none, for ddpm); "
            f"{ctx.kind} is " + ("not a diffusion model" if ctx.kind == "beta_vae" else
                                 "conditioned on a deterministic latent"))
  if name in ("disentanglement", "straightness") and data != "disks":
    return f"needs ground-truth factors (Disks runs only); this run is on {data!r}"
  if name == "attributes" and data != "celeba":
    return f"needs binary attributes (CelebA runs only); this run is on {data!r}"
  if name == "fid":
    if data not in ("celeba", "folder"):
      return f"FID measures natural images (CelebA / folder runs); this run is on {data!r}"
    if not ctx.config.eval.inception_weights:
      return ("config.eval.inception_weights is empty. FID needs the pytorch-fid Inception "
              "weights: download " + _inception_url() + ", convert them with `python -m "
              "sami_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth "
              "inception_fid.npz` (needs PyTorch once), then pass "
              "--config.eval.inception_weights=/path/to/inception_fid.npz")
  return ""


def _inception_url() -> str:
  from sami_jax.evaluation import inception  # builds Flax modules: imported only when needed
  return inception.WEIGHTS_URL


# ------------------------------------------------------------------------------ sections


def _latents(ctx: _Context) -> tuple[dict, Tables]:
  enc = ctx.encoded("test")
  order, kl = disentanglement.rank_latents_by_kl(enc["mean"], enc["std"])
  mean_std = enc["std"].mean(axis=0)
  result = {
      "num_examples": int(len(enc["mean"])),
      "kl_per_dim_nats": kl, "kl_total_nats": float(kl.sum()), "order_by_kl": order,
      "active_dims": int(np.sum(kl > ACTIVE_KL_NATS)),
      "posterior_std_per_dim": mean_std,
      "aggregate_mean_per_dim": enc["mean"].mean(axis=0),
      "aggregate_std_per_dim": enc["mean"].std(axis=0),
  }
  rows = [[f"z{i}", kl[i], mean_std[i], result["aggregate_mean_per_dim"][i],
           result["aggregate_std_per_dim"][i]] for i in order]
  return result, [("Latents ranked by KL to the prior (test split)",
                   ["latent", "KL (nats)", "mean posterior std", "mean of mu", "std of mu"],
                   rows)]


def _disentanglement(ctx: _Context) -> tuple[dict, Tables]:
  v = ctx.config.eval
  tr, te = ctx.encoded("train"), ctx.encoded("test")
  names = pipeline.factor_names(ctx.config)
  ztr, ftr, zte, fte = tr["mean"], tr["factors"], te["mean"], te["factors"]
  d = ztr.shape[1]
  r2 = probes.factor_r2(ztr, ftr, zte, fte, knn_neighbors=min(10, len(ztr)))
  corr = disentanglement.correlation_matrix(ztr, ftr)
  _, kl = disentanglement.rank_latents_by_kl(tr["mean"], tr["std"])
  result: dict[str, Any] = {
      "factors": names, "num_train": int(len(ztr)), "num_test": int(len(zte)),
      "linear_r2": r2["linear"], "knn_r2": r2["knn"], "correlation": corr,
  }
  if d >= 2:  # MIG and SAP compare the best latent with the second best
    m = disentanglement.mig(ztr, ftr)
    s = disentanglement.sap(ztr, ftr, zte, fte, continuous_factors=True)
    result.update(mig=m["mig"], mig_per_factor=m["per_factor"], sap=s["sap"],
                  sap_per_factor=s["per_factor"])
  else:
    result.update(mig=None, sap=None, mig_sap_skipped="needs at least 2 latent dims")
  dci = disentanglement.dci(ztr, ftr, zte, fte, mode=v.dci_mode, seed=ctx.config.seed)
  fv = disentanglement.factorvae_score_from_dataset(
      ztr, ftr, batch_size=min(64, len(ztr)), num_train=v.factorvae_votes,
      num_eval=max(1, v.factorvae_votes // 2), seed=ctx.config.seed)
  result.update(dci_mode=v.dci_mode, dci_disentanglement=dci["disentanglement"],
                dci_completeness=dci["completeness"], dci_informativeness=dci["informativeness"],
                factorvae=fv["factorvae"], factorvae_train_accuracy=fv["train_accuracy"],
                factorvae_active_dims=fv["num_active_dims"])
  row_labels = [f"z{i} (KL {kl[i]:.2f})" for i in range(d)]
  result["correlation_figure"] = ctx.save_png(
      "correlation.png", heatmap(corr, row_labels, names, "|corr(latent, factor)|, train split"))
  per_factor = [[n, r2["linear"][j], r2["knn"][j],
                 result.get("mig_per_factor", [None] * len(names))[j],
                 result.get("sap_per_factor", [None] * len(names))[j],
                 dci["informativeness_per_factor"][j]] for j, n in enumerate(names)]
  scores = [["MIG", result["mig"]], ["SAP", result["sap"]],
            ["DCI disentanglement", dci["disentanglement"]],
            ["DCI completeness", dci["completeness"]],
            [f"DCI informativeness ({v.dci_mode})", dci["informativeness"]],
            ["FactorVAE (finite dataset)", fv["factorvae"]]]
  corr_rows = [[row_labels[i]] + list(corr[i]) for i in range(d)]
  return result, [
      ("Scores", ["metric", "value"], scores),
      ("Per factor (R^2 on the test split)",
       ["factor", "linear R^2", "kNN R^2", "MIG gap", "SAP gap", "DCI informativeness"],
       per_factor),
      ("|correlation| latent x factor (correlation.png)", ["latent"] + names, corr_rows)]


def _elbo(ctx: _Context) -> tuple[dict, Tables]:
  v = ctx.config.eval
  gamma = float(ctx.config.diffusion.guidance_scale)
  terms_fn = elbo_lib.make_elbo_fn(ctx.denoiser, ctx.encoder, ctx.schedule,
                                   with_latent=ctx.has_latent, gamma=gamma,
                                   time_conditioning=ctx.config.model.encoder.time_conditioning)
  terms_fn = jax.jit(terms_fn)
  key = ctx.key("elbo")
  k_samples = int(v.elbo_t_samples)
  per_example: dict[str, list[np.ndarray]] = {}
  for bi, batch in enumerate(ctx.batches("test", v.num_elbo_examples)):
    x0 = jnp.asarray(batch["image"])
    mask = np.asarray(batch["mask"], bool)
    k_offset, k_mc = jax.random.split(jax.random.fold_in(key, bi))
    offset = jax.random.uniform(k_offset, (x0.shape[0],))
    sums: dict[str, np.ndarray] = {}
    for j in range(k_samples):
      # Stratified t: sample j of every example lies in [j / K, (j + 1) / K).
      u = (j + offset) / k_samples
      out = jax.device_get(terms_fn(ctx.params, x0, u, jax.random.fold_in(k_mc, j)))
      for name, val in out.items():
        sums[name] = sums.get(name, 0.0) + np.asarray(val, np.float64) / k_samples
    for name, val in sums.items():
      per_example.setdefault(name, []).append(val[mask])
  nats = {k: np.concatenate(v_) for k, v_ in per_example.items()}
  to_bpd = 1.0 / (ctx.num_dims * math.log(2.0))
  names = ["diffusion", "prior", "reconstruction", "latent_kl", "total",
           "diffusion_no_guidance", "total_no_guidance"]
  if not ctx.has_latent:
    names = ["diffusion", "prior", "reconstruction", "total"]
  n = len(nats["total"])
  result: dict[str, Any] = {f"{k}_bpd": float(nats[k].mean() * to_bpd) for k in names}
  result.update(
      total_bpd_stderr=float(nats["total"].std(ddof=1) / math.sqrt(n) * to_bpd) if n > 1 else None,
      total_nats_per_example=float(nats["total"].mean()),
      num_examples=n, t_samples=k_samples, num_dims=ctx.num_dims, gamma=gamma,
      logsnr_0=float(ctx.schedule.logsnr(jnp.zeros(()))),
      logsnr_1=float(ctx.schedule.logsnr(jnp.ones(()))),
      weighting="elbo (w = -1/2 dlogsnr/dt), t continuous and stratified")
  rows = [[k, result[f"{k}_bpd"]] for k in names]
  rows.append(["total (standard error)", result["total_bpd_stderr"]])
  return result, [(f"Bits per dimension, test split ({n} images, {k_samples} t samples each)",
                   ["term", "bits/dim"], rows)]


def _guidance_ablation(ctx: _Context) -> tuple[dict, Tables]:
  v = ctx.config.eval
  k_buckets = int(v.ablation_buckets)
  tc = ctx.config.model.encoder.time_conditioning
  den, enc, schedule = ctx.denoiser, ctx.encoder, ctx.schedule

  @jax.jit
  def mse_both(params, x0, t, eps):
    """Per-example eps-MSE (mean over pixels) without and with guidance: ([B], [B])."""
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    eps_theta = den.apply({"params": params["denoiser"]}, x_t, t, train=False)

    def encode_fn(x, tt):
      return enc.apply({"params": params["encoder"]}, x, tt if tc else None)
    # z is the posterior mean of the clean image, as in reconstructions (sampling.use_mean).
    z, _ = encode_fn(x0, jnp.zeros_like(t) if tc else None)
    eps_hat, _ = objective.guided_eps(eps_theta, encode_fn, x_t, t, z, sigma, 1.0)
    axes = (1, 2, 3)
    return jnp.mean((eps - eps_theta) ** 2, axes), jnp.mean((eps - eps_hat) ** 2, axes)

  key = ctx.key("guidance_ablation")
  sum0, sum1 = np.zeros(k_buckets), np.zeros(k_buckets)
  count = 0
  for bi, batch in enumerate(ctx.batches("test", v.num_ablation_examples)):
    x0 = jnp.asarray(batch["image"])
    mask = np.asarray(batch["mask"], bool)
    for k in range(k_buckets):
      t, eps = ablation_noise(key, bi, k, x0.shape[0], ctx.image_shape, k_buckets)
      m0, m1 = jax.device_get(mse_both(ctx.params, x0, t, eps))
      sum0[k] += np.asarray(m0, np.float64)[mask].sum()
      sum1[k] += np.asarray(m1, np.float64)[mask].sum()
    count += int(mask.sum())
  mse0, mse1 = sum0 / count, sum1 / count
  edges = np.linspace(0.0, 1.0, k_buckets + 1)
  centers = (edges[:-1] + edges[1:]) / 2
  result = {
      "num_examples": count, "bucket_edges": edges, "bucket_centers": centers,
      "mse_gamma0": mse0, "mse_gamma1": mse1, "ratio_gamma1_to_gamma0": mse1 / mse0,
      "mean_mse_gamma0": float(mse0.mean()), "mean_mse_gamma1": float(mse1.mean()),
      "latent": "posterior mean of the clean image",
  }
  result["figure"] = ctx.save_png("guidance_ablation.png", line_plot(
      centers, {"gamma = 0 (denoiser alone)": mse0, "gamma = 1 (guided)": mse1},
      xlabel="t (bucket centre)", ylabel="eps MSE", title="Denoising MSE per noise level",
      log_y=bool(np.all(mse0 > 0) and np.all(mse1 > 0))))
  rows = [[f"[{edges[k]:.2f}, {edges[k + 1]:.2f})", mse0[k], mse1[k], mse1[k] / mse0[k]]
          for k in range(k_buckets)]
  rows.append(["mean over t", result["mean_mse_gamma0"], result["mean_mse_gamma1"],
               result["mean_mse_gamma1"] / result["mean_mse_gamma0"]])
  return result, [(f"eps-prediction MSE per t bucket ({count} test images; same x_t, eps)",
                   ["t bucket", "gamma = 0", "gamma = 1", "ratio"], rows)]


def _reconstruct_batches(ctx: _Context, num: int, key: jax.Array
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(originals, reconstructions), each [num, H, W, C] in [-1, 1], from the test split."""
  originals, recons = [], []
  for bi, batch in enumerate(ctx.batches("test", num)):
    mask = np.asarray(batch["mask"], bool)
    rec = samplers.reconstruct(ctx.denoiser, ctx.encoder, ctx.params,
                               jnp.asarray(batch["image"]), jax.random.fold_in(key, bi),
                               use_mean=ctx.config.sampling.use_mean, **ctx.sampling_kwargs())
    originals.append(np.asarray(batch["image"])[mask])
    recons.append(np.asarray(rec)[mask])
  return np.concatenate(originals), np.concatenate(recons)


def _reconstruction(ctx: _Context) -> tuple[dict, Tables]:
  x, rec = _reconstruct_batches(ctx, ctx.config.eval.num_recon, ctx.key("reconstruction"))
  mse_per_image = np.mean((rec.astype(np.float64) - x) ** 2, axis=(1, 2, 3))
  s = ctx.config.sampling
  result = {
      "num_images": int(len(x)), "mse": float(mse_per_image.mean()),
      "psnr_db": float(psnr(mse_per_image).mean()),
      "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
      "guidance_scale": float(s.guidance_scale), "use_mean": bool(s.use_mean),
      "units": "MSE of images in [-1, 1]; PSNR with peak-to-peak 2, mean over images",
  }
  # Rows alternate originals and their reconstructions, up to 16 images per row.
  ncol = min(16, len(x))
  rows = []
  for i in range(0, len(x), ncol):
    a, b = x[i:i + ncol], rec[i:i + ncol]
    pad = ncol - len(a)
    if pad:
      a = np.concatenate([a, -np.ones((pad,) + a.shape[1:], a.dtype)])
      b = np.concatenate([b, -np.ones((pad,) + b.shape[1:], b.dtype)])
    rows += [a, b]
  result["figure"] = ctx.save_png("reconstructions.png",
                                  images_lib.make_grid(np.concatenate(rows), ncol=ncol))
  how = f"{s.sampler}, {s.steps} steps, eta {s.eta}, gamma {s.guidance_scale}"
  if ctx.kind == "beta_vae":  # a one-shot decoder: the sampling.* fields do not apply
    how = "the decoder's mean image"
    result.update(sampler="decoder", steps=0, eta=None, guidance_scale=None)
  table = [["images", result["num_images"]], ["MSE", result["mse"]],
           ["PSNR (dB)", result["psnr_db"]], ["sampler", how]]
  return result, [("Reconstructions of test images (reconstructions.png: odd rows originals)",
                   ["measure", "value"], table)]


def video_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config with the data switched to disks_video (same image size and factors).

  Only the test split is read, so the train split is a single sequence (it is still built).
  """
  cfg = train.config_from_json(train.config_to_json(config))
  cfg.data.name = "disks_video"
  cfg.data.num_train = 1
  cfg.data.num_test = int(config.eval.num_video)
  return cfg


def _straightness(ctx: _Context) -> tuple[dict, Tables]:
  vcfg = video_config(ctx.config)
  frames = int(vcfg.data.video_frames)
  tc = ctx.config.model.encoder.time_conditioning
  encode = jax.jit(lambda p, x: samplers.encode(ctx.encoder, p, x, time_conditioning=tc)[0])
  seqs = max(1, ctx.batch_size // frames)  # sequences per call, so a call sees <= batch images
  latents, pixels = [], []
  for batch in pipeline.eval_iterator(vcfg, "test", seqs, num_examples=vcfg.data.num_test):
    mask = np.asarray(batch["mask"], bool)
    video = np.asarray(batch["image"])  # [S, F, H, W, C]
    flat = video.reshape((-1,) + video.shape[2:])
    mean = np.asarray(jax.device_get(encode(ctx.params, jnp.asarray(flat))))
    latents.append(mean.reshape(video.shape[:2] + (-1,))[mask])
    pixels.append(video[mask])
  rep = straightness.trajectory_report(np.concatenate(latents), np.concatenate(pixels))
  rep["dataset"] = f"disks_video, {vcfg.data.num_test} test sequences of {frames} frames"
  rows = [["latent (posterior means)", rep["latent_curvature"], rep["latent_curvature_std"],
           rep["latent_cosine"]],
          ["pixel", rep["pixel_curvature"], rep["pixel_curvature_std"], rep["pixel_cosine"]]]
  return rep, [(f"Curvature of trajectories ({rep['num_sequences']} sequences, "
                f"{rep['num_frames']} frames; ground truth is straight: 0 degrees)",
                ["space", "mean curvature (deg)", "std over sequences", "mean cosine"], rows)]


def _attributes(ctx: _Context) -> tuple[dict, Tables]:
  from sami_jax.data import celeba  # the attribute names
  tr, te = ctx.encoded("train"), ctx.encoded("test")
  result: dict[str, Any] = {"num_train": int(len(tr["mean"])), "num_test": int(len(te["mean"]))}
  if tr["mean"].shape[1] < 2:
    result["tad_skipped"] = "TAD needs at least 2 latent dims"
    probe = attributes_lib.linear_probe_auroc(tr["mean"], tr["attributes"], te["mean"],
                                              te["attributes"])
    result["linear_probe_auroc"] = probe["mean_auroc"]
    return result, [("Attributes", ["metric", "value"],
                     [["linear-probe AUROC (mean)", probe["mean_auroc"]]])]
  result.update(attributes_lib.attribute_report(tr["mean"], tr["attributes"], te["mean"],
                                                te["attributes"]))
  t = attributes_lib.tad(tr["mean"], tr["attributes"])
  names = list(celeba.ATTRIBUTE_NAMES)
  captured = [names[k] if k < len(names) else str(k) for k in np.flatnonzero(t["captured"])]
  result["captured_attributes"] = captured
  rows = [["TAD", result["tad"]], ["ATTRS", result["attrs"]],
          ["mean best single-latent AUROC", result["mean_best_single_latent_auroc"]],
          ["linear-probe AUROC (mean over attributes)", result["linear_probe_auroc"]],
          ["captured attributes", ", ".join(captured) or "none"]]
  return result, [("CelebA attributes (TAD/ATTRS on train latents, probe scored on test)",
                   ["metric", "value"], rows)]


def _fid(ctx: _Context) -> tuple[dict, Tables]:
  from sami_jax.evaluation import inception
  v = ctx.config.eval
  net = inception.InceptionFeatures.load(v.inception_weights)

  def features(images: np.ndarray) -> np.ndarray:
    out = [np.asarray(net.features(jnp.asarray(images[i:i + ctx.batch_size])))
           for i in range(0, len(images), ctx.batch_size)]
    return np.concatenate(out)

  def real_images() -> np.ndarray:
    out = [np.asarray(b["image"])[np.asarray(b["mask"], bool)]
           for b in ctx.batches("test", v.num_fid)]
    return np.concatenate(out)

  d = ctx.config.data
  cache = os.path.join(os.path.dirname(ctx.out_dir),
                       f"fid_ref_{d.name}_test_{v.num_fid}_{d.image_size}px_{d.channels}ch.npz")
  mu_ref, sigma_ref = fid_lib.cached_stats(cache, lambda: features(real_images()))
  result: dict[str, Any] = {"num_images": int(v.num_fid), "reference": "test split",
                            "reference_stats": os.path.basename(cache)}
  key = ctx.key("fid")
  if ctx.has_latent:
    _, rec = _reconstruct_batches(ctx, v.num_fid, jax.random.fold_in(key, 0))
    result["fid_reconstructions"] = fid_lib.frechet_distance(
        *fid_lib.stats(features(rec)), mu_ref, sigma_ref)
  samples = _prior_samples(ctx, int(v.num_fid), jax.random.fold_in(key, 1))
  result["fid_prior_samples"] = fid_lib.frechet_distance(
      *fid_lib.stats(features(samples)), mu_ref, sigma_ref)
  rows = [[k, result[k]] for k in ("fid_reconstructions", "fid_prior_samples") if k in result]
  return result, [(f"FID against {v.num_fid} test images", ["set", "FID"], rows)]


def _prior_samples(ctx: _Context, num: int, key: jax.Array) -> np.ndarray:
  """num images generated from z ~ N(0, I) (unconditional for ddpm), in batches of eval size."""
  d = ctx.config.model.encoder.latent_dim if ctx.has_latent else 1
  out, i = [], 0
  while i < num:
    kb = jax.random.fold_in(key, i)
    z = jax.random.normal(kb, (ctx.batch_size, d))  # fixed shape: one compilation
    x = samplers.generate(ctx.denoiser, ctx.encoder if ctx.has_latent else None, ctx.params, z,
                          kb, image_shape=ctx.image_shape, **ctx.sampling_kwargs())
    out.append(np.asarray(x)[:num - i])
    i += ctx.batch_size
  return np.concatenate(out)


def _grids(ctx: _Context) -> tuple[dict, Tables]:
  key = ctx.key("grids")
  s = ctx.config.sampling
  n = min(16, ctx.batch_size)
  samples = _prior_samples(ctx, n, jax.random.fold_in(key, 0))
  result: dict[str, Any] = {"prior_samples": ctx.save_png(
      "prior_samples.png", images_lib.make_grid(samples, ncol=int(math.sqrt(n)) or 1))}
  rows = [["prior_samples.png", "z ~ N(0, I)" if ctx.has_latent else "unconditional samples"]]
  if ctx.has_latent:
    kw = ctx.sampling_kwargs()
    values = jnp.linspace(-s.traverse_range, s.traverse_range, s.traverse_points)
    # One eval batch holds the pairs (padding rows repeat example 0 if the split is smaller).
    num_pairs = min(int(ctx.config.eval.num_interpolations), ctx.batch_size // 2)
    images = next(iter(ctx.batches("test", max(1, 2 * num_pairs))))["image"]
    mean, _ = samplers.encode(ctx.encoder, ctx.params, jnp.asarray(images),
                              time_conditioning=kw["time_conditioning"])
    dims = [int(i) for i in ctx.kl_order()[:_MAX_TRAVERSAL_DIMS]]
    trav = [samplers.traverse(ctx.denoiser, ctx.encoder, ctx.params, mean[0], dim, values,
                              jax.random.fold_in(key, 1), image_shape=ctx.image_shape, **kw)
            for dim in dims]
    result["traversals"] = ctx.save_png("traversals.png", images_lib.make_grid(
        np.concatenate([np.asarray(r) for r in trav]), ncol=len(values)))
    result["traversal_dims"] = dims
    result["traversal_values"] = values
    rows.append(["traversals.png", f"row i: latent {dims} (by decreasing KL) set to "
                 f"{s.traverse_points} values in [-{s.traverse_range}, {s.traverse_range}], "
                 "others at test image 0's posterior mean"])
    if num_pairs:
      interp = []
      for p in range(num_pairs):
        a, b = 2 * p, 2 * p + 1
        row = samplers.interpolate(ctx.denoiser, ctx.encoder, ctx.params, mean[a], mean[b],
                                   s.traverse_points, jax.random.fold_in(key, 2),
                                   image_shape=ctx.image_shape, **kw)
        interp.append(np.concatenate([images[a:a + 1], np.asarray(row), images[b:b + 1]]))
      result["interpolations"] = ctx.save_png("interpolations.png", images_lib.make_grid(
          np.concatenate(interp), ncol=s.traverse_points + 2))
      rows.append(["interpolations.png", f"{num_pairs} pairs of test images (first and last "
                   f"column), {s.traverse_points} latents on the line between their means"])
  return result, [("Figures", ["file", "content"], rows)]


_SECTION_FNS: dict[str, Callable[[_Context], tuple[dict, Tables]]] = {
    "latents": _latents, "disentanglement": _disentanglement, "elbo": _elbo,
    "guidance_ablation": _guidance_ablation, "reconstruction": _reconstruction,
    "straightness": _straightness, "attributes": _attributes, "fid": _fid, "grids": _grids,
}


# ------------------------------------------------------------------------------ output


def _jsonable(x: Any) -> Any:
  """numpy/JAX values -> plain JSON values; non-finite floats -> None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x


def _cell(v: Any) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v):
      return "n/a"
    return f"{v:.4g}"
  return str(v).replace("|", "\\|")


def _markdown(report: dict, tables: dict[str, Tables]) -> str:
  lines = [f"# SAMI evaluation: step {report['step']}", "",
           f"Run `{report['workdir']}`: {report['model_kind']} on {report['dataset']} "
           f"({'x'.join(map(str, report['image_shape']))}, latent dim {report['latent_dim']}). "
           f"Total wall time {report['wall_time_s']:.1f} s.", ""]
  for name, section in report["sections"].items():
    lines.append(f"## {name}")
    lines.append("")
    if "skipped" in section:
      lines += [f"Skipped: {section['skipped']}.", ""]
      continue
    lines += [f"Wall time {section['wall_time_s']:.1f} s.", ""]
    for title, header, rows in tables.get(name, []):
      lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
      lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
      lines.append("")
    figures = [v for k, v in section.items()
               if isinstance(v, str) and v.endswith(".png") and k != "reference_stats"]
    lines += [f"![{f}]({f})" for f in figures]
    if figures:
      lines.append("")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ figures (PIL)

_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _font(size: int = 12):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def line_plot(x: np.ndarray, series: dict[str, np.ndarray], *, xlabel: str, ylabel: str,
              title: str, log_y: bool = False, size: tuple[int, int] = (640, 420)
              ) -> np.ndarray:
  """A line chart of several series over the same x, as uint8 RGB [H, W, 3].

  Axes with 5 ticks each, markers at the data points, a legend; log10 y axis if `log_y`
  (all values must then be > 0). Non-finite points are skipped.
  """
  w, h = size
  left, right, top, bottom = 80, 20, 56, 60
  img = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(img)
  font = _font(12)
  x = np.asarray(x, np.float64)
  ys = {k: np.asarray(v, np.float64) for k, v in series.items()}
  tr = (lambda y: np.log10(y)) if log_y else (lambda y: y)
  all_y = np.concatenate([tr(v)[np.isfinite(tr(v))] for v in ys.values()] or [np.zeros(1)])
  if all_y.size == 0:
    all_y = np.zeros(1)
  y_lo, y_hi = float(all_y.min()), float(all_y.max())
  if y_hi - y_lo < 1e-12:
    y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
  pad = 0.05 * (y_hi - y_lo)
  y_lo, y_hi = y_lo - pad, y_hi + pad
  x_lo, x_hi = float(x.min()), float(x.max())
  if x_hi - x_lo < 1e-12:
    x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

  def px(xv, yv):
    return (left + (xv - x_lo) / (x_hi - x_lo) * (w - left - right),
            h - bottom - (yv - y_lo) / (y_hi - y_lo) * (h - top - bottom))

  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for i in range(5):
    xv = x_lo + (x_hi - x_lo) * i / 4
    xp, _ = px(xv, y_lo)
    draw.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
    draw.text((xp - 12, h - bottom + 6), f"{xv:.2f}", fill="black", font=font)
    yv = y_lo + (y_hi - y_lo) * i / 4
    _, yp = px(x_lo, yv)
    draw.line([left - 4, yp, left, yp], fill="black")
    label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
    draw.text((4, yp - 7), label, fill="black", font=font)
  draw.text((left, 8), title, fill="black", font=_font(14))
  draw.text(((w - left - right) // 2 + left - 40, h - 22), xlabel, fill="black", font=font)
  draw.text((4, top - 22), ylabel + (" (log scale)" if log_y else ""), fill="black", font=font)
  for i, (name, y) in enumerate(ys.items()):
    color = _PALETTE[i % len(_PALETTE)]
    ty = tr(y)
    pts = [px(a, b) for a, b in zip(x, ty) if np.isfinite(b)]
    if len(pts) > 1:
      draw.line(pts, fill=color, width=2)
    for p in pts:
      draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
    ly = top + 8 + 16 * i
    draw.line([w - right - 200, ly + 6, w - right - 180, ly + 6], fill=color, width=2)
    draw.text((w - right - 175, ly), name, fill="black", font=font)
  return np.asarray(img)


def heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], title: str,
            *, cell: tuple[int, int] = (90, 32)) -> np.ndarray:
  """A [R, C] matrix of values in [0, 1] as a labelled colour grid, uint8 RGB [H, W, 3].

  White (0) to dark blue (1); each cell also prints its value.
  """
  m = np.clip(np.nan_to_num(np.asarray(matrix, np.float64)), 0.0, 1.0)
  rows, cols = m.shape
  cw, ch = cell
  left, top = 130, 56
  img = Image.new("RGB", (left + cols * cw + 10, top + rows * ch + 10), "white")
  draw = ImageDraw.Draw(img)
  font = _font(12)
  draw.text((6, 6), title, fill="black", font=_font(14))
  for j, name in enumerate(col_labels):
    draw.text((left + j * cw + 6, top - 20), str(name)[:12], fill="black", font=font)
  for i in range(rows):
    draw.text((6, top + i * ch + 9), str(row_labels[i])[:20], fill="black", font=font)
    for j in range(cols):
      v = m[i, j]
      color = tuple(int(round(255 + (c - 255) * v)) for c in (8, 48, 107))
      x0, y0 = left + j * cw, top + i * ch
      draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], fill=color, outline="gray")
      draw.text((x0 + cw // 2 - 14, y0 + 9), f"{v:.2f}", fill="white" if v > 0.5 else "black",
                font=font)
  return np.asarray(img)
