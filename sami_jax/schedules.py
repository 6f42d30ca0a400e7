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

# The cosine schedule's alpha_bar is held in [1e-30, 1 - 2^-23] (its lambda in [FLOOR, CAP]):
# 1 - 2^-23 is the float32 value of the 1 - 1e-7 it was first clipped at, which puts lambda(t = 0)
# at 15.94 rather than +inf. Kept as it is so that models trained with it see the same inputs.
_COSINE_ALPHA_BAR_GAP = 2.0 ** -23
_COSINE_LOGSNR_CAP = math.log1p(-_COSINE_ALPHA_BAR_GAP) - math.log(_COSINE_ALPHA_BAR_GAP)
_COSINE_LOGSNR_FLOOR = math.log(1e-30) - math.log1p(-1e-30)


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
    time_sampling: how training draws t (see `sample_times`): "uniform", "antithetic"
      (stratified: one shared uniform offset, a variance reduction from VDM), "high_noise"
      (t = u ** high_noise_power, oversampling large t), "logsnr" (lambda uniform on the
      schedule's range [logsnr(1), logsnr(0)], t = t_from_logsnr(lambda)) or "mixture" (each
      t from "high_noise" with probability mixture_high_noise, else from "logsnr": the highest
      noise levels oversampled while every noise level, the lowest included, stays in play).
    high_noise_power: exponent for "high_noise" (and the mixture's high-noise part); 1.0 is
      uniform.
    mixture_high_noise: the mixture's probability of the high-noise part, in [0, 1].
    importance_weighting: weight each drawn t by 1 / q(t), q the density it was drawn from, so
      that the training objective is the same expectation over t ~ U(0, 1) whatever the sampling
      (the ELBO stays the ELBO); without it, "high_noise", "logsnr" and "mixture" change what is
      optimised.
    guidance_weighting: gamma(t), the weight of the guidance correction at time t (`guidance_
      weight`), the same in training and sampling: "constant" (1), "sigma_power" (sigma_t **
      guidance_power: the correction fades at low noise) or "cutoff" (1 where sigma_t >=
      guidance_cutoff_sigma, 0 below: no guidance at the lowest noise levels).
    guidance_power, guidance_cutoff_sigma: the parameters of those.
    guidance_std_gradient: the guidance includes the x-derivative through the posterior std
      (True: the exact score of q) or comes from the mean alone (objective.guidance_score).
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
  mixture_high_noise: float = 0.5
  importance_weighting: bool = False
  guidance_weighting: str = "constant"
  guidance_power: float = 1.0
  guidance_cutoff_sigma: float = 0.0
  guidance_std_gradient: bool = True

  def _cosine_consts(self) -> tuple[float, float, float]:
    """(c, cos(s c), sin(s c)) with c = pi / (2 (1 + s)): u_t = (t + s) c is the cosine's angle."""
    c = math.pi / (2.0 * (1.0 + self.cosine_s))
    return c, math.cos(self.cosine_s * c), math.sin(self.cosine_s * c)

  def _logsnr_range(self) -> tuple[float, float]:
    """The interval lambda is clipped to: [logsnr_min, logsnr_max], narrowed by the kind's cap."""
    lo, hi = self.logsnr_min, self.logsnr_max
    if self.kind == "cosine":
      lo, hi = max(lo, _COSINE_LOGSNR_FLOOR), min(hi, _COSINE_LOGSNR_CAP)
    return lo, hi

  def _logsnr_unclipped(self, t: jax.Array) -> jax.Array:
    if self.kind == "cosine":
      # alpha_bar = cos^2(u_t) / cos^2(u_0). Written with sines of the small angles (1 - t) c,
      # t c and (t + 2 s) c, so that neither 1 - alpha_bar near t = 0 nor alpha_bar near t = 1
      # comes from a float32 difference:
      #   alpha_bar     = sin^2((1 - t) c) / cos^2(s c)
      #   1 - alpha_bar = sin(t c) sin((t + 2 s) c) / cos^2(s c).
      # The floors keep log(0) (and its infinite derivative, which jax.jvp would turn into NaN
      # through the clip) away from t = 0 and t = 1.
      c, _, _ = self._cosine_consts()
      s = self.cosine_s
      sin_far = jnp.sin(jnp.maximum(1.0 - t, 1e-30) * c)
      sin_near = jnp.sin(jnp.maximum(t, 1e-30) * c)
      return 2.0 * jnp.log(sin_far) - jnp.log(sin_near) - jnp.log(jnp.sin((t + 2.0 * s) * c))
    if self.kind == "linear":
      b0, b1 = self.beta_start * 1000.0, self.beta_end * 1000.0
      integral = b0 * t + 0.5 * (b1 - b0) * t ** 2  # -log alpha_bar
      # lambda = -log(exp(integral) - 1); expm1 keeps precision near t = 0.
      return -jnp.log(jnp.expm1(jnp.maximum(integral, 1e-20)))
    raise ValueError(f"unknown schedule kind {self.kind!r}; use 'cosine' or 'linear'.")

  def logsnr(self, t: jax.Array) -> jax.Array:
    """lambda_t for t of any shape (elementwise), clipped to [logsnr_min, logsnr_max].

    The cosine schedule is further capped where alpha_bar = 1 - 2^-23 (lambda = 15.94, the float32
    rounding of the 1 - 1e-7 it has always been clipped at), which is its value at t = 0.
    """
    t = jnp.asarray(t, jnp.float32)
    lo, hi = self._logsnr_range()
    return jnp.clip(self._logsnr_unclipped(t), lo, hi)

  def t_from_logsnr(self, lam: jax.Array) -> jax.Array:
    """The time t in [0, 1] with logsnr(t) = lam: the inverse of `logsnr`, elementwise, float32.

    Exact (closed form) inside the clip range [logsnr(1), logsnr(0)]; lam outside it is first
    clipped into it. Where `logsnr` itself is flat (clipped: t near 0 for the cosine schedule,
    t near 1 when logsnr_min cuts it off), the result is the end of that flat stretch nearest the
    unclipped part, e.g. t_from_logsnr(logsnr(0)) is about 3e-6 for the default cosine schedule.

    Args:
      lam: log-SNR values, any shape.
    Returns:
      t of lam's shape.
    """
    lam = jnp.asarray(lam, jnp.float32)
    lo, hi = self._logsnr_range()
    lam = jnp.clip(lam, lo, hi)
    if self.kind == "cosine":
      # With u the angle (cos^2 u = alpha_bar cos^2 u_0), t c = u - u_0 = atan2(sin(u - u_0),
      # cos(u - u_0)). sin(u - u_0) is rewritten without the cancellation of sin u cos u_0 -
      # cos u sin u_0 (its numerator reduces to (1 - alpha_bar) (sin^2 + cos^2) u_0):
      #   sin(u - u_0) = cos u_0 sigmoid(-lam) / (sin u + sqrt(alpha_bar) sin u_0)
      #   cos(u - u_0) = cos^2 u_0 sqrt(alpha_bar) + sin u sin u_0
      # with sin u = sqrt(sin^2 u_0 + cos^2 u_0 sigmoid(-lam)).
      c, cos0, sin0 = self._cosine_consts()
      alpha_bar, one_minus = jax.nn.sigmoid(lam), jax.nn.sigmoid(-lam)
      sqrt_ab = jnp.sqrt(alpha_bar)
      sin_u = jnp.sqrt(sin0 ** 2 + cos0 ** 2 * one_minus)
      num = cos0 * one_minus / (sin_u + sqrt_ab * sin0)
      den = cos0 ** 2 * sqrt_ab + sin_u * sin0
      t = jnp.arctan2(num, den) / c
    elif self.kind == "linear":
      # -log alpha_bar = softplus(-lam) = b0 t + (b1 - b0) t^2 / 2, solved for t >= 0 in the form
      # without the cancellation of -b0 + sqrt(b0^2 + 2 (b1 - b0) I).
      b0, b1 = self.beta_start * 1000.0, self.beta_end * 1000.0
      integral = jax.nn.softplus(-lam)
      t = 2.0 * integral / (b0 + jnp.sqrt(b0 ** 2 + 2.0 * (b1 - b0) * integral))
    else:
      raise ValueError(f"unknown schedule kind {self.kind!r}; use 'cosine' or 'linear'.")
    return jnp.clip(t, 0.0, 1.0)

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

  def guidance_weight(self, t: jax.Array) -> jax.Array:
    """gamma(t), the weight of the guidance correction -sigma_t g_t at time t (elementwise).

    Multiplies the guidance scale in training and sampling alike (objective.guided_eps).
    """
    t = jnp.asarray(t, jnp.float32)
    if self.guidance_weighting == "constant":
      return jnp.ones_like(t)
    sigma = self.sigma(t)
    if self.guidance_weighting == "sigma_power":
      return sigma ** self.guidance_power
    if self.guidance_weighting == "cutoff":
      return (sigma >= self.guidance_cutoff_sigma).astype(jnp.float32)
    raise ValueError(f"unknown guidance_weighting {self.guidance_weighting!r}; use 'constant', "
                     "'sigma_power' or 'cutoff'.")

  def sample_t(self, rng: jax.Array, n: int) -> jax.Array:
    """n diffusion times in [0, 1], shape [n], drawn as `time_sampling` says."""
    return self.sample_times(rng, n, "simple")[0]

  def sample_times(self, rng: jax.Array, n: int, weighting: str
                   ) -> tuple[jax.Array, jax.Array]:
    """n training times and the loss weight of each: (t [n], weight [n]).

    The diffusion term of the loss is weight * ||eps - eps_hat||^2 (mean over pixels). weighting
    is "simple" (w = 1) or "elbo" (w = -1/2 dlambda/dt, `elbo_weight`); with
    importance_weighting the weight also carries 1 / q(t), so that E[weight ||.||^2] equals
    E_{t ~ U(0, 1)}[w(t) ||.||^2] whatever q is. For "logsnr" with the "elbo" weighting the
    product is the constant (lambda_0 - lambda_1) / 2 (lambda uniform on its range, as in the
    bound of evaluation/elbo.py): the ELBO with far less variance than t ~ U(0, 1) gives it.
    ("high_noise" with importance weighting is unbiased too, but with the "elbo" weighting its
    weight ~ 1/t * 1/q(t) at small t has an infinite variance: use "logsnr" for the ELBO, or
    "mixture", whose logsnr part keeps the weight below (lambda_0 - lambda_1) / (2 (1 - f)).)
    """
    if weighting not in ("simple", "elbo"):
      raise ValueError(f"unknown weighting {weighting!r}; use 'simple' or 'elbo'.")
    kind = self.time_sampling
    if kind == "mixture":
      return self._sample_mixture(rng, n, weighting)
    if kind == "logsnr":
      lam1, lam0 = self.logsnr_range()
      lam = lam1 + jax.random.uniform(rng, (n,)) * (lam0 - lam1)
      t = self.t_from_logsnr(lam)
      if not self.importance_weighting:
        w = self.elbo_weight(t) if weighting == "elbo" else jnp.ones_like(t)
        return t, w
      if weighting == "elbo":
        return t, jnp.full((n,), 0.5 * (lam0 - lam1), jnp.float32)
      # simple: w = 1, divided by q(t) = |dlambda/dt| / (lambda_0 - lambda_1).
      return t, (lam0 - lam1) / jnp.maximum(2.0 * self.elbo_weight(t), 1e-20)
    if kind == "antithetic":
      u = jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(n) / n, 1.0)
    elif kind in ("uniform", "high_noise"):
      u = jax.random.uniform(rng, (n,))
    else:
      raise ValueError(f"unknown time_sampling {kind!r}; use 'uniform', 'antithetic', "
                       "'high_noise', 'logsnr' or 'mixture'.")
    inv_q = jnp.ones((n,), jnp.float32)
    if kind == "high_noise":
      p = self.high_noise_power
      v = jnp.maximum(u, 1e-12)
      if self.importance_weighting:  # t = u^p has density q(t) = t^(1/p - 1) / p
        inv_q = p * v ** (p - 1.0)
      u = v ** p
    if self.num_timesteps > 0:
      steps = self.num_timesteps
      t = jnp.clip(jnp.ceil(u * steps), 1, steps) / steps
    else:
      # Keep t away from exactly 0 so that sigma_t > 0.
      t = jnp.maximum(u, 1e-5)
    w = self.elbo_weight(t) if weighting == "elbo" else jnp.ones_like(t)
    return t, w * inv_q

  def _sample_mixture(self, rng: jax.Array, n: int, weighting: str
                      ) -> tuple[jax.Array, jax.Array]:
    """"mixture": t = u ** p with probability f (= mixture_high_noise), else lambda uniform.

    Its density is q(t) = f t^(1/p - 1) / p + (1 - f) |dlambda/dt| / (lambda_0 - lambda_1), which
    importance weighting divides by.
    """
    rng_pick, rng_high, rng_lam = jax.random.split(rng, 3)
    f, p = self.mixture_high_noise, self.high_noise_power
    lam1, lam0 = self.logsnr_range()
    t_lam = self.t_from_logsnr(lam1 + jax.random.uniform(rng_lam, (n,)) * (lam0 - lam1))
    t_high = jnp.maximum(jax.random.uniform(rng_high, (n,)), 1e-12) ** p
    t = jnp.where(jax.random.uniform(rng_pick, (n,)) < f, t_high, t_lam)
    t = jnp.maximum(t, 1e-5)  # sigma_t > 0
    ew = self.elbo_weight(t)
    w = ew if weighting == "elbo" else jnp.ones_like(t)
    if self.importance_weighting:
      q = f * t ** (1.0 / p - 1.0) / p + (1.0 - f) * 2.0 * ew / (lam0 - lam1)
      w = w / jnp.maximum(q, 1e-20)
    return t, w

  def with_draw(self, time_sampling: str, high_noise_power: float, mixture_high_noise: float,
                importance_weighting: bool) -> "Schedule":
    """The same schedule (alpha, sigma, gamma(t)) with another way of drawing training times."""
    return dataclasses.replace(self, time_sampling=time_sampling,
                               high_noise_power=high_noise_power,
                               mixture_high_noise=mixture_high_noise,
                               importance_weighting=importance_weighting)

  def logsnr_range(self) -> tuple[float, float]:
    """(lambda_1, lambda_0) = (logsnr(1), logsnr(0)) as Python floats: the range training with
    "logsnr" sampling and the bound cover. Evaluated eagerly, also while a jitted function
    (the train step) is being traced: they are constants of the schedule."""
    with jax.ensure_compile_time_eval():
      return (float(self.logsnr(jnp.ones((), jnp.float32))),
              float(self.logsnr(jnp.zeros((), jnp.float32))))


def from_config(config) -> Schedule:
  """The schedule described by `config.diffusion` (its time draw: the denoiser's)."""
  d = config.diffusion
  return Schedule(kind=d.schedule, cosine_s=d.cosine_s, beta_start=d.linear_beta_start,
                  beta_end=d.linear_beta_end, logsnr_min=d.logsnr_min, logsnr_max=d.logsnr_max,
                  num_timesteps=d.num_timesteps, time_sampling=d.time_sampling,
                  high_noise_power=d.high_noise_power,
                  mixture_high_noise=d.mixture_high_noise,
                  importance_weighting=d.importance_weighting,
                  guidance_weighting=d.guidance_weighting, guidance_power=d.guidance_power,
                  guidance_cutoff_sigma=d.guidance_cutoff_sigma,
                  guidance_std_gradient=d.guidance_std_gradient)


def encoder_draw(config, schedule: Schedule) -> Schedule | None:
  """The schedule with the encoder term's own time draw (`config.objective.encoder_*`), or None
  when the encoder learns on the denoiser's draw (objective.encoder_time_sampling = "shared")."""
  o = config.objective
  if o.encoder_time_sampling == "shared":
    return None
  return schedule.with_draw(o.encoder_time_sampling, o.encoder_high_noise_power,
                            o.encoder_mixture_high_noise, o.encoder_importance_weighting)
