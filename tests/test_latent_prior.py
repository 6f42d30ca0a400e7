"""Tests for the DiffAE-style latent prior (sami_jax/latent_prior.py).

The reference values are the known parameters of the synthetic distributions the prior is fitted
to, never values computed by the code under test. The two fitting tests take a few seconds each
on CPU (small MLP, a few thousand scanned steps).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import configlib
from sami_jax import latent_prior


def _config(num_steps: int, width: int = 64, depth: int = 2, sampling_steps: int = 50):
  c = configlib.default_config()
  c.latent_prior.width = width
  c.latent_prior.depth = depth
  c.latent_prior.num_steps = num_steps
  c.latent_prior.batch_size = 256
  c.latent_prior.lr = 1e-3
  c.latent_prior.sampling_steps = sampling_steps
  return c


@pytest.fixture(scope="module")
def tiny_fit():
  """A barely trained prior on 3-D latents (for I/O tests; quality does not matter)."""
  c = _config(num_steps=20, width=16, depth=1, sampling_steps=5)
  rs = np.random.RandomState(0)
  latents = rs.randn(64, 3) * np.array([1.0, 2.0, 0.5]) + np.array([0.0, 1.0, -2.0])
  return c, latent_prior.fit(c, latents, jax.random.PRNGKey(0))


def test_denoiser_shapes():
  model = latent_prior.LatentDenoiser(latent_dim=5, width=32, depth=3)
  z = jnp.ones((7, 5))
  t = jnp.linspace(0.1, 0.9, 7)
  params = model.init(jax.random.PRNGKey(0), z, t)["params"]
  eps = model.apply({"params": params}, z, t)
  assert eps.shape == (7, 5) and eps.dtype == jnp.float32
  with pytest.raises(ValueError, match="shape"):
    model.apply({"params": params}, jnp.ones((7, 4)), t)


def test_fits_correlated_gaussian():
  # Known target: mean [3, -1], stds [2, 0.5], correlation 0.8 (different scales per dimension,
  # so the de-standardisation is exercised). A prior that returned the standardised N(0, I)
  # would get correlation 0; one that skipped the de-standardisation would get mean 0 and std 1.
  mu = np.array([3.0, -1.0])
  sd = np.array([2.0, 0.5])
  rho = 0.8
  cov = np.array([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]])
  rs = np.random.RandomState(0)
  latents = rs.multivariate_normal(mu, cov, size=4000)

  c = _config(num_steps=2500)
  prior = latent_prior.fit(c, latents, jax.random.PRNGKey(0))
  assert np.isfinite(prior.final_loss) and prior.final_loss < 1.0
  z = np.asarray(latent_prior.sample(c, prior, 2000, jax.random.PRNGKey(1)))
  assert z.shape == (2000, 2)
  assert np.all(np.isfinite(z))

  # Mean within 0.15 standard deviations of each dimension (0.3 and 0.075).
  np.testing.assert_array_less(np.abs(z.mean(axis=0) - mu), 0.15 * sd)
  # Stds within 12% (the broken cases are off by 50% or 100%).
  np.testing.assert_array_less(np.abs(z.std(axis=0) / sd - 1.0), 0.12)
  # Correlation 0.8 +- 0.1 (the standardised-Gaussian failure gives 0).
  assert abs(np.corrcoef(z.T)[0, 1] - rho) < 0.1
  # Covariance entries within 15% of the largest variance's scale per entry.
  np.testing.assert_array_less(np.abs(np.cov(z.T) - cov), 0.15 * np.outer(sd, sd))


def test_fits_bimodal_mixture():
  # Two modes at -3 and +3 with std 0.3, equal weights. A Gaussian fit (N(0, 3.015^2)) puts only
  # ~32% of its mass within 1.0 of either mode, so it fails the first check.
  rs = np.random.RandomState(1)
  modes = rs.choice([-3.0, 3.0], size=4000)
  latents = (modes + 0.3 * rs.randn(4000))[:, None]

  c = _config(num_steps=2000)
  prior = latent_prior.fit(c, latents, jax.random.PRNGKey(2))
  z = np.asarray(latent_prior.sample(c, prior, 2000, jax.random.PRNGKey(3)))[:, 0]
  assert np.all(np.isfinite(z))
  near = np.minimum(np.abs(z - 3.0), np.abs(z + 3.0)) < 1.0
  assert near.mean() > 0.8
  frac_pos = np.mean(z > 0)
  assert 0.3 < frac_pos < 0.7
  # Each mode is sharp (true std 0.3), not smeared over the gap.
  assert np.std(z[z > 0]) < 0.5 and np.std(z[z < 0]) < 0.5


def test_save_load_round_trip(tiny_fit, tmp_path):
  c, prior = tiny_fit
  path = str(tmp_path / "latent_prior" / "prior.msgpack")
  latent_prior.save(path, prior)
  assert os.path.exists(path) and not os.path.exists(path + ".tmp")
  loaded = latent_prior.load(path, 3, c)
  np.testing.assert_array_equal(loaded.mean, prior.mean)
  np.testing.assert_array_equal(loaded.std, prior.std)
  assert loaded.final_loss == prior.final_loss
  rng = jax.random.PRNGKey(5)
  a = np.asarray(latent_prior.sample(c, prior, 16, rng))
  b = np.asarray(latent_prior.sample(c, loaded, 16, rng))
  assert a.shape == (16, 3)
  np.testing.assert_array_equal(a, b)
  # A different key gives different latents (the comparison above is not vacuous).
  other = np.asarray(latent_prior.sample(c, loaded, 16, jax.random.PRNGKey(6)))
  assert not np.allclose(a, other)


def test_load_truncated_or_garbage_file_raises(tiny_fit, tmp_path):
  c, prior = tiny_fit
  path = str(tmp_path / "prior.msgpack")
  latent_prior.save(path, prior)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match="refit"):
    latent_prior.load(path, 3, c)
  with open(path, "wb") as f:
    f.write(b"\x00not a msgpack file at all")
  with pytest.raises(ValueError, match="damaged"):
    latent_prior.load(path, 3, c)


def test_load_other_config_raises(tiny_fit, tmp_path):
  c, prior = tiny_fit
  path = str(tmp_path / "prior.msgpack")
  latent_prior.save(path, prior)
  wider = _config(num_steps=20, width=32, depth=1, sampling_steps=5)
  with pytest.raises(ValueError, match="another config.*refit"):
    latent_prior.load(path, 3, wider)
  deeper = _config(num_steps=20, width=16, depth=2, sampling_steps=5)
  with pytest.raises(ValueError, match="another config"):
    latent_prior.load(path, 3, deeper)
  with pytest.raises(ValueError, match="latent_dim=4"):
    latent_prior.load(path, 4, c)


def test_load_missing_file_raises(tmp_path):
  path = str(tmp_path / "nowhere" / "prior.msgpack")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    latent_prior.load(path, 3, _config(num_steps=20))


@pytest.mark.parametrize("bad", [
    np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]),
    np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]]),
    np.arange(10.0),             # 1-D
    np.zeros((1, 3)),            # a single row
    np.zeros((4, 2, 2)),         # 3-D
])
def test_fit_rejects_bad_latents(bad):
  with pytest.raises(ValueError, match="latent prior"):
    latent_prior.fit(_config(num_steps=5), bad, jax.random.PRNGKey(0))
