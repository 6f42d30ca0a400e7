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
