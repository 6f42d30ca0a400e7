"""Noise schedules, parameterised by log-SNR: the single source of alpha, sigma, weights and times.

Variance preserving: x_t = alpha_t * x0 + sigma_t * eps with alpha_t^2 + sigma_t^2 = 1, continuous
t in [0, 1] (t = 0 clean, t = 1 pure noise). Everything derives from lambda_t = log(alpha_t^2 /
sigma_t^2): alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A VP noise schedule.

  Attributes:
    kind: "cosine" (Nichol & Dhariwal, offset `cosine_s`) or "linear" (DDPM's linear betas, made
      continuous: beta(t) = T * (beta_start + (beta_end - beta_start) * t) with T = 1000).
    cosine_s: the cosine schedule's offset s.
    beta_start, beta_end: the linear schedule's betas in units of a T = 1000 discretisation.
    logsnr_min, logsnr_max: lambda_t is clipped to this range (the cosine schedule reaches -inf at
      t = 1); the clip keeps alpha, sigma and the ELBO weight finite.
    num_timesteps: 0 for continuous time; T > 0 restricts sampled t to the grid {1/T, ..., 1}.
    time_sampling: "uniform", "antithetic" (stratified: one shared uniform offset, a variance
      reduction from VDM) or "high_noise" (t = u ** high_noise_power, oversampling large t).
    high_noise_power: exponent for "high_noise"; 1.0 is uniform.
  """
  kind: str = "cosine"
  cosine_s: float = 0.008
  beta_start: float = 1e-4
  beta_end: float = 0.02
  logsnr_min: float = -20.0
  logsnr_max: float = 20.0
  num_timesteps: int = 0
  time_sampling: str = "uniform"
  high_noise_power: float = 0.5

  def _logsnr_unclipped(self, t: jax.Array) -> jax.Array:
    if self.kind == "cosine":
      s = self.cosine_s
      u = (t + s) / (1.0 + s) * (math.pi / 2)
      u0 = s / (1.0 + s) * (math.pi / 2)
      # alpha_bar = cos^2(u) / cos^2(u0); lambda = log(alpha_bar / (1 - alpha_bar)).
      alpha_bar = jnp.clip(jnp.cos(u) ** 2 / math.cos(u0) ** 2, 1e-30, 1.0 - 1e-7)
      return jnp.log(alpha_bar) - jnp.log1p(-alpha_bar)
    if self.kind == "linear":
      b0, b1 = self.beta_start * 1000.0, self.beta_end * 1000.0
      integral = b0 * t + 0.5 * (b1 - b0) * t ** 2  # -log alpha_bar
      # lambda = -log(exp(integral) - 1); expm1 keeps precision near t = 0.
      return -jnp.log(jnp.expm1(jnp.maximum(integral, 1e-20)))
    raise ValueError(f"unknown schedule kind {self.kind!r}; use 'cosine' or 'linear'.")

  def logsnr(self, t: jax.Array) -> jax.Array:
    """lambda_t for t of any shape (elementwise), clipped to [logsnr_min, logsnr_max]."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.clip(self._logsnr_unclipped(t), self.logsnr_min, self.logsnr_max)

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t), each of t's shape."""
    lam = self.logsnr(t)
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

  def alpha(self, t: jax.Array) -> jax.Array:
    return self.alpha_sigma(t)[0]

  def sigma(self, t: jax.Array) -> jax.Array:
    return self.alpha_sigma(t)[1]

  def elbo_weight(self, t: jax.Array) -> jax.Array:
    """The continuous-time VDM weight w(t) = -1/2 d lambda_t / dt (>= 0), elementwise in t.

    With this weight, E_t[w(t) ||eps - eps_hat||^2] (t uniform) is the diffusion term of the ELBO
    in nats. Computed with jax.jvp, so it is exact for any schedule (zero where lambda is clipped).
    """
    t = jnp.asarray(t, jnp.float32)
    _, dlam = jax.jvp(self.logsnr, (t,), (jnp.ones_like(t),))
    return -0.5 * dlam

  def sample_t(self, rng: jax.Array, n: int) -> jax.Array:
    """n diffusion times in (0, 1], shape [n], drawn as `time_sampling` says."""
    if self.time_sampling == "antithetic":
      u = jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(n) / n, 1.0)
    elif self.time_sampling in ("uniform", "high_noise"):
      u = jax.random.uniform(rng, (n,))
    else:
      raise ValueError(f"unknown time_sampling {self.time_sampling!r}; use 'uniform', "
                       "'antithetic' or 'high_noise'.")
    if self.time_sampling == "high_noise":
      u = u ** self.high_noise_power
    if self.num_timesteps > 0:
      steps = self.num_timesteps
      return jnp.clip(jnp.ceil(u * steps), 1, steps) / steps
    # Keep t away from exactly 0 so that sigma_t > 0.
    return jnp.maximum(u, 1e-5)


def from_config(config) -> Schedule:
  """The schedule described by `config.diffusion`."""
  d = config.diffusion
  return Schedule(kind=d.schedule, cosine_s=d.cosine_s, beta_start=d.linear_beta_start,
                  beta_end=d.linear_beta_end, logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max,
                  num_timesteps=d.num_timesteps, time_sampling=d.time_sampling,
                  high_noise_power=d.high_noise_power)
