"""The variational bound on -log p(x) in bits per dimension, estimated in log-SNR.

For 8-bit data x (scaled to [-1, 1], D = H * W * C values per image) and a VP diffusion whose
log-SNR runs from lambda_0 = lambda(t=0) down to lambda_1 = lambda(t=1) (the schedule's own clipped
end points):

    -log p(x) <= L_recon + L_diffusion + L_prior (+ extras, e.g. KL(q(z | x) || N(0, I)))

  L_diffusion = 1/2 int_{lambda_1}^{lambda_0} E_eps || eps - eps_hat(x_lambda, lambda) ||^2 dlambda
              = (lambda_0 - lambda_1) / 2 * E_{lambda ~ U[lambda_1, lambda_0], eps}
                  ||eps - eps_hat||^2
                (summed over the D pixels; x_lambda = alpha x + sigma eps with alpha^2 =
                sigmoid(lambda), sigma^2 = sigmoid(-lambda); the network sees t = t(lambda))
  L_prior     = KL( q(x_1 | x) || N(0, I) ),   q(x_1 | x) = N(alpha_1 x, sigma_1^2 I) at lambda_1
  L_recon     = E_eps [ -log p(x | x_0) ],     x_0 = alpha_0 x + sigma_0 eps at lambda_0,
                p(x | x_0) = prod over pixels of the mass that N(x_0 / alpha_0, exp(-lambda_0))
                puts on the 8-bit bin of that pixel's value (bins of width 2/255 centred on the 256
                values; the two end bins extend to -inf and +inf).

The diffusion term is VDM's continuous-time bound (Kingma et al. 2021) with the change of variables
t -> lambda, under which its weight -1/2 dlambda/dt becomes the constant 1/2: lambda is drawn
uniformly (stratified) on exactly [lambda_1, lambda_0], so the three terms tile the log-SNR range
with no gap and the sum is a bound for any eps_hat(x_t, t) (see BoundFn for a latent). An estimate
in t with t clamped away from 0 leaves (lambda(t_min), lambda_0] uncovered and is then not a bound.
For the cosine schedule lambda_0 = 15.94 (its cap of alpha^2 at 1 - 2^-23) and lambda_1 =
diffusion.logsnr_min; for the linear one lambda_0 = diffusion.logsnr_max and lambda_1 = lambda(1),
-10.05 with DDPM's betas. VDM computes L_recon with a softmax over the 256 values; we integrate
the Gaussian over each bin instead (DDPM's discretised decoder), which is a proper probability mass
on the 256 values and agrees with VDM's when exp(-lambda_0 / 2) is much smaller than a bin, as it
is at lambda_0 > 12.

Model kinds plug in through `eps_hat_fn` (see `make_bound_fn`); `estimate` runs the Monte Carlo
over batches with a per-image standard error. Everything here is a pure function of arrays; nats
per example unless the name says bits/dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sami_jax import objective
from sami_jax import rngs
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


# ------------------------------------------------------------------------ the bound, in log-SNR

# (params, x_t [B,H,W,C], t [B], x0 [B,H,W,C], rng) -> (eps_hat [B,H,W,C], extras {name: [B] nats})
EpsHatFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array],
                    tuple[jax.Array, dict[str, jax.Array]]]

# The terms every bound function returns; extras from an eps_hat_fn may not reuse these names.
BASE_TERMS = ("diffusion", "prior", "reconstruction")


@dataclasses.dataclass(frozen=True)
class BoundFn:
  """One Monte Carlo sample of every term of the bound, per example (build it with make_bound_fn).

  Call it as `bound_fn(params, x0, u, rng)`:
    params: whatever `eps_hat_fn` reads (passed through untouched).
    x0: [B, H, W, C] 8-bit data scaled to [-1, 1].
    u: [B] in [0, 1): places each example's log-SNR at lambda = lambda_1 + u (lambda_0 - lambda_1),
      so u uniform gives lambda uniform on [lambda_1, lambda_0]; callers stratify u.
    rng: one key; it is split into the diffusion noise eps, the reconstruction noise and a key for
      `eps_hat_fn` the same way for every BoundFn, so two bound functions called with the same
      (x0, u, rng) see the same lambda and eps (paired comparisons, e.g. with and without guidance).
  Returns a dict of [B] float32 nats: "diffusion", "prior", "reconstruction", then one entry per
  extra of `eps_hat_fn`, and "total" (their sum).

  Attributes:
    schedule: the noise schedule; it sets lambda_0 and lambda_1 and maps lambda to the network's t.
    eps_hat_fn: the model's noise prediction, (params, x_t, t, x0, rng) -> (eps_hat, extras).
      x_t [B, H, W, C] = alpha x0 + sigma eps at log-SNR lambda [B], t = schedule.t_from_logsnr(
      lambda) [B] (the network's time input), x0 the clean batch and rng a key for the model's own
      randomness. extras is a dict of [B] nats added into the total (e.g. {"latent_kl": KL(q(z | x0)
      || N(0, I))} for a model that draws z ~ q(z | x0) with rng and guides eps_hat with it), {} for
      none. The sum is a bound on -log p(x0) when eps_hat depends on x0 only through such a latent
      whose KL is among the extras.
    logsnr_0, logsnr_1: the schedule's lambda at t = 0 and t = 1 (Python floats).
  """
  schedule: schedules.Schedule
  eps_hat_fn: EpsHatFn
  logsnr_0: float
  logsnr_1: float

  @property
  def logsnr_range(self) -> tuple[float, float]:
    """(lambda_1, lambda_0): the log-SNR interval the diffusion term integrates over."""
    return self.logsnr_1, self.logsnr_0

  def __call__(self, params, x0: jax.Array, u: jax.Array, rng: jax.Array
               ) -> dict[str, jax.Array]:
    chex.assert_rank(x0, 4)
    b = x0.shape[0]
    chex.assert_shape(u, (b,))
    rng_eps, rng_rec, rng_model = jax.random.split(rng, 3)
    lam = self.logsnr_1 + jnp.asarray(u, jnp.float32) * (self.logsnr_0 - self.logsnr_1)
    # alpha and sigma straight from lambda (not from t): the bound's integrand is exact in lambda
    # whatever the precision of the t handed to the network.
    alpha = jnp.sqrt(jax.nn.sigmoid(lam))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(-lam))[:, None, None, None]
    eps = rngs.normal(rng_eps, x0.shape, jnp.float32)
    x_t = alpha * x0 + sigma * eps
    t = self.schedule.t_from_logsnr(lam)
    eps_hat, extras = self.eps_hat_fn(params, x_t, t, x0, rng_model)
    chex.assert_equal_shape((eps_hat, x0))
    clash = sorted(set(extras) & set(BASE_TERMS + ("total",)))
    if clash:
      raise ValueError(f"eps_hat_fn returned extras named {clash}: those names are the bound's own "
                       "terms; rename the extras (e.g. 'latent_kl').")
    weight = jnp.full((b,), 0.5 * (self.logsnr_0 - self.logsnr_1), jnp.float32)
    out = {
        "diffusion": diffusion_nats(eps, eps_hat, weight),
        "prior": prior_nats(x0, self.logsnr_1),
        "reconstruction": reconstruction_nats(
            x0, rngs.normal(rng_rec, x0.shape, jnp.float32), self.logsnr_0),
    }
    for name, value in extras.items():
      chex.assert_shape(value, (b,))
      out[name] = jnp.asarray(value, jnp.float32)
    out["total"] = sum(out.values())
    return out


def make_bound_fn(schedule: schedules.Schedule, eps_hat_fn: EpsHatFn) -> BoundFn:
  """The per-example terms of the bound for the model behind `eps_hat_fn` (see BoundFn).

  Call it outside jax.jit (it reads the schedule's end points as Python floats); the returned
  function is pure and jit-able.
  """
  logsnr_0 = float(schedule.logsnr(jnp.zeros(())))
  logsnr_1 = float(schedule.logsnr(jnp.ones(())))
  if not logsnr_0 > logsnr_1:
    raise ValueError(f"the schedule's log-SNR must decrease from t = 0 to t = 1; got lambda(0) = "
                     f"{logsnr_0}, lambda(1) = {logsnr_1}: check diffusion.logsnr_min/_max.")
  return BoundFn(schedule=schedule, eps_hat_fn=eps_hat_fn, logsnr_0=logsnr_0, logsnr_1=logsnr_1)


@dataclasses.dataclass(frozen=True)
class BoundEstimate:
  """The bound averaged over images (see `estimate`).

  Attributes:
    bits_per_dim: term -> mean over images, bits per dimension.
    bits_per_dim_stderr: term -> its standard error (None for a single image).
    nats: term -> mean over images, nats per example.
    nats_stderr: term -> its standard error (None for a single image).
    num_images: images averaged (padding rows excluded).
    draws: stratified lambda samples per image.
    num_dims: D = H * W * C.
    logsnr_range: (lambda_1, lambda_0), the range the diffusion term covers.
    per_image_nats: term -> [num_images] float64, each image's average over its draws, in the
      order the batches gave them (for paired comparisons; not in as_dict).
  """
  bits_per_dim: dict[str, float]
  bits_per_dim_stderr: dict[str, float | None]
  nats: dict[str, float]
  nats_stderr: dict[str, float | None]
  num_images: int
  draws: int
  num_dims: int
  logsnr_range: tuple[float, float]
  per_image_nats: dict[str, np.ndarray] = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, Any]:
    """A JSON-ready dict of everything but per_image_nats."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    del d["per_image_nats"]
    d["logsnr_range"] = None if self.logsnr_range is None else list(self.logsnr_range)
    return d


@dataclasses.dataclass(frozen=True)
class DecoderBoundFn:
  """The bound of a VAE with a one-shot decoder (beta_vae), one z draw per call:

      -log p(x) <= E_{z ~ q(z|x)} [ -log p(x | z) ] + KL(q(z | x) || N(0, I)),

  with p(x | z) the discretised Gaussian N(decoder(z), obs_std^2) on each pixel's 8-bit bin
  (`discretized_gaussian_nll`), the likelihood the model is trained with, made a probability mass
  on the 256 values. Same call signature as BoundFn (u is unused: there is no noise level), so
  `estimate` averages its terms over `draws` samples of z per image.

  Attributes:
    posterior_fn: (params, x0 [B,H,W,C]) -> (mean, std) [B, d], the encoder's q(z | x0).
    decoder_fn: (params, z [B, d]) -> [B, H, W, C] the decoder's mean image (unclipped).
    obs_std: the likelihood's standard deviation (model.decoder.obs_std), [-1, 1] units.
  Returns of a call: {"reconstruction", "latent_kl", "total"}, each [B] nats.
  """
  posterior_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  decoder_fn: Callable[[Any, jax.Array], jax.Array]
  obs_std: float

  logsnr_range = None  # no diffusion: nothing is integrated over a log-SNR range

  def __call__(self, params, x0: jax.Array, u: jax.Array, rng: jax.Array
               ) -> dict[str, jax.Array]:
    del u
    chex.assert_rank(x0, 4)
    mean, std = self.posterior_fn(params, x0)
    z = mean + std * rngs.normal(rng, mean.shape, mean.dtype)
    rec = discretized_gaussian_nll(x0, self.decoder_fn(params, z), math.log(self.obs_std))
    kl = objective.kl_to_standard_normal(mean, std)
    return {"reconstruction": rec, "latent_kl": kl, "total": rec + kl}


def _draw_average_fn(bound_fn: BoundFn, draws: int):
  """jit(params, x0, key) -> {term: [B] average over `draws` stratified lambda samples}.

  Cached per (bound_fn, draws), so that repeated estimates reuse the compiled function; a bound_fn
  that cannot be hashed (an unhashable eps_hat_fn) gets a fresh one.
  """
  try:
    return _cached_draw_average_fn(bound_fn, draws)
  except TypeError:
    return _draw_average_fn_uncached(bound_fn, draws)


def _draw_average_fn_uncached(bound_fn: BoundFn, draws: int):

  def run(params, x0, key):
    b = x0.shape[0]
    k_offset, k_mc = jax.random.split(key)
    # Stratified, with one uniform offset per image shared by its draws: draw j lies at
    # (j + offset) / draws, an evenly spaced grid with a random shift (VDM's "antithetic" times).
    # Each u is uniform, so an image's average is unbiased; and the shifted grid integrates the
    # integrand, smooth and near 0 at both ends of the range, far better than independent offsets
    # per stratum (measured on 8-bit data with an exact denoiser at 8 draws: the variance of an
    # image's average from its spread over lambda falls from 1.68 to 0.37 (bits/dim)^2).
    u = (jnp.arange(draws, dtype=jnp.float32)[:, None]
         + jax.random.uniform(k_offset, (1, b))) / draws
    per_draw = jax.lax.map(lambda a: bound_fn(params, x0, a[0], a[1]),
                           (u, jax.random.split(k_mc, draws)))
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), per_draw)

  return jax.jit(run)


_cached_draw_average_fn = functools.lru_cache(maxsize=32)(_draw_average_fn_uncached)


def estimate(bound_fn: BoundFn, params, batches: Iterable[tuple[Any, Any]], *, draws: int,
             key: jax.Array) -> BoundEstimate:
  """Estimates every term of the bound over a set of images, with standard errors.

  Each image gets `draws` stratified lambda samples, evenly spaced with a random shift of its own
  (u_j = (j + offset) / draws), each with its own eps; its terms are averaged over them. The
  standard error of each term is that of the mean over images of these per-image averages (images
  are independent), so it covers both the spread of the bound across images and the Monte Carlo
  noise.

  Args:
    bound_fn: from make_bound_fn.
    params: passed to bound_fn.
    batches: yields (x0 [B, H, W, C] in [-1, 1], mask [B] bool); rows with mask False (padding of
      a last partial batch) are computed and dropped. Keep B fixed: one compiled shape per B.
    draws: stratified lambda samples per image (>= 1).
    key: the estimate is a deterministic function of key and the batches; batch i uses
      fold_in(key, i).
  Returns:
    A BoundEstimate.
  """
  if draws < 1:
    raise ValueError(f"draws must be >= 1 (lambda samples per image); got {draws}.")
  fn = _draw_average_fn(bound_fn, int(draws))
  per_image: dict[str, list[np.ndarray]] = {}
  num_dims = None
  for i, (x0, mask) in enumerate(batches):
    x0 = jnp.asarray(x0, jnp.float32)
    mask = np.asarray(mask, bool)
    chex.assert_rank(x0, 4)
    chex.assert_shape(mask, (x0.shape[0],))
    dims = int(np.prod(x0.shape[1:]))
    if num_dims is not None and dims != num_dims:
      raise ValueError(f"batch {i} has {dims} values per image, earlier batches {num_dims}: "
                       "estimate one image shape at a time.")
    num_dims = dims
    out = jax.device_get(fn(params, x0, jax.random.fold_in(key, i)))
    for name, value in out.items():
      per_image.setdefault(name, []).append(np.asarray(value, np.float64)[mask])
  nats = {k: np.concatenate(v) for k, v in per_image.items()}
  n = len(nats["total"]) if nats else 0
  if n == 0:
    raise ValueError("estimate got no images (no batches, or every mask row False).")
  to_bits = 1.0 / (num_dims * math.log(2.0))
  mean = {k: float(v.mean()) for k, v in nats.items()}
  stderr = {k: float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None for k, v in nats.items()}
  return BoundEstimate(
      bits_per_dim={k: v * to_bits for k, v in mean.items()},
      bits_per_dim_stderr={k: None if v is None else v * to_bits for k, v in stderr.items()},
      nats=mean, nats_stderr=stderr, num_images=n, draws=int(draws), num_dims=num_dims,
      logsnr_range=bound_fn.logsnr_range, per_image_nats=nats)


def paired_difference(a: BoundEstimate, b: BoundEstimate, term: str = "total"
                      ) -> tuple[float, float | None]:
  """(mean, standard error) of a - b for `term`, in bits/dim, image by image.

  For two estimates over the same images with the same key (the same lambda and eps per image,
  see BoundFn), the per-image differences cancel most of the spread across images and draws: the
  standard error of the difference is far below either estimate's own.
  """
  if a.num_images != b.num_images or a.num_dims != b.num_dims:
    raise ValueError("paired_difference needs two estimates over the same images "
                     f"(got {a.num_images} / {b.num_images} images, {a.num_dims} / {b.num_dims} "
                     "dims).")
  d = (a.per_image_nats[term] - b.per_image_nats[term]) / (a.num_dims * math.log(2.0))
  n = len(d)
  return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None)
