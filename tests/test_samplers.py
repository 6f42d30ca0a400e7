import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import kinds
from sami_jax import samplers
from sami_jax import schedules
from tests import tiny_models

MEAN, VAR = 0.3, 0.25  # the Gaussian data distribution, per pixel


def exact_gaussian_eps(schedule):
  """E[eps | x_t] for x0 ~ N(MEAN, VAR) elementwise: sigma_t (x_t - alpha_t m) / (alpha_t^2 v +
  sigma_t^2) (Gaussian conditioning, derived by hand)."""
  def eps_fn(x, t):
    alpha, sigma = schedule.alpha_sigma(t)
    alpha = alpha[:, None, None, None]
    sigma = sigma[:, None, None, None]
    return sigma * (x - alpha * MEAN) / (alpha ** 2 * VAR + sigma ** 2)
  return eps_fn


class GaussianSamplerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ddim_recovers_gaussian_moments(self):
    sched = schedules.Schedule(kind="cosine")
    x_init = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 1))  # 4096 pixels
    run = self.variant(lambda x, k: samplers.sample(exact_gaussian_eps(sched), sched, x, k,
                                                    steps=50, sampler="ddim", clip_x0=False))
    out = np.asarray(run(x_init, jax.random.PRNGKey(1)))
    # Standard errors with n = 4096: mean 0.5/64 ~ 0.008, variance ~ 0.25*sqrt(2/4096) ~ 0.0055.
    assert abs(out.mean() - MEAN) < 0.03, out.mean()
    assert abs(out.var() - VAR) < 0.025, out.var()

  @chex.variants(with_jit=True, without_jit=True)
  def test_ddpm_ancestral_recovers_gaussian_moments(self):
    sched = schedules.Schedule(kind="cosine")
    x_init = jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 1))
    run = self.variant(lambda x, k: samplers.sample(exact_gaussian_eps(sched), sched, x, k,
                                                    steps=100, sampler="ddpm", clip_x0=False))
    out = np.asarray(run(x_init, jax.random.PRNGKey(3)))
    assert abs(out.mean() - MEAN) < 0.03, out.mean()
    assert abs(out.var() - VAR) < 0.03, out.var()


def test_ddim_is_deterministic_and_eta_adds_noise():
  sched = schedules.Schedule()
  x_init = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
  eps_fn = exact_gaussian_eps(sched)
  a = samplers.sample(eps_fn, sched, x_init, jax.random.PRNGKey(1), steps=10)
  b = samplers.sample(eps_fn, sched, x_init, jax.random.PRNGKey(2), steps=10)
  np.testing.assert_array_equal(a, b)  # eta = 0: the key is not used
  c = samplers.sample(eps_fn, sched, x_init, jax.random.PRNGKey(2), steps=10, eta=1.0)
  assert not np.allclose(a, c)


# ----------------------------------------------- DDIM with eta > 0 against the exact Gaussian chain

_COSINE_S = 0.008
_COSINE_CAP = np.log((1 - 2.0 ** -23) / 2.0 ** -23)  # lambda(t = 0) of the cosine schedule


def _ref_alpha_sigma(t):
  """Cosine schedule (Nichol & Dhariwal, s = 0.008, lambda clipped to [-20, cap]) in float64."""
  c = np.pi / (2 * (1 + _COSINE_S))
  alpha_bar = np.sin((1 - t) * c) ** 2 / np.cos(_COSINE_S * c) ** 2
  with np.errstate(divide="ignore"):
    lam = np.clip(np.log(alpha_bar) - np.log1p(-alpha_bar), -20.0, _COSINE_CAP)
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def _ddim_chain_moments(steps, eta):
  """(mean, variance) of the sampler's output for x_1 ~ N(0, 1) and x0 ~ N(MEAN, VAR) data, float64.

  With the exact Gaussian denoiser every step of DDIM (Song et al. 2021, eq. 12) is linear in x
  plus independent noise, so the moments propagate exactly:
    eps_hat = k (x - alpha_t MEAN), k = sigma_t / (alpha_t^2 VAR + sigma_t^2)
    x0_hat  = (x - sigma_t eps_hat) / alpha_t
    x_s     = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2     = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2)
  (eq. 12's sigma^2 with alpha_bar = alpha^2, 1 - alpha_bar = sigma^2). The sampler returns the last
  step's x0_hat (at t = 1 / steps).
  """
  mean, var = 0.0, 1.0
  for i in range(steps):
    t = (steps - i) / steps
    s = t - 1.0 / steps
    a_t, s_t = _ref_alpha_sigma(t)
    a_s, s_s = _ref_alpha_sigma(s)
    k = s_t / (a_t ** 2 * VAR + s_t ** 2)
    gain_x0, shift_x0 = (1 - s_t * k) / a_t, s_t * k * MEAN  # x0_hat = gain x + shift
    if i == steps - 1:
      return gain_x0 * mean + shift_x0, gain_x0 ** 2 * var
    c2 = eta ** 2 * (s_s ** 2 / s_t ** 2) * (1 - a_t ** 2 / a_s ** 2)
    r = np.sqrt(s_s ** 2 - c2)
    gain = a_s * gain_x0 + r * k
    shift = a_s * shift_x0 - r * k * a_t * MEAN
    mean, var = gain * mean + shift, gain ** 2 * var + c2


@pytest.mark.parametrize("steps", [50, 200])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_reproduces_gaussian_moments(steps, eta):
  """Scalar pixels from N(0.3, 0.5^2), the exact denoiser, n = 65536 samples.

  Tolerances are 4 standard errors of the sample moments (mean: sd / sqrt(n); variance:
  var * sqrt(2 / (n - 1)), the Gaussian sample-variance error). Against the data's own moments the
  tolerance adds the sampler's discretisation bias, from the exact chain above: it is 0 for the mean
  and, for the variance, -0.015 (eta 0) / -0.031 (eta 1) at 50 steps and -0.004 / -0.009 at 200
  (the sampler drops the x0-uncertainty part of each reverse step's variance).
  """
  n = 65536
  sched = schedules.Schedule(kind="cosine")
  x_init = jax.random.normal(jax.random.PRNGKey(10 + steps), (n, 1, 1, 1))
  run = jax.jit(lambda x, k: samplers.sample(exact_gaussian_eps(sched), sched, x, k, steps=steps,
                                             sampler="ddim", eta=eta, clip_x0=False))
  out = np.asarray(run(x_init, jax.random.PRNGKey(11)), np.float64).ravel()
  m, v = out.mean(), out.var(ddof=1)
  ref_m, ref_v = _ddim_chain_moments(steps, eta)
  se_m, se_v = np.sqrt(ref_v / n), ref_v * np.sqrt(2.0 / (n - 1))
  assert abs(m - ref_m) < 4 * se_m, (m, ref_m, se_m)
  assert abs(v - ref_v) < 4 * se_v, (v, ref_v, se_v)
  assert abs(m - MEAN) < 4 * se_m + abs(ref_m - MEAN), (m, MEAN)
  assert abs(v - VAR) < 4 * se_v + abs(ref_v - VAR), (v, VAR)
  assert abs(ref_v - VAR) < (0.035 if steps == 50 else 0.01)  # the bias shrinks with steps


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_eta_one_is_ancestral_ddpm(clip_x0):
  """eta = 1 is DDPM's ancestral step (Song et al. 2021, sec. 4.1): with the same noise the two
  branches (written independently) give the same samples."""
  sched = schedules.Schedule(kind="cosine")
  x_init = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 1)) * 1.5
  eps_fn = exact_gaussian_eps(sched)
  kw = dict(steps=50, clip_x0=clip_x0)
  ddim = samplers.sample(eps_fn, sched, x_init, jax.random.PRNGKey(1), sampler="ddim", eta=1.0,
                         **kw)
  ddpm = samplers.sample(eps_fn, sched, x_init, jax.random.PRNGKey(1), sampler="ddpm", **kw)
  np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


@pytest.mark.parametrize("size,channels", [(4, 1), (6, 3), (8, 2)])
def test_generators_shapes(size, channels):
  enc = tiny_models.TinyEncoder(latent_dim=3)
  den = tiny_models.TinyDenoiser()
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, channels), minval=-1, maxval=1)
  params = {"denoiser": tiny_models.init(den, x, jnp.zeros((2,))),
            "encoder": tiny_models.init(enc, x)}
  sched = schedules.Schedule()
  kind = kinds.get("sami")
  kw = dict(schedule=sched, steps=3, image_shape=x.shape[1:])
  mean, _ = samplers.encode(enc, params, x)
  rec = kinds.decode(kind, den, enc, params, mean, jax.random.PRNGKey(1), **kw)
  chex.assert_shape(rec, x.shape)
  assert np.all(np.abs(np.asarray(rec)) <= 1.0)
  z = jnp.zeros((3,))
  tr = kinds.decode(kind, den, enc, params,
                    samplers.traverse_latents(z, 1, jnp.linspace(-2, 2, 5)),
                    jax.random.PRNGKey(2), shared_noise=True, **kw)
  chex.assert_shape(tr, (5, size, size, channels))
  it = kinds.decode(kind, den, enc, params, samplers.interpolate_latents(z, jnp.ones((3,)), 4),
                    jax.random.PRNGKey(3), shared_noise=True, **kw)
  chex.assert_shape(it, (4, size, size, channels))
  # Shared noise: with the guidance switched off every row is the same image.
  same = kinds.decode(kind, den, enc, params, jnp.zeros((3, 3)), jax.random.PRNGKey(3),
                      shared_noise=True, gamma=0.0, **kw)
  np.testing.assert_allclose(same[0], same[2], atol=1e-6)


def test_guidance_changes_samples_and_gamma_zero_is_unconditional():
  enc = tiny_models.TinyEncoder(latent_dim=2)
  den = tiny_models.TinyDenoiser()
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 1), minval=-1, maxval=1)
  params = {"denoiser": tiny_models.init(den, x, jnp.zeros((3,))),
            "encoder": tiny_models.init(enc, x)}
  sched = schedules.Schedule()
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 2)) * 3
  kw = dict(schedule=sched, image_shape=(4, 4, 1), steps=5, clip_x0=False)
  rng = jax.random.PRNGKey(2)
  guided = kinds.decode(kinds.get("sami"), den, enc, params, z, rng, **kw)
  g0 = kinds.decode(kinds.get("sami"), den, enc, params, z, rng, gamma=0.0, **kw)
  uncond = kinds.decode(kinds.get("ddpm"), den, None, params, z, rng, **kw)
  np.testing.assert_allclose(g0, uncond, rtol=1e-5, atol=1e-6)
  assert not np.allclose(guided, uncond)


def test_traverse_and_interpolate_latents():
  z = jnp.array([1.0, 2.0, 3.0])
  tr = samplers.traverse_latents(z, 1, jnp.array([-1.0, 0.0, 5.0]))
  np.testing.assert_array_equal(tr, [[1, -1, 3], [1, 0, 3], [1, 5, 3]])
  it = samplers.interpolate_latents(jnp.zeros(2), jnp.array([2.0, 4.0]), 3)
  np.testing.assert_allclose(it, [[0, 0], [1, 2], [2, 4]])
