"""The unconditional denoiser eps_theta(x_t, t): a DDPM-style U-Net (NHWC, GroupNorm only).

In SAMI the denoiser never sees the latent; `cond_dim > 0` exists for the DiffAE-style baseline,
where a conditioning vector modulates every residual block through adaptive group norm.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sami_jax.models import layers


class UNet(nn.Module):
  """eps_theta(x_t, t): [B, H, W, C], [B] -> [B, H, W, out_channels] float32.

  Attributes:
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: width multipliers, one per resolution level (len(ch_mult) - 1 downsamplings).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: spatial sizes (height, e.g. 8 for the 8x8 level) that get self-attention.
    dropout: dropout rate inside the residual blocks (active only with train=True).
    num_groups: GroupNorm groups (reduced automatically where it does not divide the width).
    out_channels: output channels; None means the same as the input.
    dtype: compute dtype (params stay float32; the output is float32).
    remat: rematerialise (jax.checkpoint) each residual block to save activation memory.
    cond_dim: > 0 enables the `cond` [B, cond_dim] input (adaptive group norm in every block).
    num_heads: attention heads.
  """
  ch: int = 64
  ch_mult: tuple = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple = (8,)
  dropout: float = 0.0
  num_groups: int = 8
  out_channels: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False
  cond_dim: int = 0
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, train: bool,
               cond: jax.Array | None = None) -> jax.Array:
    """Predicts the noise.

    Args:
      x: [B, H, W, C] noisy images (H, W divisible by 2**(len(ch_mult) - 1)).
      t: [B] (or scalar) continuous times in [0, 1].
      train: enables dropout (then a 'dropout' rng is needed when dropout > 0).
      cond: [B, cond_dim] conditioning vector; required iff cond_dim > 0.

    Returns:
      [B, H, W, out_channels] float32.
    """
    layers.check_image(x, len(self.ch_mult), "UNet")
    b, hh, ww, c_in = x.shape
    out_ch = self.out_channels or c_in
    t = layers.as_batch_times(t, b)
    if self.cond_dim > 0:
      if cond is None:
        raise ValueError(f"UNet was built with cond_dim={self.cond_dim}: pass cond "
                         f"[B, {self.cond_dim}].")
      if cond.shape != (b, self.cond_dim):
        raise ValueError(f"UNet: cond must have shape [B, cond_dim]=({b}, {self.cond_dim}), "
                         f"got {cond.shape}.")
    elif cond is not None:
      raise ValueError("UNet got cond but was built with cond_dim=0; set cond_dim to its size.")

    dt = self.dtype
    emb_dim = 4 * self.ch
    temb = layers.TimeEmbedding(emb_dim, dt, name="time_embed")(t)
    cemb = None
    if self.cond_dim > 0:
      # A shared MLP maps cond to the embedding width; each block then projects it to its own
      # scale and shift.
      cemb = nn.Dense(emb_dim, dtype=dt, param_dtype=jnp.float32,
                      name="cond_embed_0")(cond.astype(dt))
      cemb = nn.Dense(emb_dim, dtype=dt, param_dtype=jnp.float32,
                      name="cond_embed_1")(nn.silu(cemb))

    # train is argument 4 counting self: static, since it selects Python control flow.
    block_cls = nn.remat(layers.ResBlock, static_argnums=(4,)) if self.remat else layers.ResBlock

    def res(h, width, name):
      return block_cls(width, self.num_groups, self.dropout, dt, name=name)(h, temb, cemb, train)

    def attn(h, name):
      return layers.AttentionBlock(self.num_heads, self.num_groups, dt, name=name)(h)

    h = layers.conv3x3(self.ch, dt, name="conv_in")(x.astype(dt))
    skips = [h]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res(h, self.ch * mult, f"down_{i}_res_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"down_{i}_attn_{j}")
        skips.append(h)
      if i != len(self.ch_mult) - 1:
        h = layers.Downsample(dt, name=f"down_{i}_downsample")(h)
        skips.append(h)

    mid_ch = self.ch * self.ch_mult[-1]
    h = res(h, mid_ch, "mid_res_0")
    h = attn(h, "mid_attn")
    h = res(h, mid_ch, "mid_res_1")

    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = layers.materialized(jnp.concatenate([h, skips.pop()], axis=-1))
        h = res(h, self.ch * self.ch_mult[i], f"up_{i}_res_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"up_{i}_attn_{j}")
      if i != 0:
        h = layers.Upsample(dt, name=f"up_{i}_upsample")(h)
    assert not skips  # internal invariant: every skip connection is consumed

    h = nn.silu(layers.GroupNorm(self.num_groups, dt, name="norm_out")(h))
    # Zero-initialised: the prediction starts at eps = 0 (the mean of the target).
    h = layers.conv3x3(out_ch, dt, name="conv_out", zero=True)(h)
    out = h.astype(jnp.float32)
    chex.assert_shape(out, (b, hh, ww, out_ch))
    return out
