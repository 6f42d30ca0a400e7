"""A DiffAE-style latent prior: a small MLP diffusion model over encoded latents z in R^d.

`--mode=sample --config.sampling.prior=latent_diffusion` draws z from this model instead of
N(0, I): the aggregate posterior of a trained encoder is generally not N(0, I), so latents drawn
from the prior it was (weakly) pulled towards land off the data manifold. As in Diffusion
Autoencoders (Preechakul et al. 2022), the encoded training latents are standardised
per-dimension, an eps-prediction MLP is fitted to them with the simple (unweighted) eps-MSE loss,
and new latents are drawn with deterministic DDIM and de-standardised.

The noise schedule is `schedules.from_config(config)` (config.diffusion), the same one the image
model uses; the sizes and optimiser settings are config.latent_prior.*.

Everything here is a pure function of its arguments except `save` / `load`, which write / read one
msgpack file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sami_jax import rngs
from sami_jax import samplers
from sami_jax import schedules
from sami_jax.models import layers

# The training loop runs this many optimiser steps per jitted call (one lax.scan); the last call
# runs the remainder (a second compilation only when num_steps is not a multiple of it).
_CHUNK_STEPS = 500
# final_loss is the mean training loss over this many last steps.
_FINAL_LOSS_STEPS = 100
_STD_FLOOR = 1e-6


class LatentDenoiser(nn.Module):
  """eps_theta(z_t, t) for latents: z [B, d], t [B] -> eps [B, d].

  A pre-activation residual MLP without normalisation: z is projected to `width` units, then
  `depth` residual blocks h <- h + Dense(SiLU(h + Dense_i(temb))) follow, where temb is the time
  embedding (sinusoidal features of 1000 t -> Dense -> SiLU -> Dense, `layers.TimeEmbedding`) and
  each block adds its own projection of it (additive time conditioning on every hidden layer).
  The output layer SiLU -> Dense(d) is zero-initialised.

  The MLP output F is combined with a skip: eps = sigma_t * z_t + alpha_t * F (so F is the
  v-prediction, v = alpha_t eps - sigma_t z_0). With unclipped DDIM the first step computes
  z0_hat = (z_1 - sigma_1 eps) / alpha_1 with alpha_1 ~ 5e-5 (cosine schedule, log-SNR clipped at
  -20), which turns a plain MLP's small eps error at t = 1 into a huge z0 error; with the skip,
  z0_hat = alpha_t z_t - sigma_t F stays bounded. At init (F = 0) eps = sigma_t z_t, the exact
  noise prediction for N(0, I) data, i.e. the untrained prior is the standardised Gaussian. The
  loss is still the plain eps-MSE.

  Attributes:
    latent_dim: d, the size of the latents.
    width: hidden units of every layer.
    depth: number of hidden (residual) layers.
    schedule: the noise schedule giving alpha_t, sigma_t for the skip; `fit` / `sample` / `load`
      pass `schedules.from_config(config)` (the default equals the default config's schedule).
  """
  latent_dim: int
  width: int = 256
  depth: int = 4
  schedule: schedules.Schedule = schedules.Schedule()

  @nn.compact
  def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
    """z: [B, d], t: [B] in [0, 1] -> [B, d] the noise prediction (float32)."""
    if z.ndim != 2 or z.shape[-1] != self.latent_dim:
      raise ValueError(f"LatentDenoiser expects z of shape [B, {self.latent_dim}], got {z.shape}.")
    z = z.astype(jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    temb = layers.TimeEmbedding(self.width, name="time_embedding")(t)
    h = nn.Dense(self.width, name="input")(z)
    for i in range(self.depth):
      r = nn.silu(h + nn.Dense(self.width, name=f"time_proj_{i}")(temb))
      h = h + nn.Dense(self.width, name=f"hidden_{i}")(r)
    v = nn.Dense(self.latent_dim, kernel_init=nn.initializers.zeros, name="output")(nn.silu(h))
    alpha, sigma = self.schedule.alpha_sigma(t)
    return sigma[:, None] * z + alpha[:, None] * v


@dataclasses.dataclass
class LatentPrior:
  """A fitted latent prior.

  Attributes:
    params: the LatentDenoiser params (numpy or jax arrays).
    mean: [d] the training latents' mean (latents are standardised before fitting).
    std: [d] their std (floored at 1e-6).
    final_loss: mean training loss over the last 100 steps (fewer if num_steps < 100).
  """
  params: Any
  mean: np.ndarray
  std: np.ndarray
  final_loss: float


def _model(config, latent_dim: int) -> LatentDenoiser:
  lp = config.latent_prior
  return LatentDenoiser(latent_dim=int(latent_dim), width=int(lp.width), depth=int(lp.depth),
                        schedule=schedules.from_config(config))


def _check_latents(latents) -> np.ndarray:
  x = np.asarray(latents)
  if x.ndim != 2:
    raise ValueError(f"latent prior: latents must be a 2-D array [N, d], got shape {x.shape}.")
  if x.shape[0] < 2:
    raise ValueError(f"latent prior: need at least 2 latents to standardise and fit, got "
                     f"{x.shape[0]}.")
  if x.shape[1] < 1:
    raise ValueError(f"latent prior: latents have no dimensions (shape {x.shape}).")
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"latent prior: latents must be numeric, got dtype {x.dtype}.")
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.unique(np.nonzero(bad)[0])
    raise ValueError(f"latent prior: latents contain {int(bad.sum())} non-finite values (NaN or "
                     f"inf) in {rows.size} of {x.shape[0]} rows (first bad row {int(rows[0])}); "
                     "has the encoder diverged?")
  return x.astype(np.float64)


def _make_train_chunk(model: LatentDenoiser, schedule: schedules.Schedule,
                      optimizer: optax.GradientTransformation, batch_size: int):
  """A jitted (params, opt_state, data [N, d], key, step0) -> (params, opt_state, losses [n])."""

  def loss_fn(params, x0, key):
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    # t ~ U(0, 1], kept away from 0 so that sigma_t > 0.
    t = jnp.maximum(jax.random.uniform(k_t, (b,)), 1e-5)
    eps = rngs.normal(k_eps, x0.shape, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    eps_hat = model.apply({"params": params}, x_t, t)
    return jnp.mean((eps_hat - eps) ** 2)

  @functools.partial(jax.jit, static_argnames=("num_steps",))
  def train_chunk(params, opt_state, data, key, step0, *, num_steps: int):
    def step(carry, i):
      params, opt_state = carry
      k = jax.random.fold_in(key, step0 + i)
      k_idx, k_loss = jax.random.split(k)
      idx = jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, data[idx], k_loss)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               jnp.arange(num_steps, dtype=jnp.int32))
    return params, opt_state, losses

  return train_chunk


def fit(config, latents: np.ndarray, rng: jax.Array) -> LatentPrior:
  """Fits the latent prior to encoded latents.

  Standardises the latents per dimension, then trains a LatentDenoiser with the simple eps-MSE
  loss (t ~ U(0, 1), schedule `schedules.from_config(config)`), Adam with lr
  config.latent_prior.lr, minibatches of config.latent_prior.batch_size drawn with replacement,
  for config.latent_prior.num_steps steps (chunks of steps run in one jitted lax.scan each).

  Args:
    config: the run config (uses config.diffusion and config.latent_prior).
    latents: [N, d] the encoded training latents (N >= 2, finite).
    rng: PRNG key for the init, the minibatches, the times and the noise.
  Returns:
    The fitted LatentPrior (params as numpy arrays).
  Raises:
    ValueError: latents is not 2-D, has fewer than 2 rows or contains NaN / inf, or the
      latent_prior step count / batch size is not positive.
  """
  x = _check_latents(latents)
  lp = config.latent_prior
  num_steps, batch_size = int(lp.num_steps), int(lp.batch_size)
  if num_steps < 1 or batch_size < 1:
    raise ValueError(f"latent prior: latent_prior.num_steps ({num_steps}) and "
                     f"latent_prior.batch_size ({batch_size}) must be >= 1.")
  mean = x.mean(axis=0)
  std = np.maximum(x.std(axis=0), _STD_FLOOR)
  data = jnp.asarray((x - mean) / std, jnp.float32)

  d = x.shape[1]
  model = _model(config, d)
  schedule = schedules.from_config(config)
  optimizer = optax.adam(float(lp.lr))
  rng_init, rng_train = jax.random.split(rng)
  params = model.init(rng_init, jnp.zeros((1, d), jnp.float32), jnp.zeros((1,), jnp.float32))
  params = params["params"]
  opt_state = optimizer.init(params)
  train_chunk = _make_train_chunk(model, schedule, optimizer, batch_size)

  losses = []
  done = 0
  while done < num_steps:
    n = min(_CHUNK_STEPS, num_steps - done)
    params, opt_state, chunk_losses = train_chunk(params, opt_state, data, rng_train,
                                                  jnp.int32(done), num_steps=n)
    losses.append(chunk_losses)
    done += n
  losses = np.asarray(jnp.concatenate(losses))
  final_loss = float(np.mean(losses[-_FINAL_LOSS_STEPS:]))
  return LatentPrior(params=jax.device_get(params), mean=mean.astype(np.float32),
                     std=std.astype(np.float32), final_loss=final_loss)


@functools.partial(jax.jit, static_argnames=("model", "schedule", "n", "steps"))
def _sample(model: LatentDenoiser, schedule: schedules.Schedule, params, mean, std, rng, *,
            n: int, steps: int) -> jax.Array:
  rng_init, rng_sample = jax.random.split(rng)
  x_init = rngs.normal(rng_init, (n, model.latent_dim), jnp.float32)
  eps_fn = lambda z, t: model.apply({"params": params}, z, t)
  z = samplers.sample(eps_fn, schedule, x_init, rng_sample, steps=steps, sampler="ddim",
                      clip_x0=False)
  return z * std[None] + mean[None]


def sample(config, prior: LatentPrior, n: int, rng: jax.Array) -> jax.Array:
  """n latents from the prior: DDIM (eta 0) from N(0, I), then de-standardised.

  Args:
    config: the run config (config.latent_prior.width / depth must match the fitted prior;
      config.latent_prior.sampling_steps DDIM steps; config.diffusion the schedule).
    prior: a fitted (or loaded) LatentPrior.
    n: number of latents.
    rng: PRNG key for the initial noise.
  Returns:
    [n, d] float32 latents in the original (unstandardised) coordinates.
  """
  mean = jnp.asarray(prior.mean, jnp.float32)
  std = jnp.asarray(prior.std, jnp.float32)
  model = _model(config, mean.shape[0])
  return _sample(model, schedules.from_config(config), prior.params, mean, std, rng, n=int(n),
                 steps=int(config.latent_prior.sampling_steps))


def save(path: str, prior: LatentPrior) -> None:
  """Writes the prior to one msgpack file ({params, mean, std, final_loss}), atomically.

  The bytes go to `path + '.tmp'`, which is then renamed over `path`, so a reader never sees a
  half-written file. The parent directory is created if needed.
  """
  state = {
      "params": jax.tree_util.tree_map(np.asarray, jax.device_get(prior.params)),
      "mean": np.asarray(prior.mean, np.float32),
      "std": np.asarray(prior.std, np.float32),
      "final_loss": float(prior.final_loss),
  }
  data = flax.serialization.msgpack_serialize(state)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _shape_tree(tree) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def load(path: str, latent_dim: int, config) -> LatentPrior:
  """Reads a prior written by `save` and checks it against latent_dim and config.latent_prior.

  Args:
    path: the file.
    latent_dim: d, the latent size the prior must have.
    config: the run config (config.latent_prior.width and depth must match the file).
  Returns:
    The LatentPrior (numpy arrays).
  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is corrupt or truncated, or its shapes do not match latent_dim / width /
      depth; the message says that deleting it makes the next sampling run refit it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"latent prior file {path} does not exist; run --mode=sample "
                            "--config.sampling.prior=latent_diffusion to fit it.")
  remedy = (f"Delete {path}; the next `--mode=sample --config.sampling.prior=latent_diffusion` "
            "run refits it.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on truncated / garbage input.
    raise ValueError(f"latent prior file {path} is damaged (cannot be decoded: "
                     f"{type(e).__name__}: {e}). {remedy}") from e
  if not isinstance(state, dict) or set(state) != {"params", "mean", "std", "final_loss"}:
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"latent prior file {path} is damaged or not a latent prior (contents "
                     f"{keys}, expected params, mean, std, final_loss). {remedy}")

  lp = config.latent_prior
  model = _model(config, latent_dim)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, latent_dim), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
  want = _shape_tree(expected)
  got = _shape_tree(state["params"]) if isinstance(state["params"], dict) else {}
  mean, std = np.asarray(state["mean"]), np.asarray(state["std"])
  if got != want or mean.shape != (latent_dim,) or std.shape != (latent_dim,):
    raise ValueError(f"latent prior file {path} is damaged or from another config: its shapes do "
                     f"not match latent_dim={latent_dim}, latent_prior.width={lp.width}, "
                     f"latent_prior.depth={lp.depth}. {remedy}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError(f"latent prior file {path} is damaged: non-finite mean/std or std <= 0. "
                     f"{remedy}")
  return LatentPrior(params=state["params"], mean=mean.astype(np.float32),
                     std=std.astype(np.float32), final_loss=float(state["final_loss"]))
