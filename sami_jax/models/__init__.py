"""Models: the denoiser U-Net and the encoder, built and initialised from a config."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from sami_jax import kinds
from sami_jax.utils import xla_options
from sami_jax.models.decoder import ConvDecoder
from sami_jax.models.encoder import Encoder
from sami_jax.models.unet import UNet

__all__ = ["UNet", "Encoder", "ConvDecoder", "build_models", "init_params", "initialize",
           "init_compiler_options", "count_params", "compute_dtype", "image_model_key"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype; ValueError otherwise."""
  if name not in _DTYPES:
    raise ValueError(f"config.model.dtype={name!r} is not one of {list(_DTYPES)}.")
  return _DTYPES[name]


def image_model_key(config) -> str:
  """The params key of the image model: "denoiser" (a U-Net) or "decoder" (beta_vae's)."""
  return kinds.of(config).image_model


def build_models(config) -> tuple[UNet | ConvDecoder, Encoder]:
  """(image model, encoder) modules from config.model.* and data.{image_size,channels}.

  The image model is the denoiser U-Net for the diffusion kinds (conditioned on z through
  adaptive group norm when the kind's latent route is "adagn") and the ConvDecoder
  (config.model.decoder) for a kind whose image model is a decoder (beta_vae).
  """
  dt = compute_dtype(config.model.dtype)
  u, e = config.model.denoiser, config.model.encoder
  kind = kinds.of(config)
  if not kind.is_diffusion:
    dec = config.model.decoder
    denoiser = ConvDecoder(
        image_size=config.data.image_size, channels=config.data.channels, ch=dec.ch,
        ch_mult=tuple(dec.ch_mult), num_res_blocks=dec.num_res_blocks,
        num_groups=dec.num_groups, dtype=dt)
  else:
    denoiser = UNet(
        ch=u.ch, ch_mult=tuple(u.ch_mult), num_res_blocks=u.num_res_blocks,
        attn_resolutions=tuple(u.attn_resolutions), dropout=u.dropout, num_groups=u.num_groups,
        out_channels=config.data.channels, dtype=dt, remat=u.remat,
        cond_dim=e.latent_dim if kind.latent_route == "adagn" else 0)
  encoder = Encoder(
      ch=e.ch, ch_mult=tuple(e.ch_mult), num_res_blocks=e.num_res_blocks,
      attn_resolutions=tuple(e.attn_resolutions), num_groups=e.num_groups,
      latent_dim=e.latent_dim, time_conditioning=kinds.encoder_time_conditioning(config),
      scale_param=e.scale_param, min_std=e.min_std, max_std=e.max_std,
      init_std=e.init_std, mean_init_scale=e.mean_init_scale, dtype=dt, pool=e.pool,
      std_input=e.std_input)
  return denoiser, encoder


def init_params(config, rng: jax.Array) -> dict[str, Any]:
  """{image_model_key: params, "encoder": params} (float32), from a [1, S, S, C] dummy input.

  Pure in `rng`: usable under jax.jit / jax.eval_shape (e.g. with out_shardings).
  """
  denoiser, encoder = build_models(config)
  s, c = config.data.image_size, config.data.channels
  x = jnp.zeros((1, s, s, c), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  rng_d, rng_e = jax.random.split(rng)
  kind = kinds.of(config)
  z = jnp.zeros((1, config.model.encoder.latent_dim), jnp.float32)
  if not kind.is_diffusion:
    den = denoiser.init({"params": rng_d}, z, train=False)["params"]
  elif kind.latent_route == "adagn":
    den = denoiser.init({"params": rng_d}, x, t, train=False, cond=z)["params"]
  else:
    den = denoiser.init({"params": rng_d}, x, t, train=False)["params"]
  enc = encoder.init({"params": rng_e}, x, t if encoder.time_conditioning else None,
                     train=False)["params"]
  return {kind.image_model: den, "encoder": enc}


def init_compiler_options() -> dict[str, Any]:
  """XLA options for one-off initialisation programs (empty off CPU).

  XLA:CPU's optimising backend spends about 2 s per random-number kernel (the threefry bits
  behind every parameter's initialiser): 55 s for the init of a two-level U-Net against a few
  seconds for its train step (jax 0.12, this project's 2-core CPU). Initialisation runs once, so
  it is compiled without LLVM's optimisations (`xla_options.run_once_compiler_options`: a few
  seconds); its values agree with the optimised program's to float32 rounding.
  """
  return xla_options.run_once_compiler_options(jax.default_backend())


def initialize(config, rng: jax.Array) -> dict[str, Any]:
  """`init_params` as one quickly compiled program (see init_compiler_options)."""
  init = jax.jit(lambda r: init_params(config, r),
                 compiler_options=init_compiler_options() or None)
  return init(rng)


def count_params(tree) -> int:
  """Total number of elements in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
