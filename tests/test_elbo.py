"""The bound on -log p(x) (evaluation/elbo.py): its pieces against hand-derived closed forms, and
the whole estimator against data whose likelihood, or whose bound, is known exactly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import special

from sami_jax import schedules
from sami_jax.evaluation import elbo

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


def test_bits_per_dim():
  np.testing.assert_allclose(elbo.bits_per_dim(jnp.asarray(64 * math.log(2.0)), 64), 1.0)


# ------------------------------------------------------------------ the estimator: shared setup

SCHEDULE = schedules.Schedule(kind="cosine")
# The schedule's end points, by hand: lambda(1) = logsnr_min; lambda(0) where alpha^2 = 1 - 2^-23.
LOGSNR_1 = -20.0
LOGSNR_0 = math.log((1.0 - 2.0 ** -23) / 2.0 ** -23)  # 15.942
SHAPE = (16, 16, 1)
D = 256
DATA_MEAN, DATA_STD = 0.1, 0.4  # pixels: N(0.1, 0.4^2) discretised to the 256 bins (7.63 bits)
VALUES = np.arange(256) * 2.0 / 255.0 - 1.0
HALF_BIN = 1.0 / 255.0


def _pixel_probs():
  """P(k), k = 0..255: the mass of N(DATA_MEAN, DATA_STD^2) on bin k (end bins open), float64."""
  lo = np.where(np.arange(256) == 0, -np.inf, VALUES - HALF_BIN)
  hi = np.where(np.arange(256) == 255, np.inf, VALUES + HALF_BIN)
  return special.ndtr((hi - DATA_MEAN) / DATA_STD) - special.ndtr((lo - DATA_MEAN) / DATA_STD)


PROBS = _pixel_probs()
ENTROPY_BITS = float(-np.sum(PROBS * np.log2(PROBS)))  # -E log2 P(x) per dimension: the truth


def _images(n, seed):
  """n images of i.i.d. pixels with law PROBS: (x0 [n, 16, 16, 1] float32, -log P(x0) [n] nats)."""
  k = np.random.default_rng(seed).choice(256, size=(n,) + SHAPE, p=PROBS)
  nll = -np.log(PROBS)[k].reshape(n, -1).sum(axis=1)
  return VALUES[k].astype(np.float32), nll


def _batches(x, batch_size):
  for i in range(0, len(x), batch_size):
    yield x[i:i + batch_size], np.ones(len(x[i:i + batch_size]), bool)


def exact_discrete_eps_hat(params, x_t, t, x0, rng):
  """E[eps | x_t] for pixels i.i.d. with law PROBS: the posterior over the 256 values, in closed
  form (softmax of log P(k) - (x_t - alpha v_k)^2 / (2 sigma^2)), gives E[x0 | x_t]."""
  del params, x0, rng
  alpha, sigma = SCHEDULE.alpha_sigma(t)
  alpha, sigma = alpha[:, None, None, None, None], sigma[:, None, None, None, None]
  values = jnp.asarray(VALUES, jnp.float32)
  logits = (jnp.asarray(np.log(PROBS), jnp.float32)
            - (x_t[..., None] - alpha * values) ** 2 / (2.0 * sigma ** 2))
  x0_mean = jnp.sum(jax.nn.softmax(logits, axis=-1) * values, axis=-1)
  return (x_t - alpha[..., 0] * x0_mean) / sigma[..., 0], {}


def gaussian_eps_hat(params, x_t, t, x0, rng):
  """E[eps | x_t] as if pixels were continuous N(DATA_MEAN, DATA_STD^2): an imperfect denoiser of
  the discretised data, sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2)."""
  del params, x0, rng
  alpha, sigma = SCHEDULE.alpha_sigma(t)
  alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
  return sigma * (x_t - alpha * DATA_MEAN) / (alpha ** 2 * DATA_STD ** 2 + sigma ** 2), {}


def test_bound_fn_reads_the_schedule_end_points():
  fn = elbo.make_bound_fn(SCHEDULE, gaussian_eps_hat)
  np.testing.assert_allclose(fn.logsnr_range, (LOGSNR_1, LOGSNR_0), rtol=1e-6)
  lin = elbo.make_bound_fn(schedules.Schedule(kind="linear"), gaussian_eps_hat)
  # Linear betas 1e-4..0.02 (T = 1000): lambda(1) = -log(exp(0.1 + 9.95) - 1); lambda(0) = clip 20.
  np.testing.assert_allclose(lin.logsnr_range, (-math.log(math.expm1(10.05)), 20.0), rtol=1e-6)


# --------------------------------------------------------- (a) exact denoiser: the truth is known


@pytest.fixture(scope="module")
def exact_estimate():
  x, nll = _images(256, seed=0)
  fn = elbo.make_bound_fn(SCHEDULE, exact_discrete_eps_hat)
  est = elbo.estimate(fn, None, _batches(x, 64), draws=8, key=jax.random.PRNGKey(0))
  return est, nll


def test_exact_denoiser_bound_matches_the_true_likelihood(exact_estimate):
  """With the exact denoiser the bound's gap is the prior's KL at lambda_1 = -20 and the decoder's
  at lambda_0 = 15.94 (a bin is 11 noise standard deviations wide there), both below 1e-9 nats:
  the estimate must agree with -log P(x), in expectation 7.633 bits/dim."""
  est, nll = exact_estimate
  total, se = est.bits_per_dim["total"], est.bits_per_dim_stderr["total"]
  assert est.num_images == 256 and est.draws == 8 and est.num_dims == D
  # Measured 0.051 here (0.048 predicted from the integrand's profile over lambda): most of it is
  # the shape of the integrand (0 below lambda = -5 and above 14, a plateau between), which 8 evenly
  # spaced draws resolve only so far; 16 draws give about 0.022.
  assert se <= 0.06, se
  assert abs(total - ENTROPY_BITS) <= 3 * se, (total, ENTROPY_BITS, se)
  # Image by image against the same images' exact -log P(x): the spread of the truth across images
  # cancels, the standard error left is the Monte Carlo noise; it is a bound, so the mean
  # difference may not be below 0 by more than that noise (and here has expectation ~0).
  diff = (est.per_image_nats["total"] - nll) / (D * math.log(2))
  se_diff = diff.std(ddof=1) / math.sqrt(len(diff))
  assert abs(diff.mean()) <= 3 * se_diff, (diff.mean(), se_diff)
  # The terms add up, and the reported nats and bits/dim agree.
  parts = sum(est.bits_per_dim[k] for k in ("diffusion", "prior", "reconstruction"))
  np.testing.assert_allclose(total, parts, rtol=1e-9)
  np.testing.assert_allclose(est.nats["total"] / (D * math.log(2)), total, rtol=1e-9)
  assert set(est.bits_per_dim) == {"diffusion", "prior", "reconstruction", "total"}


def test_standard_error_is_calibrated():
  """32 independent 16-image estimates: the spread of their totals matches the standard error they
  report. For a calibrated standard error the ratio of the two lies in [0.55, 1.5] with odds of
  about 99.9% (the chi distribution with 31 degrees of freedom, widened for the noise of the
  reported errors); one off by a factor 2 fails."""
  fn = elbo.make_bound_fn(SCHEDULE, exact_discrete_eps_hat)
  totals, ses = [], []
  for r in range(32):
    x, _ = _images(16, seed=100 + r)
    est = elbo.estimate(fn, None, _batches(x, 16), draws=8, key=jax.random.PRNGKey(100 + r))
    totals.append(est.bits_per_dim["total"])
    ses.append(est.bits_per_dim_stderr["total"])
  ratio = np.std(totals, ddof=1) / np.sqrt(np.mean(np.square(ses)))
  assert 0.55 < ratio < 1.5, (ratio, totals, ses)


# ------------------------------------------- (b) an imperfect denoiser against its exact bound


def _reconstruction_ref(x, logsnr_0):
  """E over eps of -log(mass of N(x + tau eps, tau^2) on x's bin), tau = exp(-lambda_0 / 2), summed
  over pixels, float64 (Gauss-Hermite). In units of tau the bin is [-h/tau - eps, h/tau - eps],
  open on the outer side for the end values."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  tau = math.exp(-logsnr_0 / 2)
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  weights = weights / weights.sum()
  r = HALF_BIN / tau
  # log(Phi(r - e) - Phi(-r - e)), taken on the side of 0 where the tail is small (it is even in e).
  e = np.abs(nodes)
  log_hi = special.log_ndtr(r - e)
  interior = -(log_hi + np.log1p(-np.exp(special.log_ndtr(-r - e) - log_hi))) @ weights
  end = -special.log_ndtr(r - nodes) @ weights
  is_end = (x < -1 + HALF_BIN) | (x > 1 - HALF_BIN)
  return np.sum(np.where(is_end, end, interior), axis=1)


def _prior_ref(x, logsnr_1):
  """1/2 sum (alpha^2 x^2 + sigma^2 - 1 - log sigma^2) at lambda_1, float64 (sigma^2 - 1 is
  -alpha^2 exactly)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  a1 = special.expit(logsnr_1)
  return 0.5 * np.sum(a1 * x ** 2 - a1 + np.log1p(np.exp(logsnr_1)), axis=1)


def _gaussian_denoiser_bound_nats(x):
  """The bound of `gaussian_eps_hat` for images x [n, ...], float64: its expectation over eps and
  lambda, by quadrature over lambda of the closed-form expectation over eps.

  eps - eps_hat = c alpha^2 s^2 eps - c sigma alpha (x - m), c = 1 / (alpha^2 s^2 + sigma^2), so
  per pixel E_eps ||eps - eps_hat||^2 = c^2 alpha^2 (alpha^2 s^4 + sigma^2 (x - m)^2), which is
  a(l) + b(l) (x - m)^2, and the diffusion term is 1/2 (D int a + sum (x - m)^2 int b) over
  [LOGSNR_1, LOGSNR_0]; the prior and reconstruction terms are the float64 references above.
  """
  s2 = DATA_STD ** 2

  def ab(lam):
    alpha2, sigma2 = special.expit(lam), special.expit(-lam)
    c = 1.0 / (alpha2 * s2 + sigma2)
    return c ** 2 * alpha2 ** 2 * s2 ** 2, c ** 2 * alpha2 * sigma2

  opts = dict(limit=200, epsabs=1e-12, epsrel=1e-10)
  int_a = integrate.quad(lambda l: ab(l)[0], LOGSNR_1, LOGSNR_0, **opts)[0]
  int_b = integrate.quad(lambda l: ab(l)[1], LOGSNR_1, LOGSNR_0, **opts)[0]
  # The same integrals from antiderivatives (w = s^2 e^l): int a = [log(1 + w) + 1 / (1 + w)],
  # int b = [-1 / (s^2 (1 + w))]. A check on the quadrature.
  w0, w1 = s2 * math.exp(LOGSNR_0), s2 * math.exp(LOGSNR_1)
  np.testing.assert_allclose(int_a, math.log1p(w0) + 1 / (1 + w0) - math.log1p(w1) - 1 / (1 + w1),
                             rtol=1e-8)
  np.testing.assert_allclose(int_b, (1 / (1 + w1) - 1 / (1 + w0)) / s2, rtol=1e-8)

  x = np.asarray(x, np.float64).reshape(len(x), -1)
  diffusion = 0.5 * (x.shape[1] * int_a + np.sum((x - DATA_MEAN) ** 2, axis=1) * int_b)
  prior = _prior_ref(x, LOGSNR_1)
  recon = _reconstruction_ref(x, LOGSNR_0)
  return diffusion + prior + recon


def test_imperfect_denoiser_matches_its_quadrature_bound():
  x, nll = _images(256, seed=1)
  fn = elbo.make_bound_fn(SCHEDULE, gaussian_eps_hat)
  est = elbo.estimate(fn, None, _batches(x, 64), draws=8, key=jax.random.PRNGKey(1))
  ref = _gaussian_denoiser_bound_nats(x)
  to_bits = 1 / (D * math.log(2))
  total, se = est.bits_per_dim["total"], est.bits_per_dim_stderr["total"]
  assert abs(total - ref.mean() * to_bits) <= 3 * se, (total, ref.mean() * to_bits, se)
  # Image by image (same images): only the Monte Carlo noise is left.
  diff = (est.per_image_nats["total"] - ref) * to_bits
  se_diff = diff.std(ddof=1) / math.sqrt(len(diff))
  assert abs(diff.mean()) <= 3 * se_diff, (diff.mean(), se_diff)
  # It is a looser bound than the exact denoiser's: above the truth by well over its error.
  assert total - nll.mean() * to_bits > 10 * se


# ---------------------------------------------------------- (c) the three terms tile the range


# (schedule, lambda_1, lambda_0 by hand): the default cosine, and a linear schedule cut at
# lambda_0 = 9 (where the reconstruction term is large, 1.3 nats a pixel).
TILING_CASES = [
    (SCHEDULE, LOGSNR_1, LOGSNR_0),
    (schedules.Schedule(kind="linear", logsnr_max=9.0), -math.log(math.expm1(10.05)), 9.0),
]


@pytest.mark.parametrize("case", range(len(TILING_CASES)))
def test_lambda_draws_cover_exactly_the_schedule_range(case):
  """A probe denoiser whose squared error is D for lambda above a split point and 0 below: the
  diffusion term is then D / 2 * (lambda_0 - split) for every split in [lambda_1, lambda_0] exactly
  when the draws are uniform on [lambda_1, lambda_0] (a gap at either end shows at the splits near
  it), while the prior and reconstruction terms sit at lambda_1 and lambda_0 themselves."""
  sched, lam_1, lam_0 = TILING_CASES[case]
  n, draws, d = 512, 16, 16
  x = np.tile(VALUES[[0, 37, 128, 255]].astype(np.float32).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  splits = [lam_1 + 0.05, lam_1 + 1.0, 0.3, lam_0 - 1.0, lam_0 - 0.05]

  def probe(split, x_t, t, x0, rng):  # the split point comes in as the params
    del rng
    lam = sched.logsnr(t)[:, None, None, None]
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
    eps = (x_t - alpha * x0) / sigma
    return eps - jnp.where(lam > split, 1.0, 0.0), {}

  fn = elbo.make_bound_fn(sched, probe)
  for split in splits:
    est = elbo.estimate(fn, jnp.float32(split), _batches(x, 256), draws=draws,
                        key=jax.random.PRNGKey(2))
    got = est.nats["diffusion"] / (d / 2)  # the lambda length above the split
    # Only the stratum holding the split is random: sd <= range / draws * 1/2 / sqrt(n).
    tol = 4 * (lam_0 - lam_1) / draws * 0.5 / math.sqrt(n) + 1e-3
    assert abs(got - (lam_0 - split)) <= tol, (split, got, lam_0 - split, tol)
  # The end terms at the same end points, against float64 references: the prior's KL at lambda_1
  # and the expected reconstruction at lambda_0 (its Monte Carlo sd over 512 * 16 pixels is ~1%).
  np.testing.assert_allclose(est.nats["prior"], _prior_ref(x[:1], lam_1)[0], rtol=1e-4,
                             atol=1e-9)
  recon = _reconstruction_ref(x[:1], lam_0)[0]
  se_recon = est.nats_stderr["reconstruction"]
  assert abs(est.nats["reconstruction"] - recon) <= 4 * se_recon + 1e-9, (
      est.nats["reconstruction"], recon, se_recon)
  if case == 1:
    assert recon > 5.0  # a real check there, not 0 against 0


def test_zero_denoiser_diffusion_is_d_times_half_the_range():
  """eps_hat = 0: the per-draw diffusion term is (lambda_0 - lambda_1) / 2 * ||eps||^2, mean
  D (lambda_0 - lambda_1) / 2 whatever u; extras are reported and added into the total."""
  def zero(params, x_t, t, x0, rng):
    del params, t, x0, rng
    return jnp.zeros_like(x_t), {"latent_kl": jnp.full(x_t.shape[:1], 2.5)}
  fn = jax.jit(elbo.make_bound_fn(SCHEDULE, zero))
  b = 2048
  x0 = jnp.zeros((b, 4, 4, 2))
  for u in (0.0, 0.37, 0.999):
    terms = fn(None, x0, jnp.full((b,), u), jax.random.PRNGKey(0))
    assert set(terms) == {"diffusion", "prior", "reconstruction", "latent_kl", "total"}
    # ||eps||^2 / D over 2048 * 32 normals has a relative sd of 0.4%.
    np.testing.assert_allclose(float(jnp.mean(terms["diffusion"])),
                               32 * (LOGSNR_0 - LOGSNR_1) / 2, rtol=0.02)
    np.testing.assert_allclose(terms["total"], terms["diffusion"] + terms["prior"]
                               + terms["reconstruction"] + 2.5, rtol=1e-6)
    assert np.all(np.asarray(terms["reconstruction"]) >= 0)


# ---------------------------------------------------------------------- interface and plumbing


def test_padding_rows_are_dropped_and_do_not_change_the_real_ones():
  x, _ = _images(5, seed=3)
  fn = elbo.make_bound_fn(SCHEDULE, gaussian_eps_hat)
  mask = np.array([True] * 5 + [False] * 3)
  pad_a = np.concatenate([x, np.zeros((3,) + SHAPE, np.float32)])
  pad_b = np.concatenate([x, np.ones((3,) + SHAPE, np.float32)])
  key = jax.random.PRNGKey(4)
  a = elbo.estimate(fn, None, [(pad_a, mask)], draws=4, key=key)
  b = elbo.estimate(fn, None, [(pad_b, mask)], draws=4, key=key)
  assert a.num_images == 5
  np.testing.assert_array_equal(a.per_image_nats["total"], b.per_image_nats["total"])
  d = a.as_dict()
  assert "per_image_nats" not in d and d["logsnr_range"] == list(a.logsnr_range)
  with pytest.raises(ValueError, match="no images"):
    elbo.estimate(fn, None, [(pad_a, np.zeros(8, bool))], draws=4, key=key)


def test_one_compile_per_batch_size():
  traces = []

  def counting(params, x_t, t, x0, rng):
    traces.append(x_t.shape)  # runs only while tracing
    return gaussian_eps_hat(params, x_t, t, x0, rng)

  fn = elbo.make_bound_fn(SCHEDULE, counting)
  x, _ = _images(24, seed=5)
  elbo.estimate(fn, None, _batches(x, 8), draws=3, key=jax.random.PRNGKey(0))
  assert len(traces) == 1
  elbo.estimate(fn, None, _batches(x, 8), draws=3, key=jax.random.PRNGKey(1))
  assert len(traces) == 1
  elbo.estimate(fn, None, _batches(x, 12), draws=3, key=jax.random.PRNGKey(0))
  assert len(traces) == 2


def test_extras_may_not_shadow_the_bound_terms():
  def bad(params, x_t, t, x0, rng):
    return jnp.zeros_like(x_t), {"prior": jnp.zeros(x_t.shape[:1])}
  fn = elbo.make_bound_fn(SCHEDULE, bad)
  with pytest.raises(ValueError, match="rename the extras"):
    fn(None, jnp.zeros((2,) + SHAPE), jnp.zeros((2,)), jax.random.PRNGKey(0))


def test_paired_difference_shares_lambda_and_eps(exact_estimate):
  """Same images and key: the exact and the imperfect denoiser see the same lambda and eps (and the
  same prior and reconstruction draws), so their difference is taken image by image."""
  x, _ = _images(256, seed=0)  # the images of exact_estimate
  exact, _ = exact_estimate
  fn = elbo.make_bound_fn(SCHEDULE, gaussian_eps_hat)
  imperfect = elbo.estimate(fn, None, _batches(x, 64), draws=8, key=jax.random.PRNGKey(0))
  mean, se = elbo.paired_difference(imperfect, exact)
  np.testing.assert_allclose(mean, imperfect.bits_per_dim["total"] - exact.bits_per_dim["total"],
                             rtol=1e-9)
  # Same prior and reconstruction draws: those terms cancel exactly.
  np.testing.assert_array_equal(imperfect.per_image_nats["prior"], exact.per_image_nats["prior"])
  np.testing.assert_array_equal(imperfect.per_image_nats["reconstruction"],
                                exact.per_image_nats["reconstruction"])
  d = (imperfect.per_image_nats["total"] - exact.per_image_nats["total"]) / (D * math.log(2))
  np.testing.assert_allclose(se, d.std(ddof=1) / math.sqrt(len(d)), rtol=1e-9)
  # Pairing removes the spread across images and the shared draws' part of the noise: below the
  # error of an unpaired difference of the two estimates.
  unpaired = math.hypot(imperfect.bits_per_dim_stderr["total"], exact.bits_per_dim_stderr["total"])
  assert se < unpaired, (se, unpaired)
