"""The SAMI objective (conditional ELBO with score guidance), as pure functions.

Nothing here knows about meshes, files or checkpoints: every function maps arrays to arrays.

    eps_hat(x_t, t, z) = eps_theta(x_t, t) - gamma * sigma_t * g_t,
    g_t = grad_{x_t} log q_phi(z | x_t)                       (jax.grad of the batch sum)
    L = E[ w(t) ||eps - eps_hat||^2 + beta * KL(q_phi(z | x0) || N(0, I)) ]
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from sami_jax import rngs
from sami_jax import schedules

# (x [B,H,W,C], t [B] or None) -> (mean [B,d], std [B,d]); params already bound.
EncodeFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """log N(z; mean, diag(std^2)) per example. z, mean, std: [B, d] -> [B] (nats)."""
  chex.assert_equal_shape((z, mean, std))
  return -0.5 * jnp.sum(((z - mean) / std) ** 2 + 2.0 * jnp.log(std) + LOG_2PI, axis=-1)


def kl_to_standard_normal(mean: jax.Array, std: jax.Array) -> jax.Array:
  """KL(N(mean, diag(std^2)) || N(0, I)) in closed form. [B, d] -> [B] (nats)."""
  chex.assert_equal_shape((mean, std))
  return 0.5 * jnp.sum(mean ** 2 + std ** 2 - 1.0 - 2.0 * jnp.log(std), axis=-1)


def guidance_score(encode_fn: EncodeFn, x_t: jax.Array, z: jax.Array,
                   t: jax.Array | None, through_std: bool = True) -> jax.Array:
  """g_t = grad_{x_t} log q_phi(z | x_t), for a whole batch in one reverse pass.

  Examples are independent (no batch coupling in the encoder), so the gradient of the batch *sum*
  of log q gives every example's own score. The log-variance term is kept: std depends on x_t.
  through_std=False leaves out the x-derivative through the std (std(x_t) enters as a value that
  still depends on the params): the guidance then comes from the mean alone. That is not the
  score of q unless the std does not depend on x (model.encoder.std_input="time").

  Args:
    encode_fn: (x, t) -> (mean, std), the encoder with its params bound (differentiable in them).
    x_t: [B, H, W, C] noisy images.
    z: [B, d] latents (held fixed: no gradient flows into z through this call's x-derivative, but
      z keeps its own dependence on the encoder params for the outer gradient).
    t: [B] times, passed to the encoder (which may ignore them).
  Returns:
    [B, H, W, C], the score of log q with respect to x_t.
  """
  if through_std:
    return jax.grad(lambda x: jnp.sum(gaussian_log_prob(z, *encode_fn(x, t))))(x_t)
  # One encoder pass: pull d log q / d mean back to x_t, with a zero cotangent for the std.
  (mean, std), pullback = jax.vjp(lambda x: encode_fn(x, t), x_t)
  d_mean = jax.grad(lambda m: jnp.sum(gaussian_log_prob(z, m, std)))(mean)
  return pullback((d_mean, jnp.zeros_like(std)))[0]


def beta_at(objective_config, step: jax.Array) -> jax.Array:
  """The KL weight beta at a training step (scalar float32).

  "constant": beta_end. "linear": beta_start -> beta_end linearly over beta_warmup_steps.
  "loglinear": the same, linear in log beta. Constant at beta_end afterwards.
  """
  o = objective_config
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(o.beta_warmup_steps, 1), 0.0, 1.0)
  if o.beta_schedule == "constant":
    return jnp.asarray(o.beta_end, jnp.float32)
  if o.beta_schedule == "linear":
    return o.beta_start + frac * (o.beta_end - o.beta_start)
  if o.beta_schedule == "loglinear":
    if o.beta_end <= 0:
      raise ValueError("objective.beta_end must be > 0 for the loglinear beta schedule.")
    return jnp.exp(math.log(o.beta_start) + frac * (math.log(o.beta_end) - math.log(o.beta_start)))
  raise ValueError(f"unknown objective.beta_schedule {o.beta_schedule!r}.")


def diffuse(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """The forward process x_t = alpha_t x0 + sigma_t eps. x0, eps: [B, H, W, C]; alpha, sigma: [B]."""
  chex.assert_equal_shape((x0, eps))
  return alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps


def bind_encoder(encoder, params, time_conditioning: bool) -> EncodeFn:
  """The encoder with its params bound, as (x [B,H,W,C], t [B] or None) -> (mean, std) [B, d].

  t reaches the network only when it is time conditioned (config.model.encoder.time_conditioning);
  otherwise the encoder is blind to the noise level and t is dropped.
  """
  def encode_fn(x, t):
    return encoder.apply({"params": params}, x, t if time_conditioning else None)
  return encode_fn


def encode_clean(encode_fn: EncodeFn, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """q(z | x0) of clean images (t = 0 for a time-conditioned encoder): (mean, std), [B, d]."""
  return encode_fn(x0, jnp.zeros((x0.shape[0],), jnp.float32))


def guided_eps(eps_theta: jax.Array, encode_fn: EncodeFn, x_t: jax.Array, t: jax.Array,
               z: jax.Array, schedule: schedules.Schedule, scale: float | jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """eps_hat = eps_theta - scale * gamma(t) * sigma_t * g_t, gamma(t) the schedule's guidance
  weight (1 unless diffusion.guidance_weighting says otherwise).

  eps_theta, x_t: [B, H, W, C]; t: [B]; z: [B, d]; scale: the guidance scale (scalar).
  Returns (eps_hat, the correction scale * gamma(t) * sigma_t * g_t), both [B, H, W, C].
  """
  g = guidance_score(encode_fn, x_t, z, t, schedule.guidance_std_gradient)
  per_example = scale * schedule.guidance_weight(t) * schedule.sigma(t)
  correction = per_example[:, None, None, None] * g
  return eps_theta - correction, correction


def _batch_mean(per_example: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean over the real rows (batch["mask"], if present, marks them; padding rows count 0)."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.mean(per_example)
  m = mask.astype(jnp.float32)
  return jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)


def _inject_nan(loss: jax.Array, step: jax.Array, nan_step: int) -> jax.Array:
  if nan_step >= 0:  # testing only: exercises the NaN guard end to end.
    return jnp.where(step == nan_step, jnp.nan, loss)
  return loss


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_vae_loss_fn(config, decoder, encoder) -> LossFn:
  """The beta-VAE baseline's loss, same signature as `make_diffusion_loss_fn`'s.

  Per example, normalised per pixel (D pixels):
    [ ||x0 - decoder(z)||^2 / (2 obs_std^2) + vae_beta * KL(q(z|x0) || N(0, I)) ] / D,
  z = mean + std * eta. params: {"decoder": ..., "encoder": ...}. Terms (each [B]): recon_mse
  (mean over pixels of (x0 - decoder(z))^2), kl (nats), posterior_std.
  """
  obs_var = float(config.model.decoder.obs_std) ** 2
  vae_beta = float(config.objective.vae_beta)
  nan_step = config.objective.test_inject_nan_step

  def loss_fn(params, batch, rng, step, *, train: bool = True):
    del train
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    num_pixels = math.prod(x0.shape[1:])
    encode_fn = bind_encoder(encoder, params["encoder"], False)  # clean images only
    mean, std = encode_clean(encode_fn, x0)
    z = mean + std * rngs.normal(rng, mean.shape, mean.dtype)
    x_rec = decoder.apply({"params": params["decoder"]}, z)
    chex.assert_equal_shape((x_rec, x0))
    sq = jnp.sum((x0 - x_rec) ** 2, axis=(1, 2, 3))
    kl = kl_to_standard_normal(mean, std)
    per_example = (0.5 * sq / obs_var + vae_beta * kl) / num_pixels
    loss = _inject_nan(_batch_mean(per_example, batch), step, nan_step)
    return loss, {"recon_mse": sq / num_pixels, "kl": kl,
                  "posterior_std": jnp.mean(std, axis=-1)}

  return loss_fn


LATENT_ROUTES = ("guidance", "adagn", "none")


def _draw(schedule: schedules.Schedule, x0: jax.Array, rng_t: jax.Array, rng_eps: jax.Array,
          weighting: str):
  """One draw of the forward process: (t [B], weight [B], eps, x_t [B, H, W, C])."""
  t, w = schedule.sample_times(rng_t, x0.shape[0], weighting)
  alpha, sigma = schedule.alpha_sigma(t)
  eps = rngs.normal(rng_eps, x0.shape, x0.dtype)
  return t, w, eps, diffuse(x0, eps, alpha, sigma)


def _sq_err(eps: jax.Array, pred: jax.Array) -> jax.Array:
  """Mean over pixels of (eps - pred)^2: [B, H, W, C] -> [B]."""
  return jnp.mean((eps - pred) ** 2, axis=(1, 2, 3))


def make_diffusion_loss_fn(config, denoiser, encoder, schedule: schedules.Schedule, *,
                           latent: str, frozen_denoiser: bool = False,
                           time_conditioning: bool = False) -> LossFn:
  """Builds the pure loss `(params, batch, rng, step, *, train=True) -> (loss, per-example terms)`
  of a diffusion model whose latent reaches the denoiser by `latent`:

    "guidance"  SAMI: eps_hat = eps_theta(x_t, t) - gamma(t) sigma_t grad_x log q(z | x_t),
                z ~ q(z | x0), plus beta * KL(q(z | x0) || N(0, I)). Who learns from which term
                (config.objective.denoiser_loss; SAMI.md):
                  "guided" (joint): loss = w ||eps - eps_hat||^2 + beta KL, for both nets, on
                    one draw (diffusion.*);
                  "unconditional" (split): loss = w ||eps - eps_theta||^2 at the denoiser's draw
                    + w_e ||eps_e - eps_hat_e||^2 with eps_theta held fixed (stop-gradient) at
                    the encoder's draw (objective.encoder_*, or the same draw when "shared")
                    + beta KL. The denoiser's gradient is then exactly the ddpm kind's.
                frozen_denoiser (sami_frozen): the split's encoder term alone (+ beta KL).
  time_conditioning: the encoder takes t (kinds.encoder_time_conditioning decides).
    "adagn"     DiffAE: eps_hat = eps_theta(x_t, t, cond=mean(x0)) (a deterministic encoder
                feeding adaptive group norm; no KL, no guidance).
    "none"      plain DDPM/VDM: eps_hat = eps_theta(x_t, t).

  params: {"denoiser": ..., "encoder": ...}; batch["image"]: [B, H, W, C] in [-1, 1]; an optional
  batch["mask"]: [B] bool marks real rows (padding in evaluation). rng: a key used only for this
  step (the caller folds in the step). The loss is normalised per pixel so that it is of order 1
  (0.5 * ... is not applied: with the "simple" weighting the diffusion term is the mean squared error
  of the noise prediction). Terms (each [B]; only those the route has):
    diffusion: what the loss minimises of the noise prediction: weight * mean over pixels of
               ||eps - eps_hat||^2 (guided), or the sum of the split's two terms; weight = w(t)
               (and 1 / q(t) with importance weighting; Schedule.sample_times)   (every route)
    mse_uncond: mean over pixels of ||eps - eps_theta||^2 (the denoiser alone), on the
                encoder's draw                                               (guidance)
    guidance_gain: mse_uncond minus the guided prediction's MSE on the same draw: > 0 when the
                   latent improves the noise prediction                      (guidance)
    kl: KL(q(z|x0) || N(0, I)) in nats                                       (guidance)
    guidance_norm: RMS over pixels of gamma(t) * sigma_t * g_t               (guidance)
    posterior_std: mean over latent dims of std(x0)                           (guidance)
    t: the sampled times (the encoder's draw for guidance)                    (every route)
  """
  if latent not in LATENT_ROUTES:
    raise ValueError(f"latent={latent!r} is not one of {LATENT_ROUTES}.")
  weighting = config.diffusion.weighting
  gamma = config.diffusion.guidance_scale
  nan_step = config.objective.test_inject_nan_step
  # Whether the denoiser learns from the guided loss (joint) or from the plain loss (split).
  split = latent == "guidance" and (frozen_denoiser
                                    or config.objective.denoiser_loss == "unconditional")
  encoder_schedule = schedules.encoder_draw(config, schedule) if split else None
  encoder_weighting = config.objective.encoder_weighting

  def loss_fn(params: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array,
              step: jax.Array, *, train: bool = True):
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    num_pixels = math.prod(x0.shape[1:])
    rng_t, rng_eps, rng_z, rng_drop = jax.random.split(rng, 4)
    t, w, eps, x_t = _draw(schedule, x0, rng_t, rng_eps, weighting)

    den_params = params["denoiser"]
    if frozen_denoiser:
      den_params = jax.lax.stop_gradient(den_params)
    encode_fn = bind_encoder(encoder, params["encoder"], time_conditioning)
    cond = {"cond": encode_clean(encode_fn, x0)[0]} if latent == "adagn" else {}
    denoise = lambda x, tt, p=den_params, **kw: denoiser.apply(
        {"params": p}, x, tt, train=train, rngs={"dropout": rng_drop}, **kw)

    if latent != "guidance":
      eps_theta = denoise(x_t, t, **cond)
      chex.assert_equal_shape((eps_theta, x0))
      diffusion = w * _sq_err(eps, eps_theta)
      loss = _inject_nan(_batch_mean(diffusion, batch), step, nan_step)
      return loss, {"t": t, "diffusion": diffusion}

    mean0, std0 = encode_clean(encode_fn, x0)
    z = mean0 + std0 * rngs.normal(rng_z, mean0.shape, mean0.dtype)
    kl = kl_to_standard_normal(mean0, std0)
    denoiser_term = jnp.zeros_like(t)
    if not split:  # guided: both nets learn from the guided loss on this draw
      eps_theta = denoise(x_t, t)
      t_e, w_e, eps_e, x_te = t, w, eps, x_t
    else:
      if not frozen_denoiser:  # the plain diffusion loss trains the denoiser
        eps_den = denoise(x_t, t)
        denoiser_term = w * _sq_err(eps, eps_den)
      if encoder_schedule is None:  # "shared": the encoder learns on the denoiser's draw
        t_e, w_e, eps_e, x_te = t, w, eps, x_t
        eps_theta = eps_den if not frozen_denoiser else denoise(x_t, t)
      else:
        t_e, w_e, eps_e, x_te = _draw(encoder_schedule, x0,
                                      *jax.random.split(jax.random.fold_in(rng, 1)),
                                      encoder_weighting)
        eps_theta = denoise(x_te, t_e)
      eps_theta = jax.lax.stop_gradient(eps_theta)
    chex.assert_equal_shape((eps_theta, x0))
    eps_hat, correction = guided_eps(eps_theta, encode_fn, x_te, t_e, z, schedule, gamma)
    mse_uncond, mse_guided = _sq_err(eps_e, eps_theta), _sq_err(eps_e, eps_hat)
    diffusion = denoiser_term + w_e * mse_guided
    per_example = diffusion + beta_at(config.objective, step) * kl / num_pixels
    terms = {"t": t_e, "diffusion": diffusion, "mse_uncond": mse_uncond,
             "guidance_gain": mse_uncond - mse_guided, "kl": kl,
             "guidance_norm": jnp.sqrt(jnp.mean(correction ** 2, axis=(1, 2, 3))),
             "posterior_std": jnp.mean(std0, axis=-1)}
    loss = _inject_nan(_batch_mean(per_example, batch), step, nan_step)
    return loss, terms

  return loss_fn
