"""The streams of randomness, one id per purpose, so each is separate and reproducible.

Every key of a run derives from `PRNGKey(config.seed)`: `stream(seed, PURPOSE)` folds in the
purpose, and loops fold in their step (`fold_in(stream, step)`), so a resumed run draws exactly
what an uninterrupted one draws.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

INIT = 0          # parameter initialisation
TRAIN = 1         # the train step (t, eps, z, dropout), folded with the step
SAMPLE = 2        # image grids written during and after training, folded with the step
EVAL = 3          # --mode=eval, one sub-stream per report section
LATENT_PRIOR = 4  # fitting and sampling the latent diffusion prior


def stream(seed: int, purpose: int) -> jax.Array:
  """The root key of one purpose: fold_in(PRNGKey(seed), purpose)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), purpose)


def section_key(seed: int, section: str) -> jax.Array:
  """The key of one evaluation report section: a pure function of (run seed, section name)."""
  return jax.random.fold_in(stream(seed, EVAL), zlib.crc32(section.encode()) & 0x7FFFFFFF)


def normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """jax.random.normal(key, shape, dtype), drawn as a flat vector and reshaped.

  The values are the same (with JAX's default partitionable threefry, element i of the flat draw
  is element i of the shaped one), but XLA:CPU compiles the 1-D draw several times faster: a
  [3, 3, 16, 16] draw took 4.8 s to compile against 0.2 s flat (jax 0.12; 3.1 s against 0.4 s
  for [32, 16, 16, 1] under jax 0.10), and a program compiles one such kernel per draw.
  """
  shape = tuple(int(d) for d in shape)
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def uniform(key: jax.Array, shape, dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
  """jax.random.uniform, drawn flat and reshaped (see `normal`)."""
  shape = tuple(int(d) for d in shape)
  return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)


# Threefry-2x32's rotation constants, the two alternating sets of four rounds (Salmon et al.,
# "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
  return jax.lax.shift_left(x, np.uint32(r)) | jax.lax.shift_right_logical(x, np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash (20 rounds) of the counter pairs (x1, x2) under the key (k1, k2).

  The same function as JAX's threefry2x32 primitive, written as straight-line uint32 arithmetic.
  On CPU JAX lowers that primitive to a loop over the five key injections (to save compile time),
  which XLA:CPU runs as a `while` of small kernels; these ~100 element-wise operations fuse into
  one loop instead (see `bernoulli`).

  Args:
    k1, k2: uint32 scalars, the two words of the key.
    x1, x2: uint32 arrays of one shape, the counters.
  Returns:
    Two uint32 arrays of the counters' shape.
  """
  ks = (k1, k2, k1 ^ k2 ^ _KS_PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  """(k1, k2) if `key` is a threefry2x32 key whose draws JAX makes the partitionable way, else None."""
  if not jax.config.jax_threefry_partitionable or jax.config.jax_enable_x64:
    return None  # other counters, or (x64: a float64 p) other bits per draw
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape or "threefry" not in str(jax.random.key_impl(key)):
      return None
    key = jax.random.key_data(key)
  elif (key.shape != (2,) or key.dtype != jnp.uint32
        or jax.config.jax_default_prng_impl != "threefry2x32"):
    return None
  return key[0], key[1]


def bernoulli(key: jax.Array, p: float, shape) -> jax.Array:
  """jax.random.bernoulli(key, p, shape), the same values, computed in one fused kernel.

  For a threefry2x32 key (JAX's default) under JAX's default partitionable draws, element i of
  the result is `uniform_i < p` where uniform_i is made from the hash of the counter pair
  (i >> 32, i mod 2**32) exactly as `jax.random.uniform` makes it (the hash's two words XORed,
  the top 23 bits as the mantissa of a float in [1, 2), minus 1). Written out here so that the
  hash is `threefry2x32` above instead of the CPU lowering's loop: dropout's masks, in the 32x32
  U-Net's train step, cost 5% of its single-core time that way (benchmarks/README.md). Any other
  key kind, or arrays of 2**32 elements or more, go to jax.random.bernoulli itself.

  Args:
    key: a PRNG key (raw uint32[2] or typed).
    p: the probability of True, a Python float in [0, 1].
    shape: the result's shape.
  Returns:
    bool array of `shape`.
  """
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  words = _threefry_key_words(key)
  if words is None or size >= 2**32:
    return jax.random.bernoulli(key, p, shape)
  counts = jax.lax.iota(jnp.uint32, size).reshape(shape)
  b1, b2 = threefry2x32(words[0], words[1], jnp.zeros_like(counts), counts)
  mantissa = jax.lax.shift_right_logical(b1 ^ b2, np.uint32(32 - 23))
  u = jax.lax.bitcast_convert_type(mantissa | np.float32(1.0).view(np.uint32),
                                   jnp.float32) - np.float32(1.0)
  return u < np.float32(p)
