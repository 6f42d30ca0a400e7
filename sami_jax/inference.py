"""Reading a finished run, and using its model: the one place `api`, `export`, `evaluation` and the
training loop's image grids go through.

    run_config, params, step = restore(workdir)      # EMA params only: no optimizer is built
    comp = components(run_config)                    # networks, schedule, kind (cached)
    mean, std = encode(comp, params, images)
    images = decode(comp, params, z, rng, **sampling_kwargs(run_config))
    grids = sample_grids(run_config, params, images, rng)

Everything here works on host numpy params or device arrays alike; the compiled pieces (encoder,
per-kind generation) are cached per model, so every caller shares them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sami_jax import checkpoint as ckpt_lib
from sami_jax import configlib
from sami_jax import kinds
from sami_jax import models as models_lib
from sami_jax import rngs
from sami_jax import samplers
from sami_jax import schedules
from sami_jax.data import pipeline
from sami_jax.utils import images as images_lib

# Rows of a traversal grid at most (the highest-KL latents first).
MAX_TRAVERSAL_DIMS = 8


@dataclasses.dataclass(frozen=True)
class Components:
  """What a config's model is made of (hashable: used as a static argument of compiled code).

  Attributes:
    kind: the model kind's declaration.
    image_model: the denoiser U-Net or the beta-VAE decoder (Flax module).
    encoder: the encoder (Flax module; unused by kinds without latents).
    schedule: the noise schedule.
    image_shape: (H, W, C).
    latent_dim: d.
    time_conditioning: whether the encoder sees t.
  """
  kind: kinds.Kind
  image_model: Any
  encoder: Any
  schedule: schedules.Schedule
  image_shape: tuple[int, int, int]
  latent_dim: int
  time_conditioning: bool


@functools.lru_cache(maxsize=16)
def _components(model_part: ml_collections.FrozenConfigDict) -> Components:
  config = configlib.default_config()
  config.model = ml_collections.ConfigDict(model_part.model)
  config.diffusion = ml_collections.ConfigDict(model_part.diffusion)
  config.data.image_size = model_part.image_size
  config.data.channels = model_part.channels
  image_model, encoder = models_lib.build_models(config)
  s, c = int(config.data.image_size), int(config.data.channels)
  return Components(kind=kinds.of(config), image_model=image_model, encoder=encoder,
                    schedule=schedules.from_config(config), image_shape=(s, s, c),
                    latent_dim=int(config.model.encoder.latent_dim),
                    time_conditioning=kinds.encoder_time_conditioning(config))


def components(config: ml_collections.ConfigDict) -> Components:
  """The Components of a config (cached per model, diffusion and image-shape settings)."""
  part = ml_collections.ConfigDict({
      "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
      "image_size": config.data.image_size, "channels": config.data.channels})
  return _components(configlib.frozen(part))


def sampling_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's sampling settings as keyword arguments of `decode`."""
  s = config.sampling
  return dict(steps=int(s.steps), sampler=s.sampler, eta=float(s.eta),
              gamma=float(s.guidance_scale))


# ------------------------------------------------------------------------------ compiled pieces


@functools.lru_cache(maxsize=16)
def _jitted_encoder(comp: Components):
  encode_fn = lambda p, x: samplers.encode(comp.encoder, p, x,
                                           time_conditioning=comp.time_conditioning)
  return jax.jit(encode_fn)


def encode(comp: Components, params, x) -> tuple[jax.Array, jax.Array]:
  """Posterior (mean, std), each [B, d], of clean images x [B, H, W, C] in [-1, 1]."""
  return _jitted_encoder(comp)(params, jnp.asarray(x))


_decode = jax.jit(kinds.decode, static_argnums=(0, 1, 2),
                  static_argnames=("schedule", "image_shape", "steps", "sampler", "eta",
                                   "clip_x0", "time_conditioning", "shared_noise"))


def decode(comp: Components, params, z, rng: jax.Array, *, steps: int = 50,
           sampler: str = "ddim", eta: float = 0.0, gamma: float | jax.Array = 1.0,
           clip_x0: bool = True, shared_noise: bool = False) -> jax.Array:
  """Images [B, H, W, C] for latents z [B, d] (see kinds.decode); one compilation per shape."""
  return _decode(comp.kind, comp.image_model, comp.encoder, params, jnp.asarray(z), rng,
                 schedule=comp.schedule, image_shape=comp.image_shape, gamma=gamma,
                 steps=steps, sampler=sampler, eta=eta, clip_x0=clip_x0,
                 time_conditioning=comp.time_conditioning, shared_noise=shared_noise)


def reconstruct(comp: Components, params, x0, rng: jax.Array, *, use_mean: bool = True,
                **kw) -> jax.Array:
  """Encodes x0 [B, H, W, C] -> z (the posterior mean, or a sample), then decodes z."""
  rng_z, rng_gen = jax.random.split(rng)
  mean, std = encode(comp, params, x0)
  z = mean if use_mean else mean + std * rngs.normal(rng_z, mean.shape)
  return decode(comp, params, z, rng_gen, **kw)


def traverse(comp: Components, params, z, dim: int, values, rng: jax.Array, **kw) -> jax.Array:
  """Images for z [d] with latent `dim` set to each of `values` [n] -> [n, H, W, C]; every row
  starts from the same noise."""
  zs = samplers.traverse_latents(jnp.asarray(z), int(dim), jnp.asarray(values))
  return decode(comp, params, zs, rng, shared_noise=True, **kw)


def interpolate(comp: Components, params, z_a, z_b, n: int, rng: jax.Array, **kw) -> jax.Array:
  """n images along the line from z_a to z_b (both [d]) -> [n, H, W, C], shared noise."""
  zs = samplers.interpolate_latents(jnp.asarray(z_a), jnp.asarray(z_b), n)
  return decode(comp, params, zs, rng, shared_noise=True, **kw)


# ------------------------------------------------------------------------------ data


def encode_dataset(config: ml_collections.ConfigDict, params, split: str, num_examples: int,
                   batch_size: int = 256) -> dict[str, np.ndarray]:
  """Posterior means and stds (and factors/attributes/ids if present) of the first
  `num_examples` examples of a split, computed on this process's devices. numpy arrays."""
  comp = components(config)
  out: dict[str, list] = {}
  for batch in pipeline.eval_iterator(config, split, batch_size, num_examples=num_examples):
    mask = np.asarray(batch["mask"], bool)
    mean, std = jax.device_get(encode(comp, params, batch["image"]))
    out.setdefault("mean", []).append(np.asarray(mean)[mask])
    out.setdefault("std", []).append(np.asarray(std)[mask])
    for key in ("factors", "attributes", "id"):
      if key in batch:
        out.setdefault(key, []).append(np.asarray(batch[key])[mask])
  return {k: np.concatenate(v) for k, v in out.items()}


def grid_images(config: ml_collections.ConfigDict, split: str, n: int) -> np.ndarray:
  """n images of a split for grids, [n, H, W, C] in [-1, 1]: a fixed selection spread over the
  whole split (pipeline.spread_indices, seeded by config.seed), the same at every call."""
  idx = pipeline.spread_indices(config, split, n, seed=int(config.seed))
  return np.asarray(pipeline.examples_at(config, split, idx)["image"])


# ------------------------------------------------------------------------------ grids


def traversal_rows(comp: Components, params, z, dims, values, rng: jax.Array,
                   **kw) -> np.ndarray:
  """One traversal row per latent in `dims` (z [d] fixed elsewhere), [len(dims) * n, H, W, C];
  every row starts from the same noise image."""
  rows = [np.asarray(traverse(comp, params, z, int(dim), values, rng, **kw)) for dim in dims]
  return np.concatenate(rows)


def traversal_values(config: ml_collections.ConfigDict) -> np.ndarray:
  """sampling.traverse_points values evenly spaced in [-traverse_range, traverse_range]."""
  s = config.sampling
  return np.linspace(-s.traverse_range, s.traverse_range, s.traverse_points, dtype=np.float32)


def sample_grids(config: ml_collections.ConfigDict, params, images: np.ndarray,
                 rng: jax.Array, kl_order: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Raw-resolution image grids (uint8, one cell per image) of a model.

  Kinds with latents: reconstructions of `images` (originals on top), samples with z ~ N(0, I),
  and latent traversals around the first image's posterior mean (rows: the latents in
  `kl_order`, else 0..7). A kind without latents: unconditional samples.
  """
  comp = components(config)
  kw = sampling_kwargs(config)
  n = images.shape[0]
  r_rec, r_prior, r_trav = jax.random.split(rng, 3)
  if not comp.kind.has_encoder:
    samples = decode(comp, params, jnp.zeros((n, 1)), r_prior, **kw)
    return {"samples": images_lib.make_grid(np.asarray(samples), ncol=int(math.sqrt(n)) or 1)}
  rec = reconstruct(comp, params, images, r_rec, use_mean=config.sampling.use_mean, **kw)
  grids = {"reconstructions": images_lib.make_grid(
      np.concatenate([images, np.asarray(rec)]), ncol=n)}
  z = rngs.normal(r_prior, (n, comp.latent_dim))
  grids["prior_samples"] = images_lib.make_grid(np.asarray(decode(comp, params, z, r_prior, **kw)),
                                                ncol=n)
  mean, _ = encode(comp, params, images[:1])
  d = comp.latent_dim
  dims = (list(kl_order[:MAX_TRAVERSAL_DIMS]) if kl_order is not None
          else list(range(min(d, MAX_TRAVERSAL_DIMS))))
  values = traversal_values(config)
  grids["traversals"] = images_lib.make_grid(
      traversal_rows(comp, params, mean[0], dims, values, r_trav, **kw), ncol=len(values))
  return grids


def write_grids(workdir: str, step: int, grids: dict[str, np.ndarray], writer=None) -> list[str]:
  """Writes grids as workdir/samples/<name>_<step>.png (and to TensorBoard); returns the paths."""
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, grid in grids.items():
    path = os.path.join(out_dir, f"{name}_{step:07d}.png")
    images_lib.save_png(path, grid)
    paths.append(path)
  if writer is not None:
    writer.write_images(step, grids)
  return paths


# ------------------------------------------------------------------------------ restoring


def checkpoint_dir(workdir: str) -> str:
  """workdir/checkpoints if it exists, else workdir itself (a checkpoints/ folder given directly)."""
  sub = os.path.join(workdir, "checkpoints")
  return sub if os.path.isdir(sub) else workdir


def checkpoint_location(path: str, step: int | None = None) -> tuple[str, int | None]:
  """(the checkpoints folder, the step to read: None for the newest intact one) for a run's
  workdir, its checkpoints/ folder, or one step's folder in it (WORKDIR/checkpoints/6 means
  step 6).

  Raises:
    ValueError: a step's folder together with another `step`.
  """
  ckpt_dir = checkpoint_dir(os.path.expanduser(path))
  named = ckpt_lib.step_directory(ckpt_dir)
  if named is None:
    return ckpt_dir, step
  if step is not None and step != named[1]:
    raise ValueError(f"{path} is the folder of step {named[1]}, but step={step} was asked for: "
                     f"pass the run's workdir ({os.path.dirname(named[0])}) with step={step}, or "
                     "that step's folder alone.")
  return named


def restore(workdir: str, step: int | None = None,
            given: ml_collections.ConfigDict | None = None
            ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(the run's config, its EMA params as numpy, the step) from a workdir's checkpoint.

  Reads only the EMA params and the config (no optimizer state, no train state is built). The
  config is the one saved with the run, merged with `given` by `configlib.for_inference`.
  `workdir` may also be the run's checkpoints/ folder or one step's folder in it
  (`checkpoint_location`).

  Raises:
    FileNotFoundError: no checkpoint in workdir (or none for that step).
    ValueError: a step's folder with another `step`.
  """
  ckpt_dir, step = checkpoint_location(workdir, step)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"No checkpoints in {workdir}: train first with --mode=train.")
  params, restored_step = ckpt_lib.restore_params_only(ckpt_dir, step, return_step=True)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep_last=10**6)
  try:
    saved = checkpointer.restore_config(restored_step)
  finally:
    checkpointer.close()
  if not saved:
    if given is None:
      raise ValueError(f"The checkpoint in {ckpt_dir} holds no config; pass the run's config.")
    saved = configlib.to_dict(given)
  return configlib.for_inference(saved, given), params, restored_step


# ------------------------------------------------------------------------------ latent prior


def latent_prior_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "latent_prior", f"prior_{step:07d}.msgpack")


def fitted_latent_prior(config: ml_collections.ConfigDict, params, workdir: str | None,
                        step: int):
  """The latent diffusion prior of a checkpoint: loaded from workdir/latent_prior/, or fitted on
  the encoded training latents (config.latent_prior.num_examples of them) and saved there first
  (workdir None: fitted and not saved)."""
  from sami_jax import latent_prior  # pylint: disable=g-import-not-at-top
  path = latent_prior_path(workdir, step) if workdir else ""
  d = config.model.encoder.latent_dim
  if path and os.path.exists(path):
    logging.info("Using the latent prior in %s.", path)
    return latent_prior.load(path, d, config)
  t0 = time.time()
  latents = encode_dataset(config, params, "train", config.latent_prior.num_examples)["mean"]
  prior = latent_prior.fit(config, latents, rngs.stream(config.seed, rngs.LATENT_PRIOR))
  if path and jax.process_index() == 0:
    latent_prior.save(path, prior)
  logging.info("Fitted the latent prior on %d training latents in %.1f s (final loss %.4f); "
               "saved to %s.", len(latents), time.time() - t0, prior.final_loss, path)
  return prior


def sample(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """--mode=sample: grids for the latest checkpoint; with sampling.prior == "latent_diffusion"
  also samples whose z come from the fitted latent prior."""
  from sami_jax import latent_prior  # pylint: disable=g-import-not-at-top
  run_config, params, step = restore(workdir, given=config)
  comp = components(run_config)
  if run_config.sampling.prior == "latent_diffusion" and not comp.kind.has_encoder:
    raise ValueError(f"sampling.prior=latent_diffusion needs latents; this run is a "
                     f"{comp.kind.name} (no encoder). Drop --config.sampling.prior.")
  rng = rngs.stream(run_config.seed, rngs.SAMPLE)
  images = grid_images(run_config, "test", run_config.train.num_sample_images)
  grids = sample_grids(run_config, params, images, rng)
  if run_config.sampling.prior == "latent_diffusion":
    prior = fitted_latent_prior(run_config, params, workdir, step)
    n = run_config.train.num_sample_images
    r_z, r_x = jax.random.split(jax.random.fold_in(rng, rngs.LATENT_PRIOR))
    z = latent_prior.sample(run_config, prior, n, r_z)
    x = decode(comp, params, z, r_x, **sampling_kwargs(run_config))
    grids["latent_prior_samples"] = images_lib.make_grid(np.asarray(x), ncol=n)
  return write_grids(workdir, step, grids)
