"""Reverse-process samplers (DDIM, ancestral DDPM) and the SAMI conditional generators.

Each sampler is one `jax.lax.scan` over a time grid; callers wrap them in `jax.jit` (they are
pure: models, params, z and keys in, images out; `inference.py` holds the jitted, per-model-kind
versions). Conditional sampling calls `jax.grad` of the encoder's log q at every step (the
guidance score).
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from sami_jax import objective
from sami_jax import rngs
from sami_jax import schedules

# (x_t [B,H,W,C], t [B]) -> eps prediction [B,H,W,C]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def predict_x0(x_t, eps, alpha, sigma):
  """x0 estimate from the noise prediction; alpha, sigma broadcast against x_t."""
  return (x_t - sigma * eps) / alpha


def _time_grid(steps: int) -> tuple[jax.Array, jax.Array]:
  """Pairs (t, s) with s < t: t = 1, ..., 1/steps and s = t - 1/steps (the last s is 0)."""
  t = jnp.arange(steps, 0, -1, dtype=jnp.float32) / steps
  return t, t - 1.0 / steps


def sample(eps_fn: EpsFn, schedule: schedules.Schedule, x_init: jax.Array, rng: jax.Array, *,
           steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
           clip_x0: bool = True) -> jax.Array:
  """Runs the reverse process from t = 1 to t = 0.

  Args:
    eps_fn: the (possibly guided) noise prediction.
    schedule: the noise schedule (the single source of alpha and sigma).
    x_init: [B, H, W, C] the initial noise x_1 (N(0, I)).
    rng: key for the stochastic part (DDIM with eta > 0, ancestral DDPM).
    steps: number of reverse steps.
    sampler: "ddim" (eta = 0 deterministic; eta = 1 matches DDPM's variance) or "ddpm" (ancestral
      sampling from the Gaussian posterior q(x_s | x_t, x0_hat)).
    eta: DDIM stochasticity.
    clip_x0: clip the x0 estimate to [-1, 1] at every step (data range); off for exactness tests.
  Returns:
    [B, H, W, C] the final x0 estimate.
  """
  if sampler not in ("ddim", "ddpm"):
    raise ValueError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'.")
  b = x_init.shape[0]
  ts, ss = _time_grid(steps)
  keys = jax.random.split(rng, steps)

  def step(x, inputs):
    t, s, key = inputs
    tb = jnp.full((b,), t)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    eps = eps_fn(x, tb)
    x0 = predict_x0(x, eps, alpha_t, sigma_t)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - alpha_t * x0) / sigma_t
    noise = rngs.normal(key, x.shape, x.dtype)
    if sampler == "ddim":
      # DDIM (Song et al. 2021, eq. 12) with alpha_bar = alpha^2 and 1 - alpha_bar = sigma^2:
      #   c^2 = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2),
      # eta^2 times the DDPM posterior variance (eta = 1 is the ancestral step). 1 - alpha_t^2 /
      # alpha_s^2 is taken as -expm1 of a log-sigmoid difference, so that close steps keep their
      # precision in float32.
      one_minus_ratio = -jnp.expm1(jax.nn.log_sigmoid(schedule.logsnr(t))
                                   - jax.nn.log_sigmoid(schedule.logsnr(s)))
      c2 = eta ** 2 * (sigma_s ** 2 / sigma_t ** 2) * one_minus_ratio
      c2 = jnp.clip(c2, 0.0, sigma_s ** 2)  # rounding only: c^2 <= sigma_s^2 exactly
      x_next = alpha_s * x0 + jnp.sqrt(sigma_s ** 2 - c2) * eps + jnp.sqrt(c2) * noise
    else:
      alpha_ts = alpha_t / alpha_s
      var_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2  # variance of q(x_t | x_s)
      mean = (alpha_ts * sigma_s ** 2 / sigma_t ** 2) * x + (alpha_s * var_ts / sigma_t ** 2) * x0
      var = var_ts * sigma_s ** 2 / sigma_t ** 2
      x_next = mean + jnp.sqrt(var) * noise
    return x_next, x0

  _, x0s = jax.lax.scan(step, x_init, (ts, ss, keys))
  return x0s[-1]


def conditional_eps_fn(denoiser, encoder, params, z: jax.Array, *, gamma: float = 1.0,
                       time_conditioning: bool = False,
                       schedule: schedules.Schedule) -> EpsFn:
  """eps_hat(x_t, t, z) = eps_theta(x_t, t) - gamma * gamma(t) * sigma_t * grad_x log q(z | x_t),
  gamma(t) the schedule's guidance weight (the one the run trained with)."""
  encode_fn = objective.bind_encoder(encoder, params["encoder"], time_conditioning)

  def eps_fn(x, t):
    eps_theta = denoiser.apply({"params": params["denoiser"]}, x, t, train=False)
    eps_hat, _ = objective.guided_eps(eps_theta, encode_fn, x, t, z, schedule, gamma)
    return eps_hat
  return eps_fn


def unconditional_eps_fn(denoiser, params) -> EpsFn:
  return lambda x, t: denoiser.apply({"params": params["denoiser"]}, x, t, train=False)


def adagn_eps_fn(denoiser, params, z: jax.Array) -> EpsFn:
  """The DiffAE baseline: eps_theta(x_t, t, cond=z), z entering through adaptive group norm."""
  return lambda x, t: denoiser.apply({"params": params["denoiser"]}, x, t, train=False, cond=z)


def decoder_mean(decoder, params, z: jax.Array, *, clip: bool = True) -> jax.Array:
  """The beta-VAE baseline's image for latents z [B, d]: the decoder's mean [B, H, W, C]."""
  x = decoder.apply({"params": params["decoder"]}, z)
  return jnp.clip(x, -1.0, 1.0) if clip else x


def initial_noise(rng: jax.Array, batch: int, image_shape: tuple[int, int, int], *,
                  shared: bool = False) -> jax.Array:
  """x_1 ~ N(0, I), [batch, H, W, C]; shared=True gives every row the same noise image (which is
  what makes the rows of a traversal or an interpolation comparable)."""
  noise = rngs.normal(rng, ((1,) if shared else (batch,)) + tuple(image_shape), jnp.float32)
  return jnp.broadcast_to(noise, (batch,) + tuple(image_shape))


def generate(eps_fn: EpsFn, schedule: schedules.Schedule, batch: int,
             image_shape: tuple[int, int, int], rng: jax.Array, *, shared_noise: bool = False,
             **sample_kw) -> jax.Array:
  """Images [batch, H, W, C] from fresh noise under `eps_fn` (see `sample` for sample_kw)."""
  rng_init, rng_sample = jax.random.split(rng)
  x_init = initial_noise(rng_init, batch, image_shape, shared=shared_noise)
  return sample(eps_fn, schedule, x_init, rng_sample, **sample_kw)


def encode(encoder, params, x: jax.Array, *, time_conditioning: bool = False
           ) -> tuple[jax.Array, jax.Array]:
  """Posterior (mean, std), each [B, d], of clean images x [B, H, W, C]."""
  return objective.encode_clean(
      objective.bind_encoder(encoder, params["encoder"], time_conditioning), x)


def traverse_latents(z: jax.Array, dim: int, values: jax.Array) -> jax.Array:
  """z [d] -> [len(values), d], row i equal to z with z[dim] = values[i]."""
  chex.assert_rank(z, 1)
  zs = jnp.tile(z[None], (values.shape[0], 1))
  return zs.at[:, dim].set(values)


def interpolate_latents(z_a: jax.Array, z_b: jax.Array, n: int) -> jax.Array:
  """Linear interpolation between z_a and z_b ([d] each) -> [n, d], endpoints included."""
  w = jnp.linspace(0.0, 1.0, n)[:, None]
  return (1.0 - w) * z_a[None] + w * z_b[None]
