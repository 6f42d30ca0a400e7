import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import configlib
from sami_jax import schedules


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alpha_sigma_identity_and_monotone_logsnr(kind):
  s = schedules.Schedule(kind=kind)
  t = jnp.linspace(0.0, 1.0, 1001)
  alpha, sigma = s.alpha_sigma(t)
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, atol=1e-6)
  lam = np.asarray(s.logsnr(t))
  assert np.all(np.diff(lam) <= 1e-6), "log-SNR must decrease with t"
  assert lam[0] > 5 and lam[-1] < -5


def test_cosine_matches_nichol_dhariwal_alpha_bar():
  # alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t + s)/(1 + s)) pi/2), written out independently.
  s = 0.008
  t = np.linspace(0.05, 0.95, 19)
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  alpha_bar = f(t) / f(0.0)
  sched = schedules.Schedule(kind="cosine", cosine_s=s)
  np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, alpha_bar, rtol=1e-4)


def test_linear_matches_discrete_ddpm_product():
  # Discrete DDPM: alpha_bar_i = prod_{j<=i} (1 - beta_j), betas linear in [1e-4, 0.02], T = 1000.
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alpha_bar = np.cumprod(1 - betas)
  sched = schedules.Schedule(kind="linear")
  i = np.array([99, 299, 499, 799])
  t = (i + 1) / 1000.0
  # The continuous schedule is the T -> infinity limit: agreement to ~1% in alpha_bar.
  np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, alpha_bar[i], rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_elbo_weight_matches_numerical_derivative(kind):
  s = schedules.Schedule(kind=kind)
  t = np.linspace(0.05, 0.95, 10)
  h = 1e-3
  lam = lambda u: np.asarray(s.logsnr(jnp.asarray(u, jnp.float32)), np.float64)
  numeric = -0.5 * (lam(t + h) - lam(t - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(s.elbo_weight(t)), numeric, rtol=2e-2)
  assert np.all(np.asarray(s.elbo_weight(t)) > 0)


def test_time_sampling_modes():
  rng = jax.random.PRNGKey(0)
  n = 4096
  uni = np.asarray(schedules.Schedule(time_sampling="uniform").sample_t(rng, n))
  assert uni.min() > 0 and uni.max() <= 1 and abs(uni.mean() - 0.5) < 0.02
  anti = np.sort(np.asarray(schedules.Schedule(time_sampling="antithetic").sample_t(rng, 8)))
  # Stratified: exactly one sample in each interval [i/8, (i+1)/8).
  np.testing.assert_array_equal(np.floor(anti * 8), np.arange(8))
  high = np.asarray(schedules.Schedule(time_sampling="high_noise",
                                       high_noise_power=0.5).sample_t(rng, n))
  # t = sqrt(u): P(t > 0.5) = 0.75 instead of 0.5.
  assert abs(np.mean(high > 0.5) - 0.75) < 0.03
  disc = np.asarray(schedules.Schedule(num_timesteps=10).sample_t(rng, n))
  np.testing.assert_allclose(disc * 10, np.round(disc * 10), atol=1e-5)
  assert disc.min() >= 0.1 - 1e-6


def test_from_config_reads_diffusion_fields():
  c = configlib.default_config()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 7
  s = schedules.from_config(c)
  assert s.kind == "linear" and s.num_timesteps == 7
