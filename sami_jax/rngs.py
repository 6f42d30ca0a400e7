"""The streams of randomness, one id per purpose, so each is separate and reproducible.

Every key of a run derives from `PRNGKey(config.seed)`: `stream(seed, PURPOSE)` folds in the
purpose, and loops fold in their step (`fold_in(stream, step)`), so a resumed run draws exactly
what an uninterrupted one draws.
"""

from __future__ import annotations

import zlib

import jax

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
