"""A small Python API over a trained run: numpy images in, numpy images / latents out.

    import sami_jax
    model = sami_jax.load("/path/to/workdir")          # newest checkpoint, EMA params
    mean, std = model.encode(images)                   # images: uint8 [0, 255] or float [-1, 1]
    recon = model.reconstruct(images)                  # float32 [N, H, W, C] in [-1, 1]
    samples = model.generate(16, seed=0)               # z ~ N(0, I)
    row = model.traverse(images[0], dim=0, values=np.linspace(-2, 2, 7))
    path = model.interpolate(images[0], images[1], n=8)
    png_ready = sami_jax.api.to_uint8(samples)

Images are HWC (one image) or NHWC (a batch); every output has a leading batch axis. The caller
never batches: inputs of any length are split into chunks of at most `model.batch_size` rows.
A chunk shorter than `batch_size` is padded up to the next power of two, so each method compiles
for at most log2(batch_size) + 2 shapes (per number of sampling steps), not once per input length.

Randomness is per row, not per chunk, so results do not depend on how rows are batched: row i of
a call with `seed` starts from the noise image N(0, I) drawn with
`fold_in(fold_in(PRNGKey(seed), 0), i)` and its stochastic sampler steps (DDPM, or DDIM with
eta > 0) use `fold_in(fold_in(PRNGKey(seed), 1), i)`. Traversals and interpolations start every
row from the noise image of row 0, which is what makes their rows comparable. `generate` draws
z from `np.random.default_rng(seed)`, row by row.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sami_jax import rngs
from sami_jax import samplers
from sami_jax.utils import images as images_lib

__all__ = ["Model", "load", "to_uint8"]

# Float inputs may exceed [-1, 1] by this much (rounding in the caller's own conversions) before
# they are taken for another range (e.g. [0, 255] floats) and rejected.
_RANGE_TOLERANCE = 1e-3
# Key purposes folded into PRNGKey(seed) (see the module docstring).
_KEY_INIT_NOISE, _KEY_STEP_NOISE = 0, 1


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] (any shape) -> uint8 [0, 255]; clips, NaN -> 0; uint8 passes."""
  return images_lib.to_uint8(images)


def _bucket(n: int, batch_size: int) -> int:
  """Rows per compiled chunk for n rows: batch_size, or the next power of two below it."""
  if n >= batch_size:
    return batch_size
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _chunks(n: int, batch_size: int):
  """(start, stop, padded_size) triples covering range(n)."""
  size = _bucket(n, batch_size)
  for start in range(0, n, size):
    yield start, min(start + size, n), size


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 up to `size` by repeating the last row (a valid input; outputs are dropped)."""
  if x.shape[0] == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def _pipelined(chunks, dispatch, collect, depth: int = 2) -> None:
  """Runs dispatch(start, stop, size) per chunk and collect(start, stop, result) in order.

  Up to `depth` chunks are in flight: jax dispatches asynchronously, so the host prepares and
  transfers chunk k + 1 while the device computes chunk k, and device memory holds at most
  `depth` chunks whatever the input length.
  """
  queue: collections.deque = collections.deque()
  for start, stop, size in chunks:
    queue.append((start, stop, dispatch(start, stop, size)))
    if len(queue) >= depth:
      collect(*queue.popleft())
  while queue:
    collect(*queue.popleft())


class Model:
  """A trained SAMI (or ddpm) model with numpy-in / numpy-out methods.

  Attributes:
    config: the run's config (ml_collections.ConfigDict), as saved with the checkpoint.
    step: the training step of the restored checkpoint.
    params: {"denoiser": ..., "encoder": ...} (the EMA params, as jax arrays on one device).
    batch_size: the largest number of rows sent through a compiled function at once.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, step: int = 0, *,
               batch_size: int = 64):
    """Wraps params for a config (e.g. from `load`, or freshly initialised for benchmarks).

    Args:
      config: a full config (sami_jax.configlib.default_config() with the run's overrides).
      params: {"denoiser": ..., "encoder": ...} matching `config.model`.
      step: the training step the params come from (informational).
      batch_size: rows per compiled call; larger is faster per image and uses more memory.
    """
    # Imported here so `import sami_jax.api` does not pull in the model code's dependencies
    # (flax, orbax, the data pipeline) until a model is actually built.
    from sami_jax import inference  # pylint: disable=g-import-not-at-top
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.config = config
    self.step = int(step)
    self.batch_size = int(batch_size)
    self.params = jax.device_put(params)
    self._comp = inference.components(config)
    self.kind = self._comp.kind.name
    self.image_shape: tuple[int, int, int] = self._comp.image_shape
    self.latent_dim: int = int(config.model.encoder.latent_dim)
    self._has_encoder = self._comp.kind.has_encoder
    # Whether encode() returns a posterior std (False for a deterministic encoder: diffae).
    self.has_posterior = self._comp.kind.has_posterior
    comp = self._comp
    # Jitted once per Model; jax caches one executable per (chunk shape, static args).
    self._encode_chunk = jax.jit(lambda p, x: samplers.encode(
        comp.encoder, p, x, time_conditioning=comp.time_conditioning))
    self._decode_chunk = jax.jit(self._make_decode(), static_argnames=("steps",))

  def __repr__(self) -> str:
    return (f"Model(kind={self.kind!r}, step={self.step}, "
            f"image_shape={self.image_shape}, latent_dim={self.latent_dim}, "
            f"batch_size={self.batch_size})")

  # ------------------------------------------------------------------ compiled pieces

  def _make_decode(self):
    """(params, z [B, d], noise_ids [B], row_ids [B], seed, gamma; steps) -> images [B,H,W,C].

    Each row is sampled on its own (vmap over rows, a batch of one inside): the guidance score of
    a batch is the batch-sum gradient anyway, and per-row keys make the result independent of
    how rows are grouped into chunks.
    """
    from sami_jax import kinds  # pylint: disable=g-import-not-at-top
    comp = self._comp
    s = self.config.sampling
    sampler, eta = s.sampler, float(s.eta)

    def one_row(params, z, noise_id, row_id, seed, gamma, steps):
      if not comp.kind.is_diffusion:  # a one-shot decoder: no noise, no steps
        return samplers.decoder_mean(comp.image_model, params, z[None])[0]
      base = jax.random.PRNGKey(seed)
      init_key = jax.random.fold_in(jax.random.fold_in(base, _KEY_INIT_NOISE), noise_id)
      step_key = jax.random.fold_in(jax.random.fold_in(base, _KEY_STEP_NOISE), row_id)
      x_init = rngs.normal(init_key, (1,) + comp.image_shape, jnp.float32)
      eps_fn = kinds.eps_fn(comp.kind, comp.image_model, comp.encoder, params, z[None],
                            gamma=gamma, time_conditioning=comp.time_conditioning,
                            schedule=comp.schedule)
      return samplers.sample(eps_fn, comp.schedule, x_init, step_key, steps=steps,
                             sampler=sampler, eta=eta)[0]

    def decode(params, z, noise_ids, row_ids, seed, gamma, *, steps):
      return jax.vmap(one_row, in_axes=(None, 0, 0, 0, None, None, None))(
          params, z, noise_ids, row_ids, seed, gamma, steps)
    return decode

  # ------------------------------------------------------------------ input checks

  def _images(self, images: Any, what: str = "images") -> np.ndarray:
    """Checks uint8 [0, 255] or float [-1, 1] images, HWC or NHWC; returns them as
    [N, H, W, C] in their own dtype (see `_to_float`)."""
    x = np.asarray(images)
    if x.ndim == 3:
      x = x[None]
    if x.ndim != 4:
      hint = (" A grayscale image needs its channel axis: image[..., None]."
              if x.ndim == 2 else "")
      raise ValueError(f"{what}: expected one image [H, W, C] = {list(self.image_shape)} or a "
                       f"batch [N, H, W, C] = [N, {', '.join(map(str, self.image_shape))}]; got "
                       f"shape {list(np.shape(images))}.{hint}")
    s, _, c = self.image_shape
    if tuple(x.shape[1:]) != self.image_shape:
      got = list(x.shape[1:])
      if tuple(x.shape[1:]) == (c, s, s):
        raise ValueError(f"{what}: got shape {list(np.shape(images))}, which looks like channels "
                         f"first (NCHW); this model takes channels last [N, H, W, C] = [N, "
                         f"{', '.join(map(str, self.image_shape))}]. Fix: "
                         "images.transpose(0, 2, 3, 1).")
      if x.shape[-1] != c:
        fix = (f"convert to {'grayscale' if c == 1 else 'RGB'} ({c} channel(s)), e.g. "
               + ("PIL's image.convert('L')" if c == 1 else "PIL's image.convert('RGB')"))
      else:
        fix = (f"resize to {s}x{s} (e.g. sami_jax.data.folder.load_image(path, {s}, {c}), "
               "which also centre-crops)")
      raise ValueError(f"{what}: this model takes images of shape [H, W, C] = "
                       f"{list(self.image_shape)} (data.image_size={s}, data.channels={c}); got "
                       f"{got} (input shape {list(np.shape(images))}). Fix: {fix}.")
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: got dtype {x.dtype}; pass uint8 in [0, 255] (e.g. "
                         "images.astype(np.uint8)) or float in [-1, 1].")
      if x.size:
        # min/max (no copy of the input); NaN propagates into them.
        lo, hi = float(x.min()), float(x.max())
        if np.isnan(lo) or np.isnan(hi):
          raise ValueError(f"{what}: contains NaN values.")
        if lo < -1.0 - _RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
          raise ValueError(f"{what}: float images must be in [-1, 1]; got values in "
                           f"[{lo:.4g}, {hi:.4g}]. Convert [0, 1] floats with x * 2 - 1, or pass "
                           "uint8 [0, 255] images as they are.")
    return x

  @staticmethod
  def _to_float(x: np.ndarray) -> np.ndarray:
    """A checked chunk (uint8 or float) -> float32 in [-1, 1]; per chunk, so a large uint8
    input is never copied to float32 as a whole."""
    if x.dtype == np.uint8:
      return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return np.clip(x.astype(np.float32), -1.0, 1.0)

  def _require_encoder(self, method: str) -> None:
    if not self._has_encoder:
      raise ValueError(
          f"Model.{method} needs an encoder, but this run is an unconditional diffusion model "
          f"(model.kind='ddpm'): its encoder was never trained. Only Model.generate works on it; "
          "to encode, reconstruct, traverse or interpolate, load a SAMI run (model.kind 'sami' or "
          "'sami_frozen', e.g. one trained with configs/celeba_frozen.py from this checkpoint).")

  def _check_steps(self, steps: int | None) -> int:
    if steps is None:  # the run's own setting, as in its training grids
      steps = self.config.sampling.steps
    if int(steps) < 1:
      raise ValueError(f"steps must be >= 1 (reverse diffusion steps), got {steps}.")
    return int(steps)

  def _gamma(self, guidance_scale: float | None) -> np.float32:
    g = self.config.sampling.guidance_scale if guidance_scale is None else guidance_scale
    if not np.isfinite(g):
      raise ValueError(f"guidance_scale must be a finite number (1: the trained guidance, 0: "
                       f"none), got {guidance_scale!r}.")
    return np.float32(g)

  @staticmethod
  def _seed(seed) -> np.uint32:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
        0 <= int(seed) < 2 ** 32):
      raise ValueError(f"seed must be an integer in [0, 2**32), got seed={seed!r}.")
    return np.uint32(seed)

  # ------------------------------------------------------------------ public methods

  def encode(self, images: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Posterior mean and std of q(z | x) for clean images.

    Args:
      images: uint8 [0, 255] or float [-1, 1]; [H, W, C] or [N, H, W, C].
    Returns:
      (mean, std), each float32 [N, d] (N = 1 for a single image). A deterministic encoder
      (model.kind 'diffae', `has_posterior` False) has no posterior: std is None, and mean is its
      latent.
    """
    self._require_encoder("encode")
    x = self._images(images)
    n, d = x.shape[0], self.latent_dim
    mean, std = np.empty((n, d), np.float32), np.empty((n, d), np.float32)

    def collect(start, stop, result):
      mean[start:stop] = np.asarray(result[0])[:stop - start]
      std[start:stop] = np.asarray(result[1])[:stop - start]
    _pipelined(_chunks(n, self.batch_size),
               lambda start, stop, size: self._encode_chunk(
                   self.params, self._to_float(_pad_rows(x[start:stop], size))), collect)
    return mean, (std if self.has_posterior else None)

  def decode(self, z: Any, *, steps: int | None = None, seed: int = 0,
             guidance_scale: float | None = None, shared_noise: bool = False) -> np.ndarray:
    """Images generated under the guidance of given latents.

    Args:
      z: float [N, d] (or [d]) latents.
      steps: reverse diffusion steps of config.sampling.sampler; None: config.sampling.steps
        (the run's own setting).
      seed: the noise seed (per-row keys, see the module docstring).
      guidance_scale: gamma; None uses config.sampling.guidance_scale.
      shared_noise: start every row from the same noise image (traversals, interpolations).
    Returns:
      float32 [N, H, W, C] in [-1, 1].
    """
    steps = self._check_steps(steps)
    seed = self._seed(seed)
    z = np.asarray(z, np.float32)
    if z.ndim == 1:
      z = z[None]
    if not np.all(np.isfinite(z)):
      raise ValueError("z contains NaN or inf values; pass finite latents (e.g. from "
                       "Model.encode).")
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f"z: expected latents [N, {self.latent_dim}] (model.encoder.latent_dim="
                       f"{self.latent_dim}); got shape {list(z.shape)}.")
    n = z.shape[0]
    out = np.empty((n,) + self.image_shape, np.float32)
    rows = np.arange(n, dtype=np.int32)
    noise_ids = np.zeros_like(rows) if shared_noise else rows
    gamma = self._gamma(guidance_scale)

    def collect(start, stop, images):
      out[start:stop] = np.asarray(images)[:stop - start]
    _pipelined(_chunks(n, self.batch_size),
               lambda start, stop, size: self._decode_chunk(
                   self.params, _pad_rows(z[start:stop], size),
                   _pad_rows(noise_ids[start:stop], size), _pad_rows(rows[start:stop], size),
                   seed, gamma, steps=steps), collect)
    return out

  def reconstruct(self, images: Any, steps: int | None = None, seed: int = 0, *,
                  use_mean: bool | None = None,
                  guidance_scale: float | None = None) -> np.ndarray:
    """Encodes images, then generates from their latents (the posterior mean by default).

    Args:
      images: uint8 [0, 255] or float [-1, 1]; [H, W, C] or [N, H, W, C].
      steps: reverse diffusion steps; None: config.sampling.steps.
      seed: noise seed (also for z ~ q(z | x) when use_mean is False).
      use_mean: decode the posterior mean (True) or a sample; None: config.sampling.use_mean.
      guidance_scale: gamma; None uses config.sampling.guidance_scale.
    Returns:
      float32 [N, H, W, C] in [-1, 1].
    """
    self._require_encoder("reconstruct")
    mean, std = self.encode(images)
    use_mean = self.config.sampling.use_mean if use_mean is None else use_mean
    if not use_mean and std is None:
      raise ValueError(f"reconstruct(use_mean=False) samples z ~ q(z | x), but this "
                       f"{self.kind} model's encoder is deterministic; use use_mean=True.")
    z = mean if use_mean else (
        mean + std * np.random.default_rng(self._seed(seed)).standard_normal(
            mean.shape).astype(np.float32))
    return self.decode(z, steps=steps, seed=seed, guidance_scale=guidance_scale)

  def generate(self, n: int, seed: int = 0, steps: int | None = None, *,
               guidance_scale: float | None = None) -> np.ndarray:
    """n new images: z ~ N(0, I), then guided generation (a ddpm model: unguided).

    Returns:
      float32 [n, H, W, C] in [-1, 1].
    """
    if int(n) < 1:
      raise ValueError(f"generate: n must be >= 1, got {n}.")
    z = np.random.default_rng(self._seed(seed)).standard_normal(
        (int(n), self.latent_dim)).astype(np.float32)
    return self.decode(z, steps=steps, seed=seed, guidance_scale=guidance_scale)

  def traverse(self, image: Any, dim: int, values: Sequence[float] | np.ndarray | None = None,
               steps: int | None = None, seed: int = 0, *,
               guidance_scale: float | None = None) -> np.ndarray:
    """Varies latent `dim` of an image's posterior mean, the other dimensions fixed.

    Args:
      image: one image, [H, W, C] (or [1, H, W, C]).
      dim: which latent dimension, 0 <= dim < d.
      values: the values [K] given to that dimension; None: config.sampling.traverse_points
        values evenly spaced in [-traverse_range, traverse_range].
    Returns:
      float32 [K, H, W, C] in [-1, 1]; all rows start from the same noise image.
    """
    self._require_encoder("traverse")
    if not 0 <= int(dim) < self.latent_dim:
      raise ValueError(f"traverse: dim={dim} is out of range; this model has "
                       f"{self.latent_dim} latent dimensions (0 to {self.latent_dim - 1}).")
    if values is None:
      r = self.config.sampling.traverse_range
      values = np.linspace(-r, r, self.config.sampling.traverse_points)
    values = np.asarray(values, np.float32)
    if values.ndim != 1 or values.size < 1:
      raise ValueError(f"traverse: values must be a non-empty 1-D sequence; got shape "
                       f"{list(values.shape)}.")
    mean = self._single(image, "traverse")
    z = np.repeat(mean, values.size, axis=0)
    z[:, int(dim)] = values
    return self.decode(z, steps=steps, seed=seed, guidance_scale=guidance_scale,
                       shared_noise=True)

  def interpolate(self, image_a: Any, image_b: Any, n: int, steps: int | None = None, seed: int = 0, *,
                  guidance_scale: float | None = None) -> np.ndarray:
    """n images along the straight line between two images' posterior means, ends included.

    Returns:
      float32 [n, H, W, C] in [-1, 1]; all rows start from the same noise image.
    """
    self._require_encoder("interpolate")
    if int(n) < 2:
      raise ValueError(f"interpolate: n must be >= 2 (the two end points), got {n}.")
    za = self._single(image_a, "interpolate: image_a")[0]
    zb = self._single(image_b, "interpolate: image_b")[0]
    w = np.linspace(0.0, 1.0, int(n), dtype=np.float32)[:, None]
    z = (1.0 - w) * za[None] + w * zb[None]
    return self.decode(z, steps=steps, seed=seed, guidance_scale=guidance_scale,
                       shared_noise=True)

  def _single(self, image: Any, what: str) -> np.ndarray:
    """Posterior mean [1, d] of exactly one image."""
    x = self._images(image, what)
    if x.shape[0] != 1:
      raise ValueError(f"{what}: expected one image [H, W, C]; got a batch of {x.shape[0]}.")
    return self.encode(x)[0]


def load(workdir: str, step: int | None = None, *, batch_size: int = 64) -> Model:
  """Loads a trained run: the config saved with it and the EMA params of a checkpoint.

  Args:
    workdir: the run's --workdir (or its checkpoints/ folder, or one step's folder in it:
      WORKDIR/checkpoints/6 loads step 6).
    step: which checkpoint; None loads the newest intact one (or the step of the folder given).
    batch_size: rows per compiled call of the returned Model.
  Raises:
    FileNotFoundError: no checkpoint in workdir (or none for that step).
    ValueError: a step's folder with another `step`.
  """
  from sami_jax import inference  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  config, params, restored_step = inference.restore(workdir, step)
  return Model(config, params, restored_step, batch_size=batch_size)

