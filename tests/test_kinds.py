"""The model kinds (sami, sami_frozen, ddpm, beta_vae, diffae): each trains and evaluates through
the shared code, the comparison command writes its table and figure, and the latent prior is
used by --mode=sample."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sami_jax import compare
from sami_jax import configlib
from sami_jax import inference
from sami_jax import kinds
from sami_jax import models as models_lib
from sami_jax import objective
from sami_jax import samplers
from sami_jax import train_state
from tests.test_config import ROOT, load_config


def _tiny(tmp_dir, kind="sami"):
  c = load_config("disks", "test")
  c.model.kind = kind
  c.data.data_dir = str(tmp_dir / "tfds")
  c.train.num_steps = 2
  c.train.write_grids = False
  c.train.probe_at_end = False
  c.eval.num_video = 4
  c.eval.factorvae_votes = 64
  c.eval.num_recon = 8
  # The bound and the denoising ablation on a few examples: the test checks that every kind gets
  # them (their estimators have their own tests in test_elbo.py and test_report.py).
  c.eval.num_elbo_examples, c.eval.elbo_t_samples = 16, 2
  c.eval.num_ablation_examples, c.eval.ablation_buckets = 16, 4
  c.model.decoder.ch, c.model.decoder.ch_mult, c.model.decoder.num_groups = 8, (1,), 4
  return c


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  base = tmp_path_factory.mktemp("compare")
  config = _tiny(base)
  workdir = str(base / "wd")
  out = compare.compare(config, workdir)
  return {"config": config, "workdir": workdir, "out": out}


def test_every_kind_trains_and_is_evaluated(comparison):
  out, wd = comparison["out"], comparison["workdir"]
  assert out["kinds"] == list(compare.KINDS)
  for kind in compare.KINDS:
    with open(os.path.join(wd, kind, "summary.json")) as f:
      assert json.load(f)["step"] == 2
    with open(os.path.join(wd, kind, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert rows and all(math.isfinite(r["loss"]) for r in rows), kind
    with open(out["reports"][kind]) as f:
      rep = json.load(f)
    assert rep["model_kind"] == kind
    secs = rep["sections"]
    if kind == "ddpm":
      assert "skipped" in secs["disentanglement"]
      continue
    assert len(secs["disentanglement"]["knn_r2"]) == 3, kind
    assert secs["reconstruction"]["mse"] > 0.0, kind
    assert math.isfinite(secs["straightness"]["latent_curvature"]), kind
    assert os.path.exists(os.path.join(os.path.dirname(out["reports"][kind]), "traversals.png"))
    # Only the kinds with a posterior report KL per latent.
    assert ("skipped" in secs["latents"]) == (kind == "diffae"), kind


def test_each_kind_logs_only_what_it_has(comparison):
  wd = comparison["workdir"]
  rows = {}
  for kind in compare.KINDS:
    with open(os.path.join(wd, kind, "metrics.jsonl")) as f:
      rows[kind] = json.loads(f.readlines()[-1])
  guided = {"diffusion", "mse_uncond", "kl", "guidance_norm", "posterior_std", "beta"}
  for kind in ("sami", "sami_frozen"):
    assert guided <= set(rows[kind]), kind
  assert not {"kl", "posterior_std", "guidance_norm", "mse_uncond", "beta"} & set(rows["ddpm"])
  assert not {"kl", "posterior_std", "guidance_norm", "mse_uncond", "beta"} & set(rows["diffae"])
  # The beta-VAE logs the KL weight its loss uses (objective.vae_beta), not SAMI's schedule.
  assert rows["beta_vae"]["beta"] == comparison["config"].objective.vae_beta
  assert {"recon_mse", "kl", "posterior_std"} <= set(rows["beta_vae"])
  assert "diffusion" not in rows["beta_vae"]


def test_comparison_table_and_figure(comparison):
  out, wd = comparison["out"], comparison["workdir"]
  header, rows = out["header"], out["rows"]
  assert [r[0] for r in rows] == ["ddpm", "sami", "sami_frozen", "beta_vae", "diffae"]
  for name in ("R2 kNN x", "R2 linear theta (polar)", "aligned", "MIG", "MIG (polar)", "DCI D",
               "DCI D (polar)", "SAP", "bound (bits/dim)", "recon MSE", "bg std recon",
               "bg std samples", "latent curvature (deg)", "train wall (s)"):
    assert name in header
  by_kind = {row[0]: dict(zip(header, row)) for row in rows}
  for row in rows:
    assert len(row) == len(header)
  for kind in ("sami", "sami_frozen", "beta_vae", "diffae"):
    r2 = by_kind[kind]["R2 kNN x"]
    assert isinstance(r2, float) and r2 <= 1.0
    assert by_kind[kind]["aligned"] in ("cartesian", "polar", "undecided")
  # What a kind does not have is n/a, not a number: ddpm has no latent, diffae no bound.
  assert by_kind["ddpm"]["R2 kNN x"] is None and by_kind["ddpm"]["MIG"] is None
  assert by_kind["diffae"]["bound (bits/dim)"] is None
  for kind in ("ddpm", "sami", "sami_frozen", "beta_vae"):
    assert by_kind[kind]["bound (bits/dim)"] > 0, kind
  assert by_kind["ddpm"]["bg std samples"] >= 0 and by_kind["ddpm"]["bg std recon"] is None
  frozen = by_kind["sami_frozen"]["train wall (s)"]
  assert "ddpm" in frozen  # the frozen run's cost includes its pre-training
  with open(os.path.join(wd, "comparison.md")) as f:
    md = f.read()
  assert "| sami_frozen |" in md and "Hardware:" in md
  with open(os.path.join(wd, "comparison.json")) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(rows))
  fig = Image.open(os.path.join(wd, "traversals.png"))
  panel = Image.open(os.path.join(os.path.dirname(out["reports"]["sami"]), "traversals.png"))
  scale = max(1, 256 // panel.width)
  assert fig.width >= 4 * panel.width * scale  # four latent models side by side


def test_frozen_denoiser_is_bitwise_the_pretrained_one(comparison):
  from sami_jax import checkpoint as ckpt_lib
  wd = comparison["workdir"]
  _, ddpm_params, _ = inference.restore(os.path.join(wd, "ddpm"))
  cfg = compare.kind_config(comparison["config"], "sami_frozen", wd)
  ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "sami_frozen", "checkpoints"), keep_last=10)
  state, _, _, step = ckpt.restore(train_state.abstract_state(cfg))
  ckpt.close()
  assert step == 2
  for tree in (state["params"], state["ema_params"]):
    for a, b in zip(jax.tree.leaves(ddpm_params["denoiser"]), jax.tree.leaves(tree["denoiser"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... while its encoder did train (it is not the init any more).
  init = models_lib.initialize(cfg, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0))
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(init["encoder"]),
                           jax.tree.leaves(state["params"]["encoder"]))]
  assert max(diffs) > 0.0


def test_compare_is_resumable(comparison, caplog):
  """A second call retrains nothing and re-evaluates nothing (and gives the same table)."""
  before = {k: os.path.getmtime(os.path.join(comparison["workdir"], k, "summary.json"))
            for k in compare.KINDS}
  out = compare.compare(comparison["config"], comparison["workdir"], ["sami", "beta_vae"])
  assert out["rows"] == [r for r in comparison["out"]["rows"] if r[0] in ("sami", "beta_vae")]
  for k in compare.KINDS:
    assert os.path.getmtime(os.path.join(comparison["workdir"], k, "summary.json")) == before[k]


def test_compare_rejects_bad_kinds(tmp_path):
  config = _tiny(tmp_path)
  with pytest.raises(ValueError, match="unknown kinds"):
    compare.compare(config, str(tmp_path / "wd"), ["sami", "vae"])
  with pytest.raises(ValueError, match="add ddpm"):
    compare.compare(config, str(tmp_path / "wd"), ["sami_frozen"])


# ----------------------------------------------------------------------------- the objectives


def _models(kind):
  c = load_config("disks", "test")
  c.model.kind = kind
  c.model.decoder.ch, c.model.decoder.ch_mult, c.model.decoder.num_groups = 8, (1,), 4
  den, enc = models_lib.build_models(c)
  params = models_lib.initialize(c, jax.random.PRNGKey(0))
  return c, den, enc, params


def test_beta_vae_loss_matches_its_formula():
  c, dec, enc, params = _models("beta_vae")
  c.model.decoder.obs_std = 0.5
  c.objective.vae_beta = 3.0
  # Make the decoder non-trivial (its output conv is not zero-initialised, but be explicit).
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
  rng = jax.random.PRNGKey(2)
  # Jitted: one compile instead of one per operation (the reference below is numpy).
  loss_fn = jax.jit(kinds.make_loss_fn(c, dec, enc))
  loss, terms = loss_fn(params, {"image": x}, rng, 0)
  mean, std = jax.jit(enc.apply)({"params": params["encoder"]}, x)
  z = mean + std * jax.random.normal(rng, mean.shape)
  rec = np.asarray(jax.jit(dec.apply)({"params": params["decoder"]}, z), np.float64)
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  sq = np.sum((np.asarray(x, np.float64) - rec) ** 2, axis=(1, 2, 3))
  kl = 0.5 * np.sum(mean ** 2 + std ** 2 - 1 - np.log(std ** 2), axis=1)
  want = np.mean((sq / (2 * 0.25) + 3.0 * kl) / 64)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(terms["recon_mse"]), sq / 64, rtol=1e-5)
  # The gradient reaches both networks.
  g = jax.jit(jax.grad(lambda p: loss_fn(p, {"image": x}, rng, 0)[0]))(params)
  for name in ("decoder", "encoder"):
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g[name])) > 0.0, name


def test_diffae_conditions_the_unet_on_the_encoder_mean():
  c, den, enc, params = _models("diffae")
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
  fn = jax.jit(kinds.make_loss_fn(c, den, enc))
  # Move the zero-initialised output layers so that z can matter at all.
  params = jax.tree.map(lambda a: a + 0.05 * jnp.ones_like(a), params)
  _, terms = fn(params, {"image": x}, jax.random.PRNGKey(2), 0)
  # A deterministic encoder: no KL, no posterior std, nothing of the guidance is logged.
  assert set(terms) == {"diffusion", "t"}
  g = jax.jit(jax.grad(lambda p: fn(p, {"image": x}, jax.random.PRNGKey(2), 0)[0]))(params)
  enc_grad = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g["encoder"]))
  assert enc_grad > 0.0  # the encoder learns through the U-Net's adaptive group norm
  # The std head gets no gradient: only the mean is used.
  assert float(jnp.abs(g["encoder"]["std_head"]["kernel"]).max()) == 0.0
  t = jnp.full((4,), 0.5)
  apply = jax.jit(lambda cond: den.apply({"params": params["denoiser"]}, x, t, train=False,
                                         cond=cond))
  e1, e2 = apply(jnp.zeros((4, 3))), apply(jnp.ones((4, 3)))
  assert float(jnp.abs(e1 - e2).max()) > 1e-4


def test_beta_vae_generate_is_the_clipped_decoder_mean():
  c, dec, enc, params = _models("beta_vae")
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 3)) * 3.0
  params = jax.tree.map(lambda a: a * 3.0, params)  # outputs beyond [-1, 1] somewhere
  raw = jax.jit(dec.apply)({"params": params["decoder"]}, z)
  got = kinds.decode(kinds.get("beta_vae"), dec, enc, params, z, jax.random.PRNGKey(1),
                     schedule=inference.components(c).schedule, image_shape=(8, 8, 1))
  np.testing.assert_allclose(np.asarray(got), np.clip(np.asarray(raw), -1, 1), atol=1e-5)
  assert float(jnp.abs(got).max()) == 1.0
  assert float(jnp.abs(raw).max()) > 1.0


def test_unknown_kind_and_bad_decoder_fail_validation():
  c = load_config("disks", "test")
  c.model.kind = "vae"
  with pytest.raises(configlib.ConfigError, match="model.kind"):
    configlib.validate(c)
  c.model.kind = "beta_vae"
  c.model.decoder.ch_mult = (1, 2, 2, 2, 2)
  with pytest.raises(configlib.ConfigError, match="model.decoder.ch_mult"):
    configlib.validate(c)
  c.model.decoder.ch_mult = (1,)
  c.model.decoder.obs_std = 0.0
  with pytest.raises(configlib.ConfigError, match="model.decoder.obs_std"):
    configlib.validate(c)


# ----------------------------------------------------------------------------- latent prior


def test_sample_mode_fits_saves_and_reuses_the_latent_prior(comparison, tmp_path):
  wd = os.path.join(comparison["workdir"], "diffae")
  args = [sys.executable, "-m", "sami_jax.main", "--config=configs/disks.py:test",
          f"--workdir={wd}", f"--config.data.data_dir={comparison['config'].data.data_dir}",
          "--mode=sample", "--config.sampling.prior=latent_diffusion",
          "--config.latent_prior.num_steps=200", "--config.latent_prior.num_examples=128"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Fitted the latent prior on 128 training latents" in first.stderr
  path = inference.latent_prior_path(wd, 2)
  assert os.path.exists(path)
  png = os.path.join(wd, "samples", "latent_prior_samples_0000002.png")
  assert Image.open(png).size[0] > 0
  second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Using the latent prior in" in second.stderr and "Fitted" not in second.stderr
  # A damaged prior file: one line naming the fix, no traceback.
  with open(path, "r+b") as f:
    f.truncate(20)
  third = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert third.returncode == 2
  assert "Error:" in third.stderr and "refit" in third.stderr
  assert "Traceback" not in third.stderr


def test_compare_command_line_reports_a_bad_kind_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sami_jax.compare", "--config=configs/disks.py:test",
       f"--workdir={tmp_path / 'wd'}", "--kinds=sami,vae"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Error: --kinds names unknown kinds ['vae']" in proc.stderr
  assert "Traceback" not in proc.stderr
