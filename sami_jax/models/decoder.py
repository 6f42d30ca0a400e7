"""The beta-VAE baseline's decoder p_theta(x | z) = N(x; decoder(z), obs_std^2 I).

The mirror image of the encoder's down path: Dense -> reshape to the coarsest feature map ->
per level (coarse to fine): num_res_blocks ResBlocks, upsample between levels -> GroupNorm -> SiLU ->
conv to the image channels. GroupNorm only (no batch coupling), as everywhere in sami_jax.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sami_jax.models import layers


class ConvDecoder(nn.Module):
  """z [B, d] -> mean image [B, H, W, C] (float32, unbounded; the data lie in [-1, 1]).

  Attributes:
    image_size: H == W, divisible by 2**(len(ch_mult) - 1).
    channels: C.
    ch, ch_mult, num_res_blocks, num_groups: as in the encoder (ch_mult is read fine to coarse,
      like the encoder's, and traversed in reverse).
    dtype: compute dtype (params and output float32).
  """
  image_size: int
  channels: int
  ch: int = 32
  ch_mult: tuple = (1, 2, 2)
  num_res_blocks: int = 1
  num_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """Decodes latents.

    Args:
      z: [B, d] latents.
      train: unused (no dropout); kept for a uniform call signature.
    Returns:
      [B, image_size, image_size, channels] float32.
    """
    del train
    chex.assert_rank(z, 2)
    levels = len(self.ch_mult)
    factor = 2 ** (levels - 1)
    if levels < 1 or self.image_size % factor:
      raise ValueError(f"ConvDecoder: {levels} levels upsample by {factor}, which does not divide "
                       f"image_size={self.image_size}; use fewer levels (ch_mult).")
    b = z.shape[0]
    dt = self.dtype
    base = self.image_size // factor
    width = self.ch * self.ch_mult[-1]
    h = nn.Dense(base * base * width, dtype=dt, param_dtype=jnp.float32,
                 name="dense_in")(z.astype(dt))
    h = h.reshape((b, base, base, width))
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks):
        h = layers.ResBlock(self.ch * self.ch_mult[i], self.num_groups, 0.0, dt,
                            name=f"up_{i}_res_{j}")(h, None, None, False)
      if i != 0:
        h = layers.Upsample(dt, name=f"up_{i}_upsample")(h)
    h = nn.silu(layers.GroupNorm(self.num_groups, dt, name="norm_out")(h))
    out = layers.conv3x3(self.channels, dt, name="conv_out")(h).astype(jnp.float32)
    chex.assert_shape(out, (b, self.image_size, self.image_size, self.channels))
    return out
