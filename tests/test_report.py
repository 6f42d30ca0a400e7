"""--mode=eval: the report of a tiny run, its values checked against independent computations."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sami_jax import configlib
from sami_jax import inference
from sami_jax import rngs
from sami_jax import schedules
from sami_jax import train
from sami_jax.data import pipeline
from sami_jax.evaluation import elbo
from sami_jax.evaluation import runner
from sami_jax.evaluation import sections
from tests.test_config import load_config

# ------------------------------------------------------------------------------ the report


EVAL_OVERRIDES = {
    "eval.batch_size": 16, "eval.num_examples": 48, "eval.num_elbo_examples": 16,
    "eval.elbo_t_samples": 2, "eval.num_ablation_examples": 24,  # 24: a padded last batch
    "eval.ablation_buckets": 4, "eval.num_recon": 6, "eval.num_video": 3,
    "eval.factorvae_votes": 50, "eval.num_interpolations": 2, "sampling.steps": 2,
}


def _set(config, field, value):
  section, key = field.split(".")
  config[section][key] = value


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny Disks checkpoint (2 steps), evaluated by runner.run in-process."""
  base = tmp_path_factory.mktemp("report")
  config = load_config("disks", "test")
  config.data.data_dir = str(base / "tfds")
  config.train.write_grids = False
  config.train.probe_at_end = False
  config.train.num_steps = 2  # checkpoints at steps 1 and 2 (the compile dominates anyway)
  config.train.ckpt_every = 1
  workdir = str(base / "run")
  train.train(config, workdir)
  for field, value in EVAL_OVERRIDES.items():
    _set(config, field, value)
  path = runner.run(config, workdir)
  with open(path) as f:
    # Strict JSON: NaN / Infinity would raise here.
    rep = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  return {"config": config, "workdir": workdir, "path": path, "report": rep}


EXPECTED = {
    "latents": ["num_examples", "kl_per_dim_nats", "kl_total_nats", "order_by_kl", "active_dims",
                "posterior_std_per_dim", "aggregate_mean_per_dim", "aggregate_std_per_dim"],
    "disentanglement": ["factors", "linear_r2", "knn_r2", "mig", "mig_per_factor", "sap",
                        "sap_per_factor", "dci_mode", "dci_settings", "dci_disentanglement",
                        "dci_completeness", "dci_informativeness", "factorvae",
                        "factorvae_train_accuracy", "factorvae_active_dims", "correlation",
                        "correlation_figure", "num_train", "num_test", "sets", "aligned",
                        "alignment", "headline_set"],
    "elbo": ["bits_per_dim", "bits_per_dim_stderr", "nats", "nats_stderr", "num_images", "draws",
             "num_dims", "logsnr_range", "total_bpd", "total_bpd_stderr", "estimator",
             "total_no_guidance_bpd", "guided_minus_denoiser_alone_bpd",
             "guided_minus_denoiser_alone_bpd_stderr"],
    "denoising": ["num_examples", "bucket_edges", "bucket_centers", "mse", "mean_mse",
                  "mse_denoiser_alone", "mean_mse_denoiser_alone", "ratio_guided_to_alone",
                  "prediction", "figure"],
    "reconstruction": ["num_images", "mse", "psnr_db", "sampler", "steps", "eta",
                       "guidance_scale", "use_mean", "figure"],
    "speckle": ["num_images", "margin_px", "data_std", "reconstructions_std", "samples_std",
                "reconstructions_clipped_fraction", "samples_clipped_fraction"],
    "straightness": ["latent_curvature", "latent_curvature_std", "pixel_curvature",
                     "pixel_curvature_std", "latent_cosine", "pixel_cosine",
                     "curvature_reduction", "num_sequences", "num_frames", "dataset"],
    "grids": ["prior_samples", "traversals", "traversal_dims", "traversal_values",
              "interpolations"],
}
FIGURES = ["correlation.png", "denoising.png", "reconstructions.png",
           "prior_samples.png", "traversals.png", "interpolations.png"]


def _cosine_logsnr(t, s=0.008):
  """Hand-written cosine-schedule log-SNR (Nichol & Dhariwal), float64."""
  ab = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
  return math.log(ab / (1 - ab))


def test_report_has_every_promised_field_and_figure(run):
  rep = run["report"]
  out_dir = os.path.dirname(run["path"])
  assert out_dir == os.path.join(run["workdir"], "eval", "2")
  assert rep["step"] == 2 and rep["dataset"] == "disks" and rep["model_kind"] == "sami"
  assert set(rep["sections"]) == set(configlib.EVAL_SECTIONS)
  for section, fields in EXPECTED.items():
    got = rep["sections"][section]
    assert "skipped" not in got, (section, got)
    missing = [f for f in fields + ["wall_time_s"] if f not in got]
    assert not missing, (section, missing)
  # Sections that do not fit a Disks run say why.
  assert "CelebA" in rep["sections"]["attributes"]["skipped"]
  assert "FID" in rep["sections"]["fid"]["skipped"]
  assert sorted(rep["figures"]) == sorted(FIGURES)
  for name in FIGURES:
    with Image.open(os.path.join(out_dir, name)) as im:
      assert im.format == "PNG" and im.size[0] > 8 and im.size[1] > 8
  with open(os.path.join(out_dir, "report.md")) as f:
    md = f.read()
  for section in configlib.EVAL_SECTIONS:
    assert f"## {section}" in md
  assert "| MIG |" in md and "gamma = 0" in md


def test_report_values_are_consistent(run):
  s = run["report"]["sections"]
  d, k = 3, 3  # latent dim and the xy_bg factors of the test config
  assert s["disentanglement"]["factors"] == ["x", "y", "background"]
  assert np.shape(s["disentanglement"]["correlation"]) == (d, k)
  assert s["disentanglement"]["num_train"] == s["disentanglement"]["num_test"] == 48
  assert sorted(s["latents"]["order_by_kl"]) == list(range(d))
  kl = s["latents"]["kl_per_dim_nats"]
  assert [kl[i] for i in s["latents"]["order_by_kl"]] == sorted(kl, reverse=True)
  e = s["elbo"]
  assert e["num_images"] == 16 and e["num_dims"] == 64 and e["draws"] == 2
  assert set(e["bits_per_dim"]) == {"diffusion", "prior", "reconstruction", "latent_kl", "total"}
  assert e["bits_per_dim"]["diffusion"] > 0 and e["bits_per_dim"]["prior"] >= 0
  assert e["bits_per_dim"]["reconstruction"] >= 0
  assert s["denoising"]["num_examples"] == 24
  assert s["speckle"]["num_images"] == 6 and s["speckle"]["data_std"] < 1e-9
  assert s["disentanglement"]["sets"]["polar"]["factors"] == ["r", "theta", "background"]
  assert s["disentanglement"]["aligned"] in ("cartesian", "polar", "undecided")
  assert s["straightness"]["num_sequences"] == 3 and s["straightness"]["num_frames"] == 16
  assert 0 <= s["straightness"]["pixel_curvature"] <= 180
  assert s["reconstruction"]["num_images"] == 6


def test_denoising_matches_an_independent_computation(run):
  """Same (t, eps) per bucket; MSEs recomputed here from the models directly."""
  config, rep = run["config"], run["report"]["sections"]["denoising"]
  run_config, params, _ = inference.restore(run["workdir"], given=config)
  comp = inference.components(run_config)
  den, enc, sched = comp.image_model, comp.encoder, comp.schedule
  key = rngs.section_key(run_config.seed, "denoising")
  buckets, bs, n = 4, 16, 24

  assert enc.time_conditioning  # the noise-aware encoder: clean images at t = 0, x_t at t

  def enc_apply(x, t):
    return enc.apply({"params": params["encoder"]}, x, t)

  def log_q(x, z, t):  # log N(z; mean(x), std(x)^2) summed over the batch, written out here
    mean, std = enc_apply(x, t)
    return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi))

  @jax.jit
  def per_example_mse(x0, t, eps):
    z, _ = enc_apply(x0, jnp.zeros_like(t))
    a = jnp.sqrt(jax.nn.sigmoid(sched.logsnr(t)))[:, None, None, None]
    sig = jnp.sqrt(jax.nn.sigmoid(-sched.logsnr(t)))[:, None, None, None]
    x_t = a * x0 + sig * eps
    eps_theta = den.apply({"params": params["denoiser"]}, x_t, t, train=False)
    guided = eps_theta - sig * jax.grad(log_q)(x_t, z, t)
    return (jnp.mean((eps - eps_theta) ** 2, axis=(1, 2, 3)),
            jnp.mean((eps - guided) ** 2, axis=(1, 2, 3)))

  sums0, sums1 = np.zeros(buckets), np.zeros(buckets)
  batches = pipeline.eval_iterator(run_config, "test", bs, num_examples=n)
  for bi, batch in enumerate(batches):
    x0, mask = jnp.asarray(batch["image"]), np.asarray(batch["mask"])
    for kb in range(buckets):
      t, eps = sections.ablation_noise(key, bi, kb, bs, (8, 8, 1), buckets)
      assert np.all((t >= kb / buckets) & (t < (kb + 1) / buckets + 1e-6))
      m0, m1 = per_example_mse(x0, t, eps)
      sums0[kb] += np.sum(np.asarray(m0)[mask])
      sums1[kb] += np.sum(np.asarray(m1)[mask])
  np.testing.assert_allclose(rep["mse_denoiser_alone"], sums0 / n, rtol=1e-4)
  np.testing.assert_allclose(rep["mse"], sums1 / n, rtol=1e-4)
  np.testing.assert_allclose(rep["mean_mse_denoiser_alone"], np.mean(sums0 / n), rtol=1e-4)


def test_bound_section_is_the_estimator_on_an_independent_eps_hat(run):
  """The report's bound = elbo.estimate on this test's own SAMI noise prediction (z ~ q(z | x0),
  guidance by jax.grad of a hand-written log q, the latent KL in closed form), same key."""
  config, rep = run["config"], run["report"]["sections"]["elbo"]
  run_config, params, _ = inference.restore(run["workdir"], given=config)
  comp = inference.components(run_config)
  den, enc, sched = comp.image_model, comp.encoder, comp.schedule

  def eps_hat_fn(p, x_t, t, x0, rng):
    mean0, std0 = enc.apply({"params": p["encoder"]}, x0, jnp.zeros_like(t))
    z = mean0 + std0 * jax.random.normal(rng, mean0.shape)

    def log_q(x):
      mean, std = enc.apply({"params": p["encoder"]}, x, t)
      return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std))
    sigma = jnp.sqrt(jax.nn.sigmoid(-sched.logsnr(t)))[:, None, None, None]
    eps = den.apply({"params": p["denoiser"]}, x_t, t, train=False) - sigma * jax.grad(log_q)(x_t)
    kl = 0.5 * jnp.sum(mean0 ** 2 + std0 ** 2 - 1 - jnp.log(std0 ** 2), axis=-1)
    return eps, {"latent_kl": kl}

  batches = ((b["image"], b["mask"]) for b in
             pipeline.eval_iterator(run_config, "test", 16, num_examples=16))
  est = elbo.estimate(elbo.make_bound_fn(sched, eps_hat_fn), params, batches, draws=2,
                      key=rngs.section_key(run_config.seed, "elbo"))
  for term, value in est.bits_per_dim.items():
    np.testing.assert_allclose(rep["bits_per_dim"][term], value, rtol=1e-4, err_msg=term)


def test_reconstruction_mse_and_psnr(run):
  """The report's 6 reconstructions redone here: guided DDIM (eta = 0, 2 steps, x0 clipped)
  written out step by step from the documented keys, the guidance by jax.grad of a hand-written
  log q; MSE and PSNR recomputed."""
  config, rep = run["config"], run["report"]["sections"]["reconstruction"]
  run_config, params, _ = inference.restore(run["workdir"], given=config)
  comp = inference.components(run_config)
  den, enc, sched = comp.image_model, comp.encoder, comp.schedule
  batch = next(iter(pipeline.eval_iterator(run_config, "test", 16, num_examples=6)))
  x = jnp.asarray(batch["image"])
  key = jax.random.fold_in(rngs.section_key(run_config.seed, "reconstruction"), 0)
  _, key_gen = jax.random.split(key)  # (z sample key: unused with the posterior mean)
  key_init, _ = jax.random.split(key_gen)
  z, _ = jax.jit(enc.apply)({"params": params["encoder"]}, x, jnp.zeros((x.shape[0],)))

  def log_q(xt, tb):
    mean, std = enc.apply({"params": params["encoder"]}, xt, tb)
    return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std))

  @jax.jit  # one compile instead of one per operation; the same arithmetic
  def guided_eps(xt, tb, s_t):
    eps = den.apply({"params": params["denoiser"]}, xt, tb, train=False)
    return eps - s_t * jax.grad(log_q)(xt, tb)

  def alpha_sigma(t):  # the cosine schedule, its log-SNR clipped at -20 (reached at t = 1)
    lam = max(_cosine_logsnr(t), -20.0) if t < 1 else -20.0
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))

  xt = jax.random.normal(key_init, x.shape, jnp.float32)
  for t, s in ((1.0, 0.5), (0.5, 0.0)):
    a_t, s_t = alpha_sigma(t)
    tb = jnp.full((x.shape[0],), t)
    eps = guided_eps(xt, tb, s_t)
    x0 = jnp.clip((xt - s_t * eps) / a_t, -1, 1)
    if s > 0:
      a_s, s_s = alpha_sigma(s)
      xt = a_s * x0 + s_s * (xt - a_t * x0) / s_t
  # The sampler returns the last x0 estimate.
  xt = x0
  err = (np.asarray(xt, np.float64) - batch["image"]) ** 2
  per_image = err[:6].mean(axis=(1, 2, 3))
  np.testing.assert_allclose(rep["mse"], per_image.mean(), rtol=2e-3)
  # PSNR for images in [-1, 1]: 10 log10(2^2 / MSE), averaged over images.
  np.testing.assert_allclose(rep["psnr_db"], np.mean(10 * np.log10(4.0 / per_image)), rtol=2e-3)


def test_sections_subset_and_bad_eval_fields(run):
  config = run["config"]
  cfg = load_config("disks", "test")
  cfg.eval.dci_mode = "trees"
  with pytest.raises(configlib.ConfigError, match="dci_mode"):
    configlib.validate(cfg)
  cfg = load_config("disks", "test")
  cfg.eval.sections = "elbo,latentz"
  with pytest.raises(configlib.ConfigError, match="latentz"):
    configlib.validate(cfg)
  cfg = load_config("disks", "test")
  cfg.eval.inception_weights = "/nonexistent/inception.npz"
  with pytest.raises(configlib.ConfigError, match="inception"):
    configlib.validate(cfg)
  # Only the chosen sections run; the others are listed as not selected.
  _set(config, "eval.sections", "latents")
  _set(config, "eval.step", 1)
  try:
    path = runner.run(config, run["workdir"])
  finally:
    _set(config, "eval.sections", "all")
    _set(config, "eval.step", -1)
  with open(path) as f:
    rep = json.load(f)
  assert path.endswith(os.path.join("eval", "1", "report.json")) and rep["step"] == 1
  assert "wall_time_s" in rep["sections"]["latents"]
  assert rep["sections"]["elbo"] == {"skipped": "not selected by config.eval.sections"}
