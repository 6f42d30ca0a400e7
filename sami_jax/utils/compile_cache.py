"""JAX's persistent compilation cache, shared by every run, resume, evaluation and the API.

A second run of the same model (a resume, `--mode=eval`, `sami_jax.load`) then loads its compiled
programs from disk instead of compiling them again: the first train step starts seconds after the
imports instead of after the whole compilation.

Where: $JAX_COMPILATION_CACHE_DIR if you set it (JAX's own variable), else $SAMI_JAX_CACHE_DIR,
else `sami_jax/jax_cache` under the user's cache directory ($XDG_CACHE_HOME or ~/.cache).
SAMI_JAX_CACHE_DIR=off disables it. The cache is safe to delete at any time.
"""

from __future__ import annotations

import os

# Programs that compile faster than this are not worth a disk round trip.
MIN_COMPILE_TIME_S = 0.5


def default_dir() -> str | None:
  """The cache directory this process would use (None: disabled)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  chosen = os.environ.get("SAMI_JAX_CACHE_DIR", "")
  if chosen.lower() in ("off", "none", "0", "false"):
    return None
  if chosen:
    return os.path.expanduser(chosen)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sami_jax", "jax_cache")


def enable() -> str | None:
  """Turns the cache on (unless disabled); returns its directory. Idempotent."""
  import jax  # pylint: disable=g-import-not-at-top
  path = default_dir()
  if path is None:
    return None
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return path
