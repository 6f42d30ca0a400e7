"""Building blocks shared by the denoiser U-Net and the encoder.

Everything is NHWC and per-example: there is no BatchNorm and no other op that mixes examples, so
the gradient of a batch-summed quantity w.r.t. example i's input depends on example i alone (the
SAMI guidance score relies on this). Parameters are always float32; `dtype` is the compute dtype.
Non-linearities are smooth (SiLU) because the encoder is differentiated twice.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sami_jax import rngs

Dtype = Any

# The last conv of every residual branch and the output convs start at zero: each residual block
# is the identity at init, which keeps deep stacks well-conditioned (as in DDPM / ADM).
zeros_init = nn.initializers.zeros


def materialized(x: jax.Array) -> jax.Array:
  """x unchanged, as an array XLA must materialise; so is its cotangent under differentiation.

  An optimization barrier: its JVP and transpose are barriers too, so the gradient w.r.t. x (a
  sum over x's consumers) is also computed once into memory. Without one, XLA:CPU fuses such a
  sum, or a cheap producer like a nearest-neighbour upsampling, into each of its consumers,
  among them the transposes feeding weight-gradient convolutions, which it then runs at a
  fraction of copy speed (benchmarks/README.md: 0.88x the 32x32 SAMI step time).
  """
  return jax.lax.optimization_barrier(x)


def safe_num_groups(channels: int, num_groups: int) -> int:
  """The largest group count <= `num_groups` that divides `channels` (at least 1).

  Lets any channel count (e.g. 1 or 3 input channels, or widths not divisible by the configured
  group count) go through GroupNorm without a shape error.
  """
  if channels < 1 or num_groups < 1:
    raise ValueError(f"GroupNorm needs channels >= 1 and num_groups >= 1, got channels={channels}, "
                     f"num_groups={num_groups}.")
  for g in range(min(num_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1  # unreachable: g = 1 always divides.


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """GroupNorm of each example over its positions and the channels of each group, in float32.

  y = (x - mean_g) * rsqrt(var_g + epsilon) * scale + bias, with the two-pass variance
  var_g = mean((x - mean_g)^2) (not E[x^2] - E[x]^2): what flax.linen.GroupNorm computes with
  use_fast_variance=False. The statistics are reduced over the positions first, giving per-channel
  sums [B, C] that are then summed over each group's C / G channels, and the normalisation uses
  them broadcast per channel along the minor axis; flax reduces over (positions, channels of the
  group) of a [B, ..., G, C / G] view and broadcasts per group. Same values up to float32
  rounding (the order of the sums); XLA:CPU runs this form 2-3x faster, forward and backward
  (benchmarks/README.md).

  Args:
    x: [B, ..., C] (any dtype; computed in float32).
    scale, bias: [C].
    num_groups: G, a divisor of C.
  Returns:
    [B, ..., C] float32.
  """
  shape = x.shape
  b, c = shape[0], shape[-1]
  if c % num_groups:
    raise ValueError(f"group_norm: {num_groups} groups do not divide {c} channels.")
  k = c // num_groups
  xs = x.astype(jnp.float32).reshape(b, -1, c)  # [B, P, C]
  count = xs.shape[1] * k

  def group_mean(per_channel_sum):  # [B, C] -> [B, C]: each channel gets its group's mean
    per_group = per_channel_sum.reshape(b, num_groups, k).sum(axis=-1) / count
    return jnp.repeat(per_group, k, axis=-1)

  mean = group_mean(jnp.sum(xs, axis=1))
  centred = xs - mean[:, None, :]
  var = group_mean(jnp.sum(centred * centred, axis=1))
  mul = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
  return (centred * mul[:, None, :] + bias.astype(jnp.float32)).reshape(shape)


class _GroupNormParams(nn.Module):
  """The scale (ones) and bias (zeros), [features] float32, where flax.linen.GroupNorm keeps them."""
  features: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return scale, bias


class GroupNorm(nn.Module):
  """GroupNorm over (H, W, channels-in-group) of each example, with a safe group count.

  Statistics are computed in float32 with the two-pass variance (not E[x^2] - E[x]^2), which
  stays accurate for large activations and under bfloat16 compute (`group_norm`). The parameters
  are those of flax.linen.GroupNorm (a "GroupNorm_0" child with "scale" and "bias" [C], ones and
  zeros), so checkpoints and inits are interchangeable with the earlier nn.GroupNorm layer.
  """
  num_groups: int = 8
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] -> [B, ..., C] in `dtype`."""
    c = x.shape[-1]
    g = safe_num_groups(c, self.num_groups)
    scale, bias = _GroupNormParams(c, name="GroupNorm_0")()
    return group_norm(x, scale, bias, g, self.epsilon).astype(self.dtype)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of continuous time, as in DDPM / Transformer position encodings.

  Args:
    t: [B] float times in [0, 1]; embedded as `1000 * t` so that the frequencies match a T=1000
      discrete schedule (the usual convention, and what a pre-trained DDPM expects).
    dim: embedding size (odd sizes get one zero-padded feature).
    max_period: the longest period, in units of `1000 * t`.

  Returns:
    [B, dim] float32.
  """
  chex.assert_rank(t, 1)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbedding(nn.Module):
  """t [B] -> sinusoidal(1000 t) -> Dense -> SiLU -> Dense: [B, dim] in `dtype`."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    chex.assert_rank(t, 1)
    base = max(self.dim // 4, 2)  # the sinusoid size; the MLP widens it to `dim`
    h = sinusoidal_embedding(t, base).astype(self.dtype)
    h = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="dense_0")(h)
    h = nn.silu(h)
    h = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="dense_1")(h)
    return h


class Conv(nn.Module):
  """A square convolution with "SAME" padding: nn.Conv's parameters, computed for XLA.

  The parameters are nn.Conv's exactly (names "kernel" [k, k, C_in, features] and "bias"
  [features], the same initialisers, created in the same order), so checkpoints and inits are
  interchangeable with nn.Conv(features, (k, k), strides, padding="SAME"). What differs is the
  program XLA sees; the products summed are the same, only float32 rounding differs:

  - k == 1: a dot over the channel axis. As a convolution, XLA:CPU turns its weight gradient
    into a convolution with a window as large as the feature map, plus transposes into the
    layout that needs.
  - patches=True: one dot over extracted [B, H', W', k*k*C_in] patches (im2col). Every derivative
    of it, to any order, is again dots, slices and pads. Used for the encoder's strided
    convolutions: its second derivative (SAMI differentiates the guidance score, itself a gradient
    of the encoder) is, as a convolution, a kernel-dilated, reversed convolution that XLA:CPU
    runs on its generic loop emitter: the encoder's two downsamples took ~6% of a SAMI step for
    ~1% of its FLOPs (benchmarks/README.md). With stride 2 the patches hold only 2.25x the
    input, so the forward pass costs little more.
  - otherwise: lax.conv_general_dilated in NHWC / HWIO, as nn.Conv.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dtype: Dtype = jnp.float32
  zero_init: bool = False
  patches: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features] in `dtype`."""
    chex.assert_rank(x, 4)
    k, s = self.kernel_size, self.strides
    kernel_init = zeros_init if self.zero_init else nn.linear.default_kernel_init
    kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if k == 1 and s == 1:
      y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
    elif self.patches:
      y = jnp.einsum("bhwk,ko->bhwo", extract_patches(x, k, s),
                     kernel.reshape(k * k * x.shape[-1], self.features))
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def extract_patches(x: jax.Array, k: int, stride: int) -> jax.Array:
  """The k x k "SAME"-padded patches of x at the given stride, flattened (im2col).

  x is `materialized` first: the gradient w.r.t. x, a sum of the k * k taps' padded slices,
  is then computed once; without that XLA:CPU recomputes it inside each consumer (the encoder's
  two downsamples took 11% of a 32x32 SAMI step, 6% with it: benchmarks/README.md).

  Args:
    x: [B, H, W, C].
  Returns:
    [B, ceil(H / stride), ceil(W / stride), k * k * C]: patch element (i, j, c) at index
    (i * k + j) * C + c, i.e. matching an HWIO kernel reshaped to [k * k * C, features].
  """
  b, h, w, c = x.shape
  x = materialized(x)
  (ph0, ph1), (pw0, pw1) = jax.lax.padtype_to_pads((h, w), (k, k), (stride, stride), "SAME")
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  cols = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(k) for j in range(k)]
  return jnp.concatenate(cols, axis=-1)


def conv3x3(features: int, dtype: Dtype, name: str | None = None, strides: int = 1,
            zero: bool = False, patches: bool = False) -> Conv:
  return Conv(features, 3, strides, dtype, zero_init=zero, patches=patches, name=name)


class Dropout(nn.Module):
  """flax.linen.Dropout(rate) (no broadcast dims), the same masks from the same keys, drawn faster.

  Named like nn.Dropout ("Dropout_0" when auto-named) and drawing its key the same way, it
  keeps every mask of a run as nn.Dropout would draw it; the mask is `rngs.bernoulli`, which
  computes jax.random.bernoulli's values in one fused kernel instead of the loop XLA:CPU runs.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """x: [...] -> [...], each element kept (and scaled by 1 / (1 - rate)) with prob. 1 - rate."""
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = rngs.bernoulli(self.make_rng("dropout"), keep, x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class ResBlock(nn.Module):
  """GN -> SiLU -> Conv3x3 (+ time proj) -> GN [-> cond scale/shift] -> SiLU -> Dropout -> Conv3x3.

  The last conv is zero-initialised (the block is the identity at init); a 1x1 conv maps the skip
  path when the channel count changes. `cond`, if given, modulates the second GroupNorm output
  as `h * (1 + scale) + shift` (adaptive group norm, as in Diffusion Autoencoders).

  Call with positional arguments `(x, temb, cond, train)` so that `nn.remat` can treat `train`
  as static (`static_argnums=(4,)`, counting `self`).
  """
  out_ch: int
  num_groups: int = 8
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None,
               cond: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x: [B, H, W, C_in]; temb: [B, D_t] or None; cond: [B, D_c] or None -> [B, H, W, out_ch]."""
    chex.assert_rank(x, 4)
    b = x.shape[0]
    x = x.astype(self.dtype)
    h = nn.silu(GroupNorm(self.num_groups, self.dtype, name="norm_0")(x))
    h = conv3x3(self.out_ch, self.dtype, name="conv_0")(h)
    if temb is not None:
      chex.assert_rank(temb, 2)
      chex.assert_axis_dimension(temb, 0, b)
      proj = nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                      name="temb_proj")(nn.silu(temb.astype(self.dtype)))
      h = h + proj[:, None, None, :]
    h = GroupNorm(self.num_groups, self.dtype, name="norm_1")(h)
    if cond is not None:
      chex.assert_rank(cond, 2)
      chex.assert_axis_dimension(cond, 0, b)
      ss = nn.Dense(2 * self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                    name="cond_proj")(nn.silu(cond.astype(self.dtype)))
      scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
      h = h * (1.0 + scale) + shift
    h = nn.silu(h)
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(self.out_ch, self.dtype, name="conv_1", zero=True)(h)
    if x.shape[-1] != self.out_ch:
      x = Conv(self.out_ch, 1, dtype=self.dtype, name="skip")(x)
    out = x + h
    chex.assert_shape(out, (b, *x.shape[1:3], self.out_ch))
    return out


class AttentionBlock(nn.Module):
  """Residual multi-head self-attention over the H*W positions of each example.

  GN -> 1x1 qkv -> softmax(q k^T / sqrt(d)) v -> zero-initialised 1x1 out projection -> + x.
  The logits and the softmax are computed in float32 (bfloat16 logits lose the small
  differences that decide the attention weights).
  """
  num_heads: int = 1
  num_groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C] in `dtype`. C must be divisible by num_heads."""
    chex.assert_rank(x, 4)
    b, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"AttentionBlock: {c} channels are not divisible by num_heads="
                       f"{self.num_heads}; choose a head count that divides the width.")
    x = x.astype(self.dtype)
    h = GroupNorm(self.num_groups, self.dtype, name="norm")(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(h)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k, v = (einops.rearrange(a, "b h w (n d) -> b n (h w) d", n=self.num_heads)
               for a in (q, k, v))
    d = c // self.num_heads
    logits = jnp.einsum("bnqd,bnkd->bnqk", q.astype(jnp.float32), k.astype(jnp.float32))
    weights = jax.nn.softmax(logits / math.sqrt(d), axis=-1)
    out = jnp.einsum("bnqk,bnkd->bnqd", weights, v.astype(jnp.float32)).astype(self.dtype)
    out = einops.rearrange(out, "b n (h w) d -> b h w (n d)", h=hh, w=ww)
    out = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=zeros_init,
                   name="out")(out)
    return x + out


class Downsample(nn.Module):
  """Strided 3x3 conv: [B, H, W, C] -> [B, H/2, W/2, C].

  patches: compute it as a matmul over extracted patches (see `Conv`); for a network that is
  differentiated twice (the encoder).
  """
  dtype: Dtype = jnp.float32
  patches: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    b, hh, ww, c = x.shape
    out = conv3x3(c, self.dtype, name="conv", strides=2,
                  patches=self.patches)(x.astype(self.dtype))
    chex.assert_shape(out, (b, hh // 2, ww // 2, c))
    return out


class Upsample(nn.Module):
  """Nearest-neighbour x2 then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    b, hh, ww, c = x.shape
    x = materialized(jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=1), 2, axis=2))
    out = conv3x3(c, self.dtype, name="conv")(x)
    chex.assert_shape(out, (b, 2 * hh, 2 * ww, c))
    return out


def as_batch_times(t: jax.Array | float, batch: int) -> jax.Array:
  """A time argument (scalar or [B]) as a [B] float32 array; raises ValueError on other shapes."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t must be a scalar or have shape [B]=({batch},), got {t.shape}.")
  return t


def check_image(x: jax.Array, num_levels: int, who: str) -> None:
  """Raises ValueError unless x is [B, H, W, C] with H, W divisible by 2**(num_levels-1)."""
  if x.ndim != 4:
    raise ValueError(f"{who}: expected an NHWC image batch [B, H, W, C], got shape {x.shape}.")
  if num_levels < 1:
    raise ValueError(f"{who}: ch_mult needs at least one level, e.g. (1, 2, 2).")
  factor = 2 ** (num_levels - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"{who}: {num_levels} levels downsample by {factor}, which does not divide "
                     f"the image size {x.shape[1]}x{x.shape[2]}; use fewer levels (ch_mult) or "
                     f"another image size.")
