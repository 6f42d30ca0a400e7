"""The sections of the evaluation report, one `Section` each: whether it applies to a run (and why
not), and how it runs. The metric functions they call are plain functions of arrays
(probes, disentanglement, elbo, straightness, attributes, fid); the sections feed them arrays
produced by the model (through `inference`).

  latents            KL(q(z_i | x) || N(0, 1)) per latent, ranked; posterior stds.
  disentanglement    factor R^2 (linear, kNN), MIG, DCI, SAP, FactorVAE score,
                     |correlation| heat map latent x factor.                  (datasets with factors)
  elbo               the bound on -log p(x) in bits/dim (evaluation/elbo.py).
  denoising          eps-prediction MSE per t bucket of the model's own prediction; for SAMI
                     with guidance (gamma = 1) vs the denoiser alone (gamma = 0), same x_t and
                     eps for both: the guidance ablation.
  reconstruction     MSE / PSNR of reconstructions (sampling.*) and their grid.
  speckle            std of the uniform Disks background in test images, reconstructions and
                     samples: the sampling noise.
  straightness       curvature of latent vs pixel trajectories on disks_video.
  attributes         TAD, ATTRS, single-latent and linear-probe AUROC.     (datasets with attributes)
  fid                FID of reconstructions and prior samples (needs eval.inception_weights).
  grids              prior samples, latent traversals, interpolations (PNG).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sami_jax import configlib
from sami_jax import inference
from sami_jax import kinds
from sami_jax import objective
from sami_jax import rngs
from sami_jax import samplers
from sami_jax.data import pipeline
from sami_jax.evaluation import attributes as attributes_lib
from sami_jax.evaluation import disentanglement
from sami_jax.evaluation import elbo as elbo_lib
from sami_jax.evaluation import factors as factors_lib
from sami_jax.evaluation import fid as fid_lib
from sami_jax.evaluation import plots
from sami_jax.evaluation import probes
from sami_jax.evaluation import speckle
from sami_jax.evaluation import straightness
from sami_jax.evaluation.context import Context
from sami_jax.evaluation.tables import Tables
from sami_jax.utils import images as images_lib

# A latent whose mean KL to the prior is below this (nats) is reported as inactive (collapsed).
ACTIVE_KL_NATS = 0.01

Result = tuple[dict[str, Any], Tables]


@dataclasses.dataclass(frozen=True)
class Section:
  """One section of the report.

  Attributes:
    name: its key in report.json (one of configlib.EVAL_SECTIONS).
    applies: ctx -> "" when the section applies to the run, else the reason it does not.
    run: ctx -> (results for report.json, tables for report.md).
  """
  name: str
  applies: Callable[[Context], str]
  run: Callable[[Context], Result]


# ------------------------------------------------------------------------------ helpers


def psnr(mse: np.ndarray) -> np.ndarray:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their per-image MSE."""
  return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


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
  eps = rngs.normal(k_eps, (batch_size,) + tuple(image_shape), jnp.float32)
  return jnp.maximum(t, 1e-5), eps


def _has_factors(ctx: Context) -> str:
  if not pipeline.factor_names(ctx.config):
    return (f"needs ground-truth factors (Disks runs); this run is on "
            f"{ctx.config.data.name!r}")
  return ""


def _needs_latents(ctx: Context) -> str:
  if not ctx.kind.has_encoder:
    return f"a {ctx.kind.name} run has no encoder, hence no latents"
  return ""


def _first(*checks: Callable[[Context], str]) -> Callable[[Context], str]:
  """An `applies` that returns the first reason any of `checks` gives."""
  def applies(ctx: Context) -> str:
    for check in checks:
      reason = check(ctx)
      if reason:
        return reason
    return ""
  return applies


# ------------------------------------------------------------------------------ latents


def _latents_apply(ctx: Context) -> str:
  if not ctx.kind.has_posterior:
    return (f"{ctx.kind.name} has no posterior q(z | x) (its encoder is {ctx.kind.encoder}), "
            "hence no KL per latent")
  return ""


def latents(ctx: Context) -> Result:
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


# ------------------------------------------------------------------------------ factors


def _factor_sets(ctx: Context, factors: np.ndarray) -> dict[str, factors_lib.FactorSet]:
  """The factor sets a run's latents are scored against: the stored (Cartesian) factors, and the
  polar view of the disk position when the factors have one (Disks)."""
  names = pipeline.factor_names(ctx.config)
  if all(n in names for n in factors_lib.POSITION_NAMES["cartesian"]):
    return factors_lib.factor_sets(factors, names, ctx.config.data.image_size)
  return {"cartesian": factors_lib.FactorSet(
      name="cartesian", values=np.asarray(factors, np.float64), names=tuple(names),
      circular=(False,) * len(names), position=())}


def factor_probe(ctx: Context) -> dict[str, Any]:
  """R^2 of each ground-truth factor predicted from the latent means (linear and kNN probes
  fitted on eval.num_examples train latents, scored on as many test latents), against each
  factor set (Cartesian as stored; polar for Disks: r and theta about the image centre, theta
  scored on (cos theta, sin theta))."""
  tr, te = ctx.encoded("train"), ctx.encoded("test")
  sets_tr, sets_te = _factor_sets(ctx, tr["factors"]), _factor_sets(ctx, te["factors"])
  out: dict[str, Any] = {"num_train": int(len(tr["mean"])), "num_test": int(len(te["mean"])),
                         "sets": {}}
  for key, fs in sets_tr.items():
    r2 = probes.factor_r2(tr["mean"], fs.values, te["mean"], sets_te[key].values,
                          knn_neighbors=min(10, len(tr["mean"])), circular=fs.circular)
    out["sets"][key] = {"factors": list(fs.names), "circular": list(fs.circular),
                        "linear_r2": [float(v) for v in r2["linear"]],
                        "knn_r2": [float(v) for v in r2["knn"]]}
  cart = out["sets"]["cartesian"]
  out.update(factors=cart["factors"], linear_r2=cart["linear_r2"], knn_r2=cart["knn_r2"])
  return out


def _set_scores(ctx: Context, ztr, fs_tr: factors_lib.FactorSet, zte,
                fs_te: factors_lib.FactorSet, probe: dict[str, Any]) -> dict[str, Any]:
  """MIG, SAP, DCI and the FactorVAE score of the latents against one factor set."""
  v = ctx.config.eval
  d = ztr.shape[1]
  out: dict[str, Any] = dict(probe)
  if d >= 2:  # MIG and SAP compare the best latent with the second best
    m = disentanglement.mig(ztr, fs_tr.values, circular=fs_tr.circular)
    sp = disentanglement.sap(ztr, fs_tr.values, circular=fs_tr.circular)
    out.update(mig=m["mig"], mig_per_factor=m["per_factor"], sap=sp["sap"],
               sap_per_factor=sp["per_factor"])
  else:
    out.update(mig=None, sap=None, mig_per_factor=None, sap_per_factor=None,
               mig_sap_skipped="needs at least 2 latent dims")
  dci = disentanglement.dci(ztr, fs_tr.values, zte, fs_te.values, mode=v.dci_mode,
                            circular=fs_tr.circular, seed=ctx.config.seed)
  fv = disentanglement.factorvae_score_from_dataset(
      ztr, fs_tr.values, batch_size=min(64, len(ztr)), num_train=v.factorvae_votes,
      num_eval=max(1, v.factorvae_votes // 2), circular=fs_tr.circular, seed=ctx.config.seed)
  out.update(dci_disentanglement=dci["disentanglement"], dci_completeness=dci["completeness"],
             dci_informativeness=dci["informativeness"],
             dci_informativeness_per_factor=dci["informativeness_per_factor"],
             dci_settings=dci["settings"], factorvae=fv["factorvae"],
             factorvae_train_accuracy=fv["train_accuracy"],
             factorvae_active_dims=fv["num_active_dims"],
             correlation=disentanglement.correlation_matrix(ztr, fs_tr.values))
  return out


# The scores of the aligned factor set that the section also reports at its top level.
_HEADLINE = ("mig", "mig_per_factor", "sap", "sap_per_factor", "dci_disentanglement",
             "dci_completeness", "dci_informativeness", "factorvae", "factorvae_train_accuracy",
             "factorvae_active_dims")


def disentanglement_section(ctx: Context) -> Result:
  tr, te = ctx.encoded("train"), ctx.encoded("test")
  ztr, zte = tr["mean"], te["mean"]
  d = ztr.shape[1]
  probe = factor_probe(ctx)
  sets_tr, sets_te = _factor_sets(ctx, tr["factors"]), _factor_sets(ctx, te["factors"])
  per_set = {key: _set_scores(ctx, ztr, sets_tr[key], zte, sets_te[key], probe["sets"][key])
             for key in sets_tr}
  if "polar" in per_set:
    position = {k: {"position_linear_r2": float(np.mean(
                        np.asarray(per_set[k]["linear_r2"])[list(sets_tr[k].position)])),
                    "position_mig": (None if per_set[k]["mig_per_factor"] is None else
                                     float(np.mean(np.asarray(per_set[k]["mig_per_factor"])[
                                         list(sets_tr[k].position)])))}
                for k in per_set}
    aligned = factors_lib.aligned_coordinates(position)
  else:
    aligned = {"aligned": "cartesian", "decided_by": None, "rule": "only one factor set"}
  headline_set = "polar" if aligned["aligned"] == "polar" else "cartesian"
  headline = per_set[headline_set]
  cart = per_set["cartesian"]
  result: dict[str, Any] = {
      "factors": cart["factors"], "num_train": probe["num_train"], "num_test": probe["num_test"],
      "linear_r2": cart["linear_r2"], "knn_r2": cart["knn_r2"],
      "correlation": cart["correlation"], "dci_mode": ctx.config.eval.dci_mode,
      "dci_settings": cart["dci_settings"]["description"], "sets": per_set,
      "aligned": aligned["aligned"], "alignment": aligned,
      "headline_set": headline_set,
  }
  result.update({k: headline[k] for k in _HEADLINE})
  if ctx.kind.has_posterior:
    _, kl = disentanglement.rank_latents_by_kl(tr["mean"], tr["std"])
    row_labels = [f"z{i} (KL {kl[i]:.2f})" for i in range(d)]
  else:
    row_labels = [f"z{i}" for i in range(d)]
  result["correlation_figure"] = ctx.save_png(
      "correlation.png", plots.heatmap(cart["correlation"], row_labels, cart["factors"],
                                       "|corr(latent, factor)|, train split"))
  tables: Tables = []
  scores = [["aligned factor set (" + str(aligned.get("decided_by") or "n/a") + ")",
             aligned["aligned"]]]
  for name, label in (("mig", "MIG"), ("sap", "SAP"), ("dci_disentanglement", "DCI disentanglement"),
                      ("dci_completeness", "DCI completeness"),
                      ("dci_informativeness", "DCI informativeness"),
                      ("factorvae", "FactorVAE (finite dataset)")):
    scores.append([label] + [per_set[k][name] for k in per_set])
  tables.append((f"Scores per factor set (DCI: {result['dci_settings']})",
                 ["metric"] + list(per_set), scores))
  for key, sc in per_set.items():
    rows = [[n, sc["linear_r2"][j], sc["knn_r2"][j],
             None if sc["mig_per_factor"] is None else sc["mig_per_factor"][j],
             None if sc["sap_per_factor"] is None else sc["sap_per_factor"][j],
             sc["dci_informativeness_per_factor"][j]] for j, n in enumerate(sc["factors"])]
    tables.append((f"Per factor, {key} set (R^2 on the test split; theta on cos/sin)",
                   ["factor", "linear R^2", "kNN R^2", "MIG gap", "SAP gap",
                    "DCI informativeness"], rows))
  tables.append(("|correlation| latent x factor (correlation.png)", ["latent"] + cart["factors"],
                 [[row_labels[i]] + list(cart["correlation"][i]) for i in range(d)]))
  return result, tables


# ------------------------------------------------------------------------------ the bound


def _elbo_applies(ctx: Context) -> str:
  if not ctx.kind.has_bound:
    return ctx.kind.no_bound_reason
  return ""


def bound_fn(ctx: Context, *, guided: bool = True):
  """The kind's bound on -log p(x), one Monte Carlo draw per call (evaluation/elbo.py).

  Diffusion kinds: the diffusion bound of the model's noise prediction; with a posterior, z is
  drawn from q(z | x0) and its KL is a term of the bound. guided=False: the denoiser alone
  (gamma = 0, no latent, no KL), i.e. the unconditional bound of the same denoiser.
  A one-shot decoder (beta_vae): E_q[-log p(x | z)] + KL with its Gaussian likelihood.
  """
  comp, kind = ctx.comp, ctx.kind
  tc = comp.time_conditioning
  if kind.bound == "decoder":
    return elbo_lib.DecoderBoundFn(
        posterior_fn=lambda p, x: objective.encode_clean(
            objective.bind_encoder(comp.encoder, p["encoder"], tc), x),
        decoder_fn=lambda p, z: samplers.decoder_mean(comp.image_model, p, z, clip=False),
        obs_std=float(ctx.config.model.decoder.obs_std))
  gamma = float(ctx.config.diffusion.guidance_scale)
  with_posterior = kind.has_posterior and guided

  def eps_hat_fn(params, x_t, t, x0, rng):
    extras = {}
    z = jnp.zeros((x0.shape[0], 1))
    if with_posterior:
      encode_fn = objective.bind_encoder(comp.encoder, params["encoder"], tc)
      mean0, std0 = objective.encode_clean(encode_fn, x0)
      z = mean0 + std0 * rngs.normal(rng, mean0.shape, mean0.dtype)
      extras["latent_kl"] = objective.kl_to_standard_normal(mean0, std0)
    if guided:
      eps = kinds.eps_fn(kind, comp.image_model, comp.encoder, params, z, gamma=gamma,
                         time_conditioning=tc, schedule=comp.schedule)
    else:
      eps = samplers.unconditional_eps_fn(comp.image_model, params)
    return eps(x_t, t), extras

  return elbo_lib.make_bound_fn(comp.schedule, eps_hat_fn)


def elbo(ctx: Context) -> Result:
  v = ctx.config.eval
  key = ctx.key("elbo")

  def estimate(fn):
    batches = ((b["image"], b["mask"]) for b in ctx.batches("test", v.num_elbo_examples))
    return elbo_lib.estimate(fn, ctx.params, batches, draws=int(v.elbo_t_samples), key=key)

  est = estimate(bound_fn(ctx))
  result: dict[str, Any] = est.as_dict()
  result["total_bpd"] = est.bits_per_dim["total"]
  result["total_bpd_stderr"] = est.bits_per_dim_stderr["total"]
  terms = [k for k in est.bits_per_dim if k != "total"]
  rows = [[k, est.bits_per_dim[k], est.bits_per_dim_stderr[k]] for k in terms]
  rows.append(["total", est.bits_per_dim["total"], est.bits_per_dim_stderr["total"]])
  if ctx.kind.is_diffusion:
    lo, hi = est.logsnr_range
    how = (f"lambda uniform on [{lo:.3g}, {hi:.3g}] (the schedule's end points), weight "
           f"(lambda_0 - lambda_1) / 2, {est.draws} stratified draws per image; prior term at "
           "lambda_1, discretised reconstruction at lambda_0")
  else:
    how = (f"{est.draws} draws of z ~ q(z | x) per image; discretised Gaussian likelihood "
           f"(obs_std {ctx.config.model.decoder.obs_std:g}) on the 8-bit bins")
  result["estimator"] = how
  if ctx.kind.uses_guidance:
    alone = estimate(bound_fn(ctx, guided=False))
    diff, diff_se = elbo_lib.paired_difference(est, alone)
    result.update(total_no_guidance_bpd=alone.bits_per_dim["total"],
                  total_no_guidance_bpd_stderr=alone.bits_per_dim_stderr["total"],
                  guided_minus_denoiser_alone_bpd=diff,
                  guided_minus_denoiser_alone_bpd_stderr=diff_se)
    rows.append(["total, denoiser alone (gamma = 0, no latent)", alone.bits_per_dim["total"],
                 alone.bits_per_dim_stderr["total"]])
    rows.append(["guided (incl. latent KL) minus denoiser alone, image by image", diff, diff_se])
  return result, [(f"Bound on -log p(x), bits/dim, test split ({est.num_images} images; {how})",
                   ["term", "bits/dim", "standard error"], rows)]


# ------------------------------------------------------------------------------ denoising


def _diffusion_applies(ctx: Context) -> str:
  if not ctx.kind.is_diffusion:
    return f"{ctx.kind.name} is not a diffusion model (no noise prediction)"
  return ""


def denoising(ctx: Context) -> Result:
  """eps-prediction MSE per noise-level bucket: the model's own prediction given its latent (the
  posterior mean of the clean image), and, for a kind with score guidance, the denoiser alone
  (gamma = 0) on the same x_t and eps: the guidance ablation."""
  v = ctx.config.eval
  k_buckets = int(v.ablation_buckets)
  comp, kind = ctx.comp, ctx.kind
  schedule = comp.schedule

  @jax.jit
  def mse(params, x0, t, eps):
    """Per-example eps-MSE (mean over pixels): {"model": [B], "alone": [B] (guided kinds)}."""
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = objective.diffuse(x0, eps, alpha, sigma)
    if kind.has_encoder:
      encode_fn = objective.bind_encoder(comp.encoder, params["encoder"], comp.time_conditioning)
      z = objective.encode_clean(encode_fn, x0)[0]
    else:
      z = jnp.zeros((x0.shape[0], 1))
    pred = kinds.eps_fn(kind, comp.image_model, comp.encoder, params, z, gamma=1.0,
                        time_conditioning=comp.time_conditioning, schedule=schedule)(x_t, t)
    out = {"model": jnp.mean((eps - pred) ** 2, axis=(1, 2, 3))}
    if kind.uses_guidance:
      alone = samplers.unconditional_eps_fn(comp.image_model, params)(x_t, t)
      out["alone"] = jnp.mean((eps - alone) ** 2, axis=(1, 2, 3))
    return out

  key = ctx.key("denoising")
  sums: dict[str, np.ndarray] = {}
  count = 0
  for bi, batch in enumerate(ctx.batches("test", v.num_ablation_examples)):
    x0 = jnp.asarray(batch["image"])
    mask = np.asarray(batch["mask"], bool)
    for k in range(k_buckets):
      t, eps = ablation_noise(key, bi, k, x0.shape[0], ctx.image_shape, k_buckets)
      for name, val in jax.device_get(mse(ctx.params, x0, t, eps)).items():
        sums.setdefault(name, np.zeros(k_buckets))[k] += np.asarray(val, np.float64)[mask].sum()
    count += int(mask.sum())
  per = {name: total / count for name, total in sums.items()}
  edges = np.linspace(0.0, 1.0, k_buckets + 1)
  centers = (edges[:-1] + edges[1:]) / 2
  what = {True: "guided by the posterior mean of the clean image (gamma = 1)",
          False: "the denoiser (no latent)"}[kind.uses_guidance]
  if kind.latent_route == "adagn":
    what = "conditioned on the encoder's latent of the clean image"
  result: dict[str, Any] = {
      "num_examples": count, "bucket_edges": edges, "bucket_centers": centers,
      "mse": per["model"], "mean_mse": float(per["model"].mean()), "prediction": what}
  series = {"model (" + ("gamma = 1" if kind.uses_guidance else kind.name) + ")": per["model"]}
  header = ["t bucket", "eps MSE"]
  if "alone" in per:
    ratio = per["model"] / per["alone"]
    result.update(mse_denoiser_alone=per["alone"], mean_mse_denoiser_alone=float(
        per["alone"].mean()), ratio_guided_to_alone=ratio)
    series["denoiser alone (gamma = 0)"] = per["alone"]
    header = ["t bucket", "gamma = 1 (guided)", "gamma = 0 (denoiser alone)", "ratio"]
  result["figure"] = ctx.save_png("denoising.png", plots.line_plot(
      centers, series, xlabel="t (bucket centre)", ylabel="eps MSE",
      title="Denoising MSE per noise level",
      log_y=bool(all(np.all(v_ > 0) for v_ in series.values()))))
  rows = []
  for k in range(k_buckets):
    row = [f"[{edges[k]:.2f}, {edges[k + 1]:.2f})", per["model"][k]]
    if "alone" in per:
      row += [per["alone"][k], per["model"][k] / per["alone"][k]]
    rows.append(row)
  last = ["mean over t", result["mean_mse"]]
  if "alone" in per:
    last += [result["mean_mse_denoiser_alone"],
             result["mean_mse"] / result["mean_mse_denoiser_alone"]]
  rows.append(last)
  return result, [(f"eps-prediction MSE per t bucket ({count} test images; same x_t and eps in "
                   "every column)", header, rows)]


# ------------------------------------------------------------------------------ reconstructions


def reconstruct_batches(ctx: Context, num: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(originals, reconstructions), each [num, H, W, C] in [-1, 1], the first num of the test
  split (with their factors in ctx.memo when the data has them); computed once per (num, key)."""
  return ctx.memo(("reconstructions", num, tuple(np.asarray(key).ravel())),
                  lambda: _reconstruct_batches(ctx, num, key))


def _reconstruct_batches(ctx: Context, num: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  originals, recons = [], []
  for bi, batch in enumerate(ctx.batches("test", num)):
    mask = np.asarray(batch["mask"], bool)
    rec = inference.reconstruct(ctx.comp, ctx.params, batch["image"], jax.random.fold_in(key, bi),
                                use_mean=ctx.config.sampling.use_mean, **ctx.sampling_kwargs())
    originals.append(np.asarray(batch["image"])[mask])
    recons.append(np.asarray(rec)[mask])
  return np.concatenate(originals), np.concatenate(recons)


def reconstruction(ctx: Context) -> Result:
  x, rec = reconstruct_batches(ctx, ctx.config.eval.num_recon, ctx.key("reconstruction"))
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
  if not ctx.kind.is_diffusion:  # a one-shot decoder: the sampling.* fields do not apply
    how = "the decoder's mean image"
    result.update(sampler="decoder", steps=0, eta=None, guidance_scale=None)
  table = [["images", result["num_images"]], ["MSE", result["mse"]],
           ["PSNR (dB)", result["psnr_db"]], ["sampler", how]]
  return result, [("Reconstructions of test images (reconstructions.png: odd rows originals)",
                   ["measure", "value"], table)]


# ------------------------------------------------------------------------------ speckle


def _speckle_applies(ctx: Context) -> str:
  names = pipeline.factor_names(ctx.config)
  if ctx.config.data.name != "disks" or not {"x", "y"} <= set(names):
    return (f"measures noise on Disks' uniform backgrounds; this run is on "
            f"{ctx.config.data.name!r}")
  return ""


def speckle_section(ctx: Context) -> Result:
  """Sampling noise on the uniform Disks background: the std of background pixels (centre
  farther than radius + 2 px from the disk centre) of test images, of reconstructions and of
  samples, per image, then averaged (with sampling.prior = latent_diffusion, also of samples whose
  z come from the run's fitted latent prior). Generated images are measured around the disk found
  in them (speckle.estimate_disks), with the data's radius when it is not a factor."""
  from sami_jax.data import disks  # pylint: disable=g-import-not-at-top
  n = int(ctx.config.eval.num_recon)
  names = pipeline.factor_names(ctx.config)
  size = int(ctx.config.data.image_size)
  images, facts = [], []
  for batch in ctx.batches("test", n):
    mask = np.asarray(batch["mask"], bool)
    images.append(np.asarray(batch["image"])[mask])
    facts.append(np.asarray(batch["factors"])[mask])
  images, facts = np.concatenate(images), np.concatenate(facts)
  col = {name: facts[:, i] for i, name in enumerate(names)}
  known_radius = "radius" not in col
  radius = disks.radius_range(ctx.config.data.factors, size)[0] if known_radius else col["radius"]
  data = speckle.background_stats(images, np.stack([col["x"], col["y"]], -1), radius)
  result: dict[str, Any] = {"num_images": int(len(images)), "margin_px": speckle.DEFAULT_MARGIN,
                            "data_std": float(np.mean(data["std"]))}
  rows = [["test images (8-bit renders)", result["data_std"], float(np.mean(data["mean"]))]]
  sets = {}
  if ctx.kind.has_encoder:
    _, rec = reconstruct_batches(ctx, n, ctx.key("reconstruction"))
    sets["reconstructions"] = rec
  sets["samples"] = prior_samples(ctx, n, jax.random.fold_in(ctx.key("speckle"), 0))
  if ctx.kind.has_encoder and ctx.config.sampling.prior == "latent_diffusion":
    sets["latent_prior_samples"] = prior_samples(ctx, n, jax.random.fold_in(ctx.key("speckle"), 0),
                                                 latent_prior=True)
  for name, generated in sets.items():
    st = speckle.sample_background_std(generated, radius=radius if known_radius else None)
    result[f"{name}_std"] = float(np.mean(st["std"]))
    result[f"{name}_std_per_image"] = st["std"]
    result[f"{name}_clipped_fraction"] = float(np.mean(st["clipped_fraction"]))
    rows.append([name + (" (z ~ N(0, I))" if name == "samples" and ctx.kind.has_encoder else ""),
                 result[f"{name}_std"], float(np.mean(st["mean"]))])
  return result, [(f"Background std in [-1, 1] units ({n} images per set; pixels > radius + "
                   f"{speckle.DEFAULT_MARGIN:g} px from the disk centre)",
                   ["images", "background std", "background mean"], rows)]


# ------------------------------------------------------------------------------ straightness


def video_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config with the data switched to disks_video (same image size and factors).

  Only the test split is read, so the train split is a single sequence (it is still built).
  """
  cfg = configlib.copy(config)
  cfg.data.name = "disks_video"
  cfg.data.num_train = 1
  cfg.data.num_test = int(config.eval.num_video)
  return cfg


def _straightness_applies(ctx: Context) -> str:
  if ctx.config.data.name != "disks":
    return f"needs the disks_video sequences (Disks runs); this run is on {ctx.config.data.name!r}"
  return ""


def straightness_section(ctx: Context) -> Result:
  vcfg = video_config(ctx.config)
  frames = int(vcfg.data.video_frames)
  seqs = max(1, ctx.batch_size // frames)  # sequences per call, so a call sees <= batch images
  latents, pixels = [], []
  for batch in pipeline.eval_iterator(vcfg, "test", seqs, num_examples=vcfg.data.num_test):
    mask = np.asarray(batch["mask"], bool)
    video = np.asarray(batch["image"])  # [S, F, H, W, C]
    flat = video.reshape((-1,) + video.shape[2:])
    mean = np.asarray(jax.device_get(inference.encode(ctx.comp, ctx.params, flat)[0]))
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


# ------------------------------------------------------------------------------ attributes


def _attributes_apply(ctx: Context) -> str:
  if not hasattr(pipeline.dataset_for(ctx.config), "attribute_names"):
    return f"needs binary attributes (CelebA runs); this run is on {ctx.config.data.name!r}"
  return ""


def attributes_section(ctx: Context) -> Result:
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
  names = list(pipeline.dataset_for(ctx.config).attribute_names())
  captured = [names[k] if k < len(names) else str(k) for k in np.flatnonzero(t["captured"])]
  result["captured_attributes"] = captured
  rows = [["TAD", result["tad"]], ["ATTRS", result["attrs"]],
          ["mean best single-latent AUROC", result["mean_best_single_latent_auroc"]],
          ["linear-probe AUROC (mean over attributes)", result["linear_probe_auroc"]],
          ["captured attributes", ", ".join(captured) or "none"]]
  return result, [("CelebA attributes (TAD/ATTRS on train latents, probe scored on test)",
                   ["metric", "value"], rows)]


# ------------------------------------------------------------------------------ FID


def _inception_url() -> str:
  from sami_jax.evaluation import inception  # builds Flax modules: imported only when needed
  return inception.WEIGHTS_URL


def _fid_applies(ctx: Context) -> str:
  data = ctx.config.data.name
  if data not in ("celeba", "folder"):
    return f"FID measures natural images (CelebA / folder runs); this run is on {data!r}"
  if not ctx.config.eval.inception_weights:
    return ("config.eval.inception_weights is empty. FID needs the pytorch-fid Inception "
            "weights: download " + _inception_url() + ", convert them with `python -m "
            "sami_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth "
            "inception_fid.npz` (needs PyTorch once), then pass "
            "--config.eval.inception_weights=/path/to/inception_fid.npz")
  return ""


def prior_samples(ctx: Context, num: int, key: jax.Array, *,
                  latent_prior: bool = False) -> np.ndarray:
  """num images generated from z ~ N(0, I) (unconditional for a kind without latents), or with
  latent_prior from z drawn from the run's fitted latent diffusion prior
  (inference.fitted_latent_prior), in batches of eval size."""
  d = ctx.comp.latent_dim if ctx.kind.has_encoder else 1
  prior = None
  if latent_prior:
    from sami_jax import latent_prior as latent_prior_lib  # pylint: disable=g-import-not-at-top
    prior = ctx.memo("latent_prior", lambda: inference.fitted_latent_prior(
        ctx.config, ctx.params, ctx.workdir, ctx.step))
  out, i = [], 0
  while i < num:
    kb = jax.random.fold_in(key, i)
    if prior is None:
      z = rngs.normal(kb, (ctx.batch_size, d))  # fixed shape: one compilation
    else:
      z = latent_prior_lib.sample(ctx.config, prior, ctx.batch_size, jax.random.fold_in(kb, 1))
    x = inference.decode(ctx.comp, ctx.params, z, kb, **ctx.sampling_kwargs())
    out.append(np.asarray(x)[:num - i])
    i += ctx.batch_size
  return np.concatenate(out)


def fid_section(ctx: Context) -> Result:
  from sami_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
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
  cache = os.path.join(os.path.dirname(ctx.out_dir or "."),
                       f"fid_ref_{d.name}_test_{v.num_fid}_{d.image_size}px_{d.channels}ch.npz")
  mu_ref, sigma_ref = fid_lib.cached_stats(cache, lambda: features(real_images()))
  result: dict[str, Any] = {"num_images": int(v.num_fid), "reference": "test split",
                            "reference_stats": os.path.basename(cache)}
  key = ctx.key("fid")
  if ctx.kind.has_encoder:
    _, rec = reconstruct_batches(ctx, v.num_fid, jax.random.fold_in(key, 0))
    result["fid_reconstructions"] = fid_lib.frechet_distance(
        *fid_lib.stats(features(rec)), mu_ref, sigma_ref)
  samples = prior_samples(ctx, int(v.num_fid), jax.random.fold_in(key, 1))
  result["fid_prior_samples"] = fid_lib.frechet_distance(
      *fid_lib.stats(features(samples)), mu_ref, sigma_ref)
  rows = [[k, result[k]] for k in ("fid_reconstructions", "fid_prior_samples") if k in result]
  return result, [(f"FID against {v.num_fid} test images", ["set", "FID"], rows)]


# ------------------------------------------------------------------------------ figures


def grids(ctx: Context) -> Result:
  key = ctx.key("grids")
  s = ctx.config.sampling
  n = min(16, ctx.batch_size)
  samples = prior_samples(ctx, n, jax.random.fold_in(key, 0))
  result: dict[str, Any] = {"prior_samples": ctx.save_png(
      "prior_samples.png", images_lib.make_grid(samples, ncol=int(math.sqrt(n)) or 1))}
  rows = [["prior_samples.png",
           "z ~ N(0, I)" if ctx.kind.has_encoder else "unconditional samples"]]
  if ctx.kind.has_encoder:
    kw = ctx.sampling_kwargs()
    values = inference.traversal_values(ctx.config)
    # One eval batch holds the pairs (padding rows repeat example 0 if the split is smaller).
    num_pairs = min(int(ctx.config.eval.num_interpolations), ctx.batch_size // 2)
    images = next(iter(ctx.batches("test", max(1, 2 * num_pairs))))["image"]
    mean, _ = inference.encode(ctx.comp, ctx.params, images)
    dims = [int(i) for i in ctx.kl_order()[:inference.MAX_TRAVERSAL_DIMS]]
    trav = inference.traversal_rows(ctx.comp, ctx.params, mean[0], dims, values,
                                    jax.random.fold_in(key, 1), **kw)
    result["traversals"] = ctx.save_png("traversals.png",
                                        images_lib.make_grid(trav, ncol=len(values)))
    result["traversal_dims"] = dims
    result["traversal_values"] = values
    order = "by decreasing KL" if ctx.kind.has_posterior else "by decreasing spread"
    rows.append(["traversals.png", f"row i: latent {dims} ({order}) set to "
                 f"{s.traverse_points} values in [-{s.traverse_range}, {s.traverse_range}], "
                 "others at test image 0's posterior mean"])
    if num_pairs:
      interp = []
      for p in range(num_pairs):
        a, b = 2 * p, 2 * p + 1
        row = inference.interpolate(ctx.comp, ctx.params, mean[a], mean[b], s.traverse_points,
                                    jax.random.fold_in(key, 2), **kw)
        interp.append(np.concatenate([images[a:a + 1], np.asarray(row), images[b:b + 1]]))
      result["interpolations"] = ctx.save_png("interpolations.png", images_lib.make_grid(
          np.concatenate(interp), ncol=s.traverse_points + 2))
      rows.append(["interpolations.png", f"{num_pairs} pairs of test images (first and last "
                   f"column), {s.traverse_points} latents on the line between their means"])
  return result, [("Figures", ["file", "content"], rows)]


# ------------------------------------------------------------------------------ the registry

SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("latents", _latents_apply, latents),
    Section("disentanglement", _first(_needs_latents, _has_factors), disentanglement_section),
    Section("elbo", _elbo_applies, elbo),
    Section("denoising", _diffusion_applies, denoising),
    Section("reconstruction", _needs_latents, reconstruction),
    Section("speckle", _speckle_applies, speckle_section),
    Section("straightness", _first(_needs_latents, _straightness_applies), straightness_section),
    Section("attributes", _first(_needs_latents, _attributes_apply), attributes_section),
    Section("fid", _fid_applies, fid_section),
    Section("grids", lambda ctx: "", grids),
)}
assert tuple(SECTIONS) == configlib.EVAL_SECTIONS, "configlib.EVAL_SECTIONS lists the sections"
