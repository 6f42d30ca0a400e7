import math

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
  c.diffusion.guidance_weighting, c.diffusion.guidance_power = "sigma_power", 2.0
  c.diffusion.time_sampling, c.diffusion.mixture_high_noise = "mixture", 0.2
  s = schedules.from_config(c)
  assert s.kind == "linear" and s.num_timesteps == 7
  assert (s.guidance_weighting, s.guidance_power) == ("sigma_power", 2.0)
  assert (s.time_sampling, s.mixture_high_noise) == ("mixture", 0.2)
  # The encoder's own draw (the split objective): the same schedule, another time draw.
  assert schedules.encoder_draw(c, s) is None  # "shared" by default
  c.objective.encoder_time_sampling, c.objective.encoder_high_noise_power = "high_noise", 0.4
  e = schedules.encoder_draw(c, s)
  assert (e.time_sampling, e.high_noise_power, e.kind, e.guidance_power) == (
      "high_noise", 0.4, "linear", 2.0)


# ------------------------------------------------------------------ log-SNR <-> t, against float64

COSINE_S = 0.008
COSINE_CAP = np.log((1 - 2.0 ** -23) / 2.0 ** -23)  # alpha_bar <= float32(1 - 1e-7) = 1 - 2^-23


def _ref_logsnr(kind, t):
  """lambda(t) in float64 from the textbook definitions, written out here (unclipped)."""
  t = np.asarray(t, np.float64)
  if kind == "cosine":
    f = lambda u: np.cos((u + COSINE_S) / (1 + COSINE_S) * np.pi / 2) ** 2
    alpha_bar = f(t) / f(0.0)
    with np.errstate(divide="ignore"):
      return np.log(alpha_bar) - np.log1p(-alpha_bar)
  # Linear betas, continuous: -log alpha_bar = 0.1 t + (20 - 0.1) t^2 / 2.
  with np.errstate(divide="ignore"):
    return -np.log(np.expm1(0.1 * t + 0.5 * (20.0 - 0.1) * t ** 2))


def _ref_t(kind, lam):
  """The inverse of _ref_logsnr in float64 (arccos of the cosine; the quadratic formula)."""
  lam = np.asarray(lam, np.float64)
  alpha_bar = 1.0 / (1.0 + np.exp(-lam))
  if kind == "cosine":
    u0 = COSINE_S / (1 + COSINE_S) * np.pi / 2
    return np.arccos(np.sqrt(alpha_bar) * np.cos(u0)) * 2 / np.pi * (1 + COSINE_S) - COSINE_S
  integral = -np.log(alpha_bar)
  return (-0.1 + np.sqrt(0.1 ** 2 + 2 * (20.0 - 0.1) * integral)) / (20.0 - 0.1)


def _t_grid():
  """Times in [0, 1], dense near both ends, as float32."""
  ends = np.geomspace(1e-8, 1e-2, 120)
  return np.unique(np.concatenate([[0.0, 1.0], ends, np.linspace(0, 1, 801), 1 - ends])
                   ).astype(np.float32)


def _range(kind):
  """[lambda(t=1), lambda(t=0)], derived by hand: cosine -20 (logsnr_min) to its cap; linear its
  own value at t = 1 up to logsnr_max = 20."""
  if kind == "cosine":
    return -20.0, COSINE_CAP
  return float(_ref_logsnr("linear", 1.0)), 20.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_logsnr_matches_float64_closed_form_up_to_both_ends(kind):
  s = schedules.Schedule(kind=kind)
  t = _t_grid()
  lo, hi = _range(kind)
  want = np.clip(_ref_logsnr(kind, t), lo, hi)  # the float64 value at the same float32 t
  got = np.asarray(s.logsnr(t), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose([s.logsnr(0.0), s.logsnr(1.0)], [hi, lo], rtol=1e-6)
  # The VDM weight stays finite (0 where clipped) at the very ends.
  w = np.asarray(s.elbo_weight(jnp.array([0.0, 1e-9, 1.0 - 1e-7, 1.0])))
  assert np.all(np.isfinite(w)) and np.all(w >= 0), w


def _lam_grid(lo: float, hi: float) -> np.ndarray:
  """float32 lambdas over [lo, hi], dense near both ends."""
  return np.concatenate([np.linspace(lo, hi, 2001), hi - np.geomspace(1e-6, 1, 40),
                         lo + np.geomspace(1e-6, 1, 40)]).astype(np.float32)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_t_from_logsnr_matches_float64_inverse(kind):
  s = schedules.Schedule(kind=kind)
  lo, hi = _range(kind)
  lam = _lam_grid(lo, hi)
  want = _ref_t(kind, lam)
  got = np.asarray(s.t_from_logsnr(lam), np.float64)
  ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
  assert np.all(np.abs(got - want) <= 8 * ulp), np.max(np.abs(got - want) / ulp)
  # Outside the range: clipped into it.
  np.testing.assert_allclose(s.t_from_logsnr(jnp.array([lo - 5.0, hi + 5.0])),
                             s.t_from_logsnr(jnp.array([lo, hi])))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_t_to_logsnr_to_t_round_trip(kind):
  s = schedules.Schedule(kind=kind)
  lo, hi = _range(kind)
  t = _t_grid()
  lam = np.asarray(s.logsnr(t))
  back = np.asarray(s.t_from_logsnr(lam))
  inside = (lam > lo + 1e-4) & (lam < hi - 1e-4)
  assert inside.sum() > 900
  # lambda is rounded to float32 (relative 6e-8 of |lambda| <= 20); near t = 0, dt = t dlambda.
  tol = 4e-6 * t + 2 * np.spacing(t)
  err = np.abs(back - t)
  assert np.all(err[inside] <= tol[inside]), np.max(err[inside] / tol[inside])
  # Where logsnr is flat (clipped), the round trip lands on the same clipped value.
  np.testing.assert_allclose(s.logsnr(back)[~inside], lam[~inside], atol=2e-3)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_logsnr_to_t_to_logsnr_round_trip(kind):
  s = schedules.Schedule(kind=kind)
  lo, hi = _range(kind)
  lam = _lam_grid(lo, hi)
  t = np.asarray(s.t_from_logsnr(lam))
  back = np.asarray(s.logsnr(t), np.float64)
  # float32 t cannot do better than |dlambda/dt| * ulp(t) (near t = 1 that is ~4e-3: lambda moves
  # by 2 / (1 - t) per unit t); the derivative here is from the float64 reference.
  tt = t.astype(np.float64)
  h = 1e-4 * np.minimum(tt, 1 - tt) + 1e-12
  slope = np.abs(_ref_logsnr(kind, tt + h) - _ref_logsnr(kind, tt - h)) / (2 * h)
  tol = 2e-6 * (1 + np.abs(lam)) + 2 * slope * np.spacing(t)
  err = np.abs(back - lam)
  assert np.all(err <= tol), np.max(err / tol)


@pytest.mark.parametrize("sampling,power", [("uniform", 0.5), ("antithetic", 0.5),
                                            ("high_noise", 0.5), ("logsnr", 0.5),
                                            ("mixture", 0.3)])
@pytest.mark.parametrize("weighting", ["simple", "elbo"])
def test_importance_weighted_times_keep_the_uniform_objective(sampling, power, weighting):
  """E_q[weight f(t)] == int_0^1 w(t) f(t) dt for a smooth f, whatever q: the objective (the ELBO
  with the "elbo" weighting) is unchanged by the sampling. Reference: trapezoid quadrature in
  float64 of the hand-written cosine schedule's weight."""
  sched = schedules.Schedule(kind="cosine", time_sampling=sampling, high_noise_power=power,
                             importance_weighting=True)
  # Vanishes at both ends, so that every estimator here has a finite variance (with f(0) > 0,
  # the "elbo" weight ~ 1/t times high_noise's 1/q(t) has an infinite one).
  f = lambda t: np.exp(-3.0 * (t - 0.6) ** 2) * (1 - t) ** 2 * t
  t, w = sched.sample_times(jax.random.PRNGKey(0), 400_000, weighting)
  t, w = np.asarray(t, np.float64), np.asarray(w, np.float64)
  mc = np.mean(w * f(t))
  se = np.std(w * f(t)) / np.sqrt(len(t))

  def lam(tt):
    s = 0.008
    ab = np.cos((tt + s) / (1 + s) * np.pi / 2) ** 2 / math.cos(s / (1 + s) * np.pi / 2) ** 2
    return np.log(ab / (1 - ab))
  grid = np.linspace(1e-6, 1 - 1e-6, 2_000_001)
  if weighting == "elbo":
    weight = np.clip(-0.5 * np.gradient(lam(grid), grid), 0, None)
    # The schedule clips lambda to [-20, 15.94] (flat there: no weight).
    weight[(lam(grid) < -20) | (lam(grid) > math.log((1 - 2 ** -23) / 2 ** -23))] = 0
  else:
    weight = np.ones_like(grid)
  exact = np.trapezoid(weight * f(grid), grid)
  assert abs(mc - exact) < 4 * se + 0.003 * exact, (mc, exact, se)
  assert np.all(t >= 0) and np.all(t <= 1)


def test_logsnr_sampling_is_uniform_in_lambda_with_the_constant_elbo_weight():
  sched = schedules.Schedule(kind="cosine", time_sampling="logsnr", importance_weighting=True)
  lam1, lam0 = sched.logsnr_range()
  t, w = sched.sample_times(jax.random.PRNGKey(1), 100_000, "elbo")
  np.testing.assert_allclose(np.asarray(w), 0.5 * (lam0 - lam1), rtol=1e-6)
  lam = np.asarray(sched.logsnr(t), np.float64)
  # Uniform on [lam1, lam0]: each tenth of the range holds a tenth of the draws (binomial error).
  counts, _ = np.histogram(lam, bins=10, range=(lam1, lam0))
  np.testing.assert_allclose(counts / len(lam), 0.1, atol=4 * math.sqrt(0.09 / len(lam)))


@pytest.mark.parametrize("sampling", ["uniform", "antithetic", "high_noise", "logsnr", "mixture"])
@pytest.mark.parametrize("importance_weighting", [False, True])
def test_time_sampling_traces_inside_jit(sampling, importance_weighting):
  """The train step draws its times inside jax.jit: every scheme must trace there (the logsnr
  scheme's range once went through float() on a traced value) and give the eager draws."""
  sched = schedules.Schedule(kind="cosine", time_sampling=sampling,
                             importance_weighting=importance_weighting)
  key = jax.random.PRNGKey(3)
  t_jit, w_jit = jax.jit(lambda k: sched.sample_times(k, 64, "elbo"))(key)
  t, w = sched.sample_times(key, 64, "elbo")
  np.testing.assert_allclose(np.asarray(t_jit), np.asarray(t), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(w_jit), np.asarray(w), rtol=1e-5)


def test_mixture_draws_both_parts_in_proportion():
  """"mixture": a fraction f of the draws from t = u^p (here above 0.9 with probability
  1 - 0.9^(1/p)), the rest lambda-uniform (which puts draws at low noise, t < 0.1)."""
  f, p, n = 0.25, 0.3, 200_000
  sched = schedules.Schedule(kind="cosine", time_sampling="mixture", high_noise_power=p,
                             mixture_high_noise=f)
  t = np.asarray(sched.sample_times(jax.random.PRNGKey(4), n, "simple")[0], np.float64)
  lam1, lam0 = sched.logsnr_range()
  lam_09 = float(sched.logsnr(jnp.float32(0.9)))
  lam_01 = float(sched.logsnr(jnp.float32(0.1)))
  expect_high = f * (1 - 0.9 ** (1 / p)) + (1 - f) * (lam_09 - lam1) / (lam0 - lam1)
  expect_low = f * 0.1 ** (1 / p) + (1 - f) * (lam0 - lam_01) / (lam0 - lam1)
  se = lambda q: 4 * math.sqrt(q * (1 - q) / n)
  assert abs(np.mean(t > 0.9) - expect_high) < se(expect_high)
  assert abs(np.mean(t < 0.1) - expect_low) < se(expect_low)


def test_guidance_weight():
  t = jnp.array([0.05, 0.2, 0.5, 0.9, 1.0])  # (t = 0 is capped: sigma_0 = 2^-11.5)
  base = schedules.Schedule()
  sigma = np.sqrt(1 - np.cos((np.asarray(t) + 0.008) / 1.008 * np.pi / 2) ** 2
                  / np.cos(0.008 / 1.008 * np.pi / 2) ** 2)
  np.testing.assert_array_equal(base.guidance_weight(t), 1.0)
  power = schedules.Schedule(guidance_weighting="sigma_power", guidance_power=1.5)
  np.testing.assert_allclose(power.guidance_weight(t), sigma ** 1.5, rtol=1e-4, atol=1e-6)
  cut = schedules.Schedule(guidance_weighting="cutoff", guidance_cutoff_sigma=0.5)
  np.testing.assert_array_equal(cut.guidance_weight(t), (sigma >= 0.5).astype(np.float32))
  with pytest.raises(ValueError, match="guidance_weighting"):
    schedules.Schedule(guidance_weighting="ramp").guidance_weight(t)
