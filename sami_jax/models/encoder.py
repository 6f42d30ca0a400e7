"""The inference network q_phi(z | x) = N(mean(x), diag(std(x)^2)): a half U-Net (down path only).

SAMI's guidance score is grad_x log q_phi(z | x_t), which scales like 1 / std^2, and the whole
loss is differentiated once more w.r.t. the parameters. So:
- the std head is zero-initialised and offset so that std == init_std (1 by default) exactly at
  init, for every input;
- std is kept inside [min_std, max_std] by a *smooth* bound (no hard clip in the normal range), so
  the bound never zeroes a gradient that matters and the second derivative exists everywhere;
- every non-linearity is smooth (SiLU, softplus).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sami_jax.models import layers

SCALE_PARAMS = ("softplus", "exp")
STD_INPUTS = ("image", "time")


# Sharpness of the smooth bound on log std in the "exp" parameterisation: the log-std range
# [log 1e-3, log 10] = [-6.9, 2.3] is narrow on the upper side, so a unit-temperature softplus
# would bend log std = h / 2 noticeably already at std ~ 1; at 4 the bend is < 1e-3 there.
_EXP_SHARPNESS = 4.0


def _softplus_inv(y: float, k: float = 1.0) -> float:
  """Inverse of softplus_k(x) = softplus(k x) / k for y > 0, in float64 (stable for large y)."""
  ky = k * y
  return (ky + math.log(-math.expm1(-ky))) / k


def _smooth_bound_offset(target: float, lo: float, hi: float, k: float = 1.0) -> float:
  """The pre-activation v with smooth_bound(v, lo, hi, k) == target (closed form)."""
  cap = _softplus_inv(hi - lo, k)
  a = _softplus_inv(target - lo, k)
  return cap - _softplus_inv(cap - a, k)


def smooth_bound(v: jax.Array, lo: float, hi: float, k: float = 1.0) -> jax.Array:
  """A smooth, strictly increasing map of R onto (lo, hi).

    y = lo + sp(cap - sp(cap - v)),   sp(x) = softplus(k x) / k,   cap = sp^{-1}(hi - lo).

  The inner `cap - sp(cap - v)` is a smooth minimum of v and cap (so y < hi); the outer sp is
  applied last so that y > lo however negative v gets. Away from both ends y ~= lo + sp(v): with
  k = 1 this is exactly the unbounded softplus head `min_std + softplus(v)`, the cap only acting
  near `hi`. k sets how sharp the corners are (width ~ 1/k). The gradient is never exactly zero.
  """
  cap = _softplus_inv(hi - lo, k)
  sp = lambda x: jax.nn.softplus(k * x) / k
  return lo + sp(cap - sp(cap - v))


def std_from_preactivation(h: jax.Array, scale_param: str, min_std: float,
                           max_std: float, init_std: float = 1.0) -> jax.Array:
  """Posterior std in [min_std, max_std] from the std head's raw output h; std == init_std at h == 0.

  softplus: std = smooth_bound(h + c, min_std, max_std) ~= min_std + softplus(h + c).
  exp:      h is a log-variance: log std = smooth_bound(h / 2 + c, log min_std, log max_std, 4),
            i.e. std ~= exp(h / 2) away from the bounds.
  c is chosen in closed form so that h == 0 gives init_std, and the float32 rounding of that is
  removed (below) so that std == init_std exactly. A final clip only removes rounding overshoot
  (~1e-7) at the ends, where the smooth gradient is already ~0; it never acts in the working range.

  Args:
    h: [B, d] float32 head pre-activations.
  Returns:
    [B, d] float32.
  """
  if scale_param not in SCALE_PARAMS:
    raise ValueError(f"Encoder.scale_param={scale_param!r} is not one of {list(SCALE_PARAMS)}.")
  if not 0.0 < min_std < init_std < max_std:
    raise ValueError(f"Encoder needs 0 < min_std < init_std < max_std; got min_std={min_std}, "
                     f"init_std={init_std}, max_std={max_std}.")
  h = h.astype(jnp.float32)
  if scale_param == "softplus":
    c = _smooth_bound_offset(init_std, min_std, max_std)
    f = lambda v: smooth_bound(v, min_std, max_std)
  else:
    lo, hi = math.log(min_std), math.log(max_std)
    c = _smooth_bound_offset(math.log(init_std), lo, hi, _EXP_SHARPNESS)
    f = lambda v: jnp.exp(smooth_bound(v, lo, hi, _EXP_SHARPNESS))
    h = 0.5 * h  # h is a log-variance
  # std = init_std + f(h + c) - f(c). Mathematically f(c) == init_std, but float32 evaluation of f(c) is off by
  # a few ulps (and XLA constant-folds it differently from the runtime op). Evaluating f(c) in the
  # same elementwise op as f(h + c), from a runtime copy of c (h * 0 + c, not foldable), makes the
  # two round identically, so std == 1.0 bit-exactly at h == 0 under jit, eager, vmap and grad.
  both = f(jnp.stack([h + c, h * 0.0 + c]))
  std = init_std + (both[0] - jax.lax.stop_gradient(both[1]))
  return jnp.clip(std, min_std, max_std)


class Encoder(nn.Module):
  """q_phi(z | x): x [B, H, W, C] (and t [B] if time_conditioning) -> (mean, std), [B, d] each.

  conv_in -> per level: num_res_blocks ResBlocks (+ attention at attn_resolutions), downsample
  between levels -> GroupNorm -> SiLU -> flatten (or global mean pool) -> Dense -> SiLU -> mean /
  std heads.
  The heads run in float32 whatever `dtype` is (std enters the guidance as 1 / std^2).

  Attributes:
    ch, ch_mult, num_res_blocks, attn_resolutions, num_groups: as in the U-Net.
    latent_dim: d.
    time_conditioning: if False the encoder is blind to the noise level and ignores t.
    scale_param: "softplus" or "exp" (see `std_from_preactivation`).
    min_std, max_std: bounds on std (smooth; see `smooth_bound`).
    init_std: the std of every input at init (exactly; min_std < init_std < max_std). Below 1 the
      guidance, which scales like 1 / std^2, carries the latent from the first step.
    dtype: compute dtype (params and outputs float32).
    mean_init_scale: variance scale of the mean head's init (modest: mean depends on x at init
      without starting far from the prior).
    num_heads: attention heads.
    pool: "flatten" keeps the spatial layout of the last feature map (so where things are can be
      encoded: Disks' centre x and y); "mean" pools it away (translation invariant features).
    std_input: what the posterior std depends on: "image" (the image's features and, with time
      conditioning, t: std(x, t)) or "time" (t alone, one std per latent dimension and noise
      level: std(t); constant without time conditioning). With "time" the std has no gradient in
      x, so the guidance grad_x log q comes from the mean alone: the latent cannot carry
      information in its norm through an image-dependent width (docs/experiments.md).
  """
  ch: int = 32
  ch_mult: tuple = (1, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple = ()
  num_groups: int = 8
  latent_dim: int = 3
  time_conditioning: bool = False
  scale_param: str = "softplus"
  min_std: float = 1e-3
  max_std: float = 10.0
  init_std: float = 1.0
  dtype: Any = jnp.float32
  mean_init_scale: float = 0.1
  num_heads: int = 1
  pool: str = "flatten"
  std_input: str = "image"

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array | None = None, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch.

    Args:
      x: [B, H, W, C] images (clean or noisy), H and W divisible by 2**(len(ch_mult) - 1).
      t: [B] (or scalar) times in [0, 1]; required iff time_conditioning, else ignored.
      train: unused (no dropout in the encoder); kept for a uniform call signature.

    Returns:
      (mean, std), each [B, latent_dim] float32, std in [min_std, max_std].
    """
    del train
    layers.check_image(x, len(self.ch_mult), "Encoder")
    # Checked up front (also in std_from_preactivation) so a bad setting fails before any compute.
    if self.scale_param not in SCALE_PARAMS:
      raise ValueError(f"Encoder.scale_param={self.scale_param!r} is not one of "
                       f"{list(SCALE_PARAMS)}.")
    if not 0.0 < self.min_std < self.init_std < self.max_std:
      raise ValueError(f"Encoder needs 0 < min_std < init_std < max_std; got min_std="
                       f"{self.min_std}, init_std={self.init_std}, max_std={self.max_std}.")
    if self.std_input not in STD_INPUTS:
      raise ValueError(f"Encoder.std_input={self.std_input!r} is not one of {list(STD_INPUTS)}.")
    b = x.shape[0]
    dt = self.dtype
    temb = None
    if self.time_conditioning:
      if t is None:
        raise ValueError("Encoder was built with time_conditioning=True: pass t [B] (the noise "
                         "level; t = 0 for clean images).")
      t = layers.as_batch_times(t, b)
      temb = layers.TimeEmbedding(4 * self.ch, dt, name="time_embed")(t)

    h = layers.conv3x3(self.ch, dt, name="conv_in")(x.astype(dt))
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = layers.ResBlock(self.ch * mult, self.num_groups, 0.0, dt,
                            name=f"down_{i}_res_{j}")(h, temb, None, False)
        if h.shape[1] in self.attn_resolutions:
          h = layers.AttentionBlock(self.num_heads, self.num_groups, dt,
                                    name=f"down_{i}_attn_{j}")(h)
      if i != len(self.ch_mult) - 1:
        # As patches: this conv is differentiated twice (see layers.Conv).
        h = layers.Downsample(dt, patches=True, name=f"down_{i}_downsample")(h)

    h = nn.silu(layers.GroupNorm(self.num_groups, dt, name="norm_out")(h))
    width = h.shape[-1]
    if self.pool == "mean":
      h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # [B, C_last], per-example pooling
    elif self.pool == "flatten":
      h = h.astype(jnp.float32).reshape((h.shape[0], -1))  # [B, H' * W' * C_last]
    else:
      raise ValueError(f"Encoder.pool={self.pool!r}: use 'flatten' or 'mean'.")
    h = nn.silu(nn.Dense(width, dtype=jnp.float32, param_dtype=jnp.float32, name="hidden")(h))
    mean = nn.Dense(self.latent_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.variance_scaling(
                        self.mean_init_scale, "fan_in", "truncated_normal"),
                    name="mean_head")(h)
    if self.std_input == "image":
      std_in = h
    elif temb is not None:  # "time": std(t), the same for every image at a noise level
      std_in = nn.silu(temb.astype(jnp.float32))
    else:  # "time" without time conditioning: one learned std per latent dimension
      std_in = jnp.zeros((b, 1), jnp.float32)
    # Zero kernel and bias: the pre-activation is 0 for every input, so std == init_std at init.
    std_pre = nn.Dense(self.latent_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                       kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                       name="std_head")(std_in)
    std = std_from_preactivation(std_pre, self.scale_param, self.min_std, self.max_std,
                                 self.init_std)
    chex.assert_shape([mean, std], (b, self.latent_dim))
    return mean, std
