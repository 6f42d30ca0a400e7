"""The variational bound on -log p(x) in bits per dimension (VDM-style decomposition).

For 8-bit data x (scaled to [-1, 1], D = H * W * C values per image) and a VP diffusion whose
log-SNR runs from lambda_0 = lambda(t=0) down to lambda_1 = lambda(t=1):

    -log p(x) <= L_recon + L_diffusion + L_prior (+ KL(q(z | x) || N(0, I)) for SAMI)

  L_diffusion = E_{t ~ U(0, 1), eps} [ w(t) * || eps - eps_hat(x_t, t, z) ||^2 ]
                (summed over the D pixels; w(t) = -1/2 d lambda / dt, the continuous-time "elbo"
                weighting of `Schedule.elbo_weight`, whatever weighting the model was trained with)
  L_prior     = KL( q(x_1 | x) || N(0, I) ),   q(x_1 | x) = N(alpha_1 x, sigma_1^2 I)
  L_recon     = E_eps [ -log p(x | x_0) ],     x_0 = alpha_0 x + sigma_0 eps,
                p(x | x_0) = prod over pixels of the mass that N(x_0 / alpha_0, exp(-lambda_0))
                puts on the 8-bit bin of that pixel's value (bins of width 2/255 centred on the 256
                values; the two end bins extend to -inf and +inf).

The end points lambda_0 and lambda_1 are the schedule's own (clipped) values at t = 0 and t = 1,
so that the three terms tile the whole log-SNR range and the sum is a bound (for the cosine
schedule lambda_0 is about 16.1, set by its clip of alpha^2 at 1 - 1e-7; for the linear schedule it
is `diffusion.logsnr_max`). VDM (Kingma et al. 2021) computes L_recon with a softmax over the 256
values with logits -(x_0/alpha_0 - v)^2 / (2 exp(-lambda_0)); we integrate the Gaussian over each
bin instead (DDPM's discretised decoder), which is a proper probability mass on the 256 values and
agrees with VDM's when exp(-lambda_0 / 2) is much smaller than a bin, as it is at lambda_0 > 12.

Everything here is a pure function of arrays; nats per example unless the name says bits/dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from sami_jax import objective
from sami_jax import schedules

# Half the width of an 8-bit bin in the [-1, 1] data scale.
HALF_BIN = 1.0 / 255.0


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
  """Nats per example -> bits per dimension (same shape)."""
  return nats / (num_dims * math.log(2.0))


def prior_nats(x0: jax.Array, logsnr_1: float | jax.Array) -> jax.Array:
  """KL(N(alpha_1 x0, sigma_1^2 I) || N(0, I)) per example, nats.

  Args:
    x0: [B, H, W, C] data in [-1, 1].
    logsnr_1: lambda at t = 1 (scalar).
  Returns:
    [B] = 1/2 sum over pixels of (alpha_1^2 x0^2 + sigma_1^2 - 1 - log sigma_1^2).
  """
  lam = jnp.asarray(logsnr_1, jnp.float32)
  alpha_sq, sigma_sq = jax.nn.sigmoid(lam), jax.nn.sigmoid(-lam)
  # log sigma^2 = log sigmoid(-lambda), accurate where sigma^2 is within float eps of 1.
  log_sigma_sq = jax.nn.log_sigmoid(-lam)
  # sigma^2 - 1 = -alpha^2 exactly, without the cancellation of (1 - 1e-9) - 1 in float32.
  per_pixel = 0.5 * (alpha_sq * x0 ** 2 - alpha_sq - log_sigma_sq)
  return jnp.sum(per_pixel, axis=tuple(range(1, x0.ndim)))


def _log_gaussian_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """log(Phi(hi) - Phi(lo)) for standardised bounds lo < hi (either may be infinite).

  Intervals centred above 0 are mirrored below it, where log_ndtr keeps its precision, and the
  difference is taken in log space, so narrow bins far in a tail still get finite log masses.
  """
  flip = (lo + hi) > 0
  lo, hi = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
  log_hi = jax.scipy.special.log_ndtr(hi)
  log_lo = jax.scipy.special.log_ndtr(lo)
  return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_lo - log_hi, -1e-30)))


def discretized_gaussian_nll(x0: jax.Array, mean: jax.Array, log_scale: jax.Array | float
                             ) -> jax.Array:
  """-log of the mass N(mean, exp(log_scale)^2) puts on each pixel's 8-bit bin, summed per example.

  Args:
    x0: [B, H, W, C] 8-bit data scaled to [-1, 1] (values 2 k / 255 - 1).
    mean: [B, H, W, C] the predicted value (any real).
    log_scale: log of the standard deviation (scalar or broadcastable).
  Returns:
    [B] nats. The bin of value v is [v - 1/255, v + 1/255], open-ended at v = -1 and v = 1.
  """
  chex.assert_equal_shape((x0, mean))
  inv_scale = jnp.exp(-jnp.asarray(log_scale, jnp.float32))
  lo = jnp.where(x0 < -1.0 + HALF_BIN, -jnp.inf, (x0 - HALF_BIN - mean) * inv_scale)
  hi = jnp.where(x0 > 1.0 - HALF_BIN, jnp.inf, (x0 + HALF_BIN - mean) * inv_scale)
  return -jnp.sum(_log_gaussian_mass(lo, hi), axis=tuple(range(1, x0.ndim)))


def reconstruction_nats(x0: jax.Array, eps: jax.Array, logsnr_0: float | jax.Array
                        ) -> jax.Array:
  """-log p(x0 | x_0) with x_0 = alpha_0 x0 + sigma_0 eps (one Monte Carlo sample), nats [B].

  The decoder reads x_0 / alpha_0 = x0 + exp(-lambda_0 / 2) eps as a Gaussian mean with standard
  deviation exp(-lambda_0 / 2) and scores x0's bin under it (`discretized_gaussian_nll`).
  """
  chex.assert_equal_shape((x0, eps))
  lam = jnp.asarray(logsnr_0, jnp.float32)
  noise_scale = jnp.exp(-0.5 * lam)  # sigma_0 / alpha_0
  return discretized_gaussian_nll(x0, x0 + noise_scale * eps, -0.5 * lam)


def diffusion_nats(eps: jax.Array, eps_hat: jax.Array, weight: jax.Array) -> jax.Array:
  """w(t) * ||eps - eps_hat||^2 summed over pixels: eps, eps_hat [B, H, W, C], weight [B] -> [B]."""
  chex.assert_equal_shape((eps, eps_hat))
  return weight * jnp.sum((eps - eps_hat) ** 2, axis=tuple(range(1, eps.ndim)))


def make_elbo_fn(denoiser, encoder, schedule: schedules.Schedule, *, with_latent: bool,
                 gamma: float = 1.0, time_conditioning: bool = False
                 ) -> Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
  """The ELBO terms for one Monte Carlo sample of (t, eps, z, eps_0), as a pure function.

  Returns `terms(params, x0, u, rng)`:
    params: {"denoiser": ..., "encoder": ...}; x0: [B, H, W, C] in [-1, 1];
    u: [B] in [0, 1), the time sample (t = max(u, 1e-5); callers stratify u over repeated calls);
    rng: key for eps (diffusion), z ~ q(z | x0) and eps_0 (reconstruction).
  and gives a dict of [B] nats:
    diffusion         w(t) ||eps - eps_hat(x_t, t, z)||^2 with eps_hat guided at `gamma`
                      (= diffusion_no_guidance for with_latent=False);
    diffusion_no_guidance  the same with gamma = 0 and the same t, eps (the denoiser alone);
    prior, reconstruction, latent_kl (0 when with_latent is False);
    total             diffusion + prior + reconstruction + latent_kl;
    total_no_guidance diffusion_no_guidance + prior + reconstruction (the unconditional bound).
  The expectation over u ~ U(0, 1) of `diffusion` is L_diffusion; averaging the returned dicts
  over calls and examples estimates every term of the bound.
  """
  logsnr_0 = schedule.logsnr(jnp.zeros(()))
  logsnr_1 = schedule.logsnr(jnp.ones(()))

  def terms(params, x0: jax.Array, u: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    chex.assert_rank(x0, 4)
    b = x0.shape[0]
    rng_eps, rng_z, rng_rec = jax.random.split(rng, 3)
    # Continuous time, even for a run trained on a grid (num_timesteps > 0): the bound integrates
    # over all of [0, 1].
    t = jnp.maximum(u, 1e-5)
    alpha, sigma = schedule.alpha_sigma(t)
    eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    w = schedule.elbo_weight(t)
    eps_theta = denoiser.apply({"params": params["denoiser"]}, x_t, t, train=False)
    no_guidance = diffusion_nats(eps, eps_theta, w)
    if with_latent:
      def encode_fn(x, tt):
        return encoder.apply({"params": params["encoder"]}, x, tt if time_conditioning else None)
      t_clean = jnp.zeros_like(t) if time_conditioning else None
      mean0, std0 = encode_fn(x0, t_clean)
      z = mean0 + std0 * jax.random.normal(rng_z, mean0.shape, mean0.dtype)
      eps_hat, _ = objective.guided_eps(eps_theta, encode_fn, x_t, t, z, sigma, gamma)
      diffusion = diffusion_nats(eps, eps_hat, w)
      latent_kl = objective.kl_to_standard_normal(mean0, std0)
    else:
      diffusion = no_guidance
      latent_kl = jnp.zeros((b,), jnp.float32)
    prior = prior_nats(x0, logsnr_1)
    recon = reconstruction_nats(x0, jax.random.normal(rng_rec, x0.shape, x0.dtype), logsnr_0)
    return {
        "diffusion": diffusion,
        "diffusion_no_guidance": no_guidance,
        "prior": prior,
        "reconstruction": recon,
        "latent_kl": latent_kl,
        "total": diffusion + prior + recon + latent_kl,
        "total_no_guidance": no_guidance + prior + recon,
    }

  return terms
