"""--mode=eval: the ELBO pieces against hand-derived closed forms, and the report of a tiny run."""

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

# ------------------------------------------------------------------------------ ELBO pieces


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("logsnr_1", [-20.0, -3.0, 0.5])
def test_prior_term_is_the_gaussian_kl(logsnr_1):
  # KL(N(a x, s^2) || N(0, 1)) = 1/2 (a^2 x^2 + s^2 - 1 - log s^2) per pixel, a^2 = sigmoid(l),
  # s^2 = sigmoid(-l). For x = 0 only the variance part remains.
  shape = (2, 4, 4, 3)
  a2, s2 = _sigmoid(logsnr_1), _sigmoid(-logsnr_1)
  d = 4 * 4 * 3
  zero = elbo.prior_nats(jnp.zeros(shape), logsnr_1)
  np.testing.assert_allclose(zero, [0.5 * d * (s2 - 1 - math.log(s2))] * 2, rtol=1e-4, atol=1e-12)
  x = np.full(shape, 0.6, np.float32)
  x[1] = -1.0
  got = elbo.prior_nats(jnp.asarray(x), logsnr_1)
  want = [0.5 * d * (a2 * c ** 2 + s2 - 1 - math.log(s2)) for c in (0.6, -1.0)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)


def _bin_mass_nll(values, scale):
  """-sum log(mass of N(v, scale^2) on v's 8-bit bin), from math.erf: hand-derived reference."""
  h = 1.0 / 255.0
  total = 0.0
  for v in np.ravel(values):
    central = math.erf(h / (scale * math.sqrt(2.0)))  # P(|N(0, s^2)| < h)
    if v <= -1.0 + 1e-6 or v >= 1.0 - 1e-6:  # end bins are open on one side
      mass = 0.5 * (1.0 + central)
    else:
      mass = central
    total -= math.log(mass)
  return total


@pytest.mark.parametrize("logsnr_0", [10.0, 12.0, 7.0])
def test_reconstruction_term_for_a_perfect_prediction_is_minus_log_bin_mass(logsnr_0):
  # 8-bit values, including both end bins.
  k = np.array([[0, 1, 128, 255], [17, 254, 255, 0]])
  x = (k * 2.0 / 255.0 - 1.0).astype(np.float32).reshape(2, 2, 2, 1)
  scale = math.exp(-logsnr_0 / 2)
  got = elbo.discretized_gaussian_nll(jnp.asarray(x), jnp.asarray(x), -logsnr_0 / 2)
  want = [_bin_mass_nll(x[i], scale) for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # With eps = 0 the sampled term is the same (x_0 / alpha_0 is x exactly).
  got0 = elbo.reconstruction_nats(jnp.asarray(x), jnp.zeros_like(x), logsnr_0)
  np.testing.assert_allclose(got0, want, rtol=1e-4)


def test_discretized_likelihood_is_a_distribution_over_the_256_values():
  values = (np.arange(256) * 2.0 / 255.0 - 1.0).astype(np.float32)
  x = values.reshape(256, 1, 1, 1)
  for mean, log_scale in ((0.3, math.log(0.02)), (-0.99, math.log(0.005)), (2.5, math.log(0.5))):
    nll = elbo.discretized_gaussian_nll(jnp.asarray(x), jnp.full_like(x, mean), log_scale)
    np.testing.assert_allclose(np.sum(np.exp(-np.asarray(nll, np.float64))), 1.0, rtol=2e-4)


class _ZeroDenoiser(nn.Module):
  """eps_hat = 0: the diffusion term is then w(t) ||eps||^2, with a closed-form expectation."""

  @nn.compact
  def __call__(self, x, t, train=False):
    del t, train
    return jnp.zeros_like(x) * self.param("unused", nn.initializers.zeros, ())


def _cosine_logsnr(t, s=0.008):
  """Hand-written cosine-schedule log-SNR (Nichol & Dhariwal), float64."""
  ab = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
  return math.log(ab / (1 - ab))


@pytest.mark.parametrize("t", [0.05, 0.3, 0.9])
def test_diffusion_term_of_a_zero_denoiser_is_d_times_the_vdm_weight(t):
  # eps_hat = 0 gives w(t) ||eps||^2 summed over the D pixels, whose mean over eps is D w(t), with
  # w(t) = -1/2 dlambda/dt (here by central differences of the hand-written schedule).
  sched = schedules.Schedule(kind="cosine")
  fn = jax.jit(elbo.make_elbo_fn(_ZeroDenoiser(), None, sched, with_latent=False))
  b, shape = 2048, (4, 4, 2)
  x0 = jnp.zeros((b,) + shape)
  terms = fn({"denoiser": {"unused": jnp.zeros(())}}, x0, jnp.full((b,), t),
             jax.random.PRNGKey(0))
  h = 1e-5
  w = -0.5 * (_cosine_logsnr(t + h) - _cosine_logsnr(t - h)) / (2 * h)
  # ||eps||^2 / D over 2048 * 32 normals has a relative std of 0.4%.
  np.testing.assert_allclose(float(jnp.mean(terms["diffusion"])), 32 * w, rtol=0.02)
  np.testing.assert_allclose(terms["latent_kl"], 0.0)
  np.testing.assert_allclose(terms["total"], terms["diffusion"] + terms["prior"]
                             + terms["reconstruction"], rtol=1e-6)
  assert np.all(np.asarray(terms["reconstruction"]) >= 0)


def test_bits_per_dim():
  np.testing.assert_allclose(elbo.bits_per_dim(jnp.asarray(64 * math.log(2.0)), 64), 1.0)


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
                        "sap_per_factor", "dci_mode", "dci_disentanglement", "dci_completeness",
                        "dci_informativeness", "factorvae", "factorvae_train_accuracy",
                        "factorvae_active_dims", "correlation", "correlation_figure",
                        "num_train", "num_test"],
    "elbo": ["diffusion_bpd", "prior_bpd", "reconstruction_bpd", "latent_kl_bpd", "total_bpd",
             "diffusion_no_guidance_bpd", "total_no_guidance_bpd", "total_bpd_stderr",
             "total_nats_per_example", "num_examples", "t_samples", "num_dims", "gamma",
             "logsnr_0", "logsnr_1", "weighting"],
    "guidance_ablation": ["num_examples", "bucket_edges", "bucket_centers", "mse_gamma0",
                          "mse_gamma1", "ratio_gamma1_to_gamma0", "mean_mse_gamma0",
                          "mean_mse_gamma1", "latent", "figure"],
    "reconstruction": ["num_images", "mse", "psnr_db", "sampler", "steps", "eta",
                       "guidance_scale", "use_mean", "figure"],
    "straightness": ["latent_curvature", "latent_curvature_std", "pixel_curvature",
                     "pixel_curvature_std", "latent_cosine", "pixel_cosine",
                     "curvature_reduction", "num_sequences", "num_frames", "dataset"],
    "grids": ["prior_samples", "traversals", "traversal_dims", "traversal_values",
              "interpolations"],
}
FIGURES = ["correlation.png", "guidance_ablation.png", "reconstructions.png",
           "prior_samples.png", "traversals.png", "interpolations.png"]


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
  assert e["num_examples"] == 16 and e["num_dims"] == 64
  assert e["diffusion_bpd"] > 0 and e["prior_bpd"] >= 0 and e["reconstruction_bpd"] >= 0
  assert s["guidance_ablation"]["num_examples"] == 24
  assert s["straightness"]["num_sequences"] == 3 and s["straightness"]["num_frames"] == 16
  assert 0 <= s["straightness"]["pixel_curvature"] <= 180
  assert s["reconstruction"]["num_images"] == 6


def test_guidance_ablation_matches_an_independent_computation(run):
  """Same (t, eps) per bucket; MSEs recomputed here from the models directly."""
  config, rep = run["config"], run["report"]["sections"]["guidance_ablation"]
  run_config, params, _ = inference.restore(run["workdir"], given=config)
  comp = inference.components(run_config)
  den, enc, sched = comp.image_model, comp.encoder, comp.schedule
  key = rngs.section_key(run_config.seed, "guidance_ablation")
  buckets, bs, n = 4, 16, 24

  def enc_apply(x):
    return enc.apply({"params": params["encoder"]}, x, None)

  def log_q(x, z):  # log N(z; mean(x), std(x)^2) summed over the batch, written out here
    mean, std = enc_apply(x)
    return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi))

  @jax.jit
  def per_example_mse(x0, t, eps):
    z, _ = enc_apply(x0)
    a = jnp.sqrt(jax.nn.sigmoid(sched.logsnr(t)))[:, None, None, None]
    sig = jnp.sqrt(jax.nn.sigmoid(-sched.logsnr(t)))[:, None, None, None]
    x_t = a * x0 + sig * eps
    eps_theta = den.apply({"params": params["denoiser"]}, x_t, t, train=False)
    guided = eps_theta - sig * jax.grad(log_q)(x_t, z)
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
  np.testing.assert_allclose(rep["mse_gamma0"], sums0 / n, rtol=1e-4)
  np.testing.assert_allclose(rep["mse_gamma1"], sums1 / n, rtol=1e-4)
  np.testing.assert_allclose(rep["mean_mse_gamma0"], np.mean(sums0 / n), rtol=1e-4)


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
  z, _ = enc.apply({"params": params["encoder"]}, x, None)

  def log_q(xt):
    mean, std = enc.apply({"params": params["encoder"]}, xt, None)
    return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std))

  def alpha_sigma(t):  # the cosine schedule, its log-SNR clipped at -20 (reached at t = 1)
    lam = max(_cosine_logsnr(t), -20.0) if t < 1 else -20.0
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))

  xt = jax.random.normal(key_init, x.shape, jnp.float32)
  for t, s in ((1.0, 0.5), (0.5, 0.0)):
    a_t, s_t = alpha_sigma(t)
    tb = jnp.full((x.shape[0],), t)
    eps = den.apply({"params": params["denoiser"]}, xt, tb, train=False) - s_t * jax.grad(log_q)(xt)
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
