"""XLA compiler options under which the models run fast on CPU.

XLA:CPU (jax 0.10 and 0.12) hands every float32 convolution to YNNPACK by default. YNNPACK is
slower than XLA's own (Eigen) convolution on the forward pass, and much slower on the weight
gradient, which XLA expresses as a convolution whose window is the whole feature map: on a 2-core
x86 CPU the U-Net's train step runs about 2x faster without it (benchmarks/README.md has the
measurements). The options below keep YNNPACK for dots and reductions and give convolutions back
to XLA. They change no math: only which library sums the same products (float32 rounding).

The models mark a few arrays `layers.materialized` (an optimization barrier) so that XLA does not
fuse a cheap producer, or a sum of cotangents, into the transposes feeding the weight-gradient
convolutions. XLA:CPU honours barriers in fusion only if its barrier-expanding pass
(`cse_barrier_expander`) runs after fusion: it does in jax 0.12's jaxlib; in jax 0.10's it runs
before, so there the options also disable that pass (the barriers then stay to the end, where the
runtime treats them as no-ops). SAMI's 32x32 step: 0.87x on jax 0.10 with it.

`run_once_compiler_options` is for programs that run once, such as the jitted creation of the
train state (the models' initialisers): compiled without LLVM's optimisations they compile about
10x faster on CPU (tens of seconds -> a few) and run in well under a second either way. Not for
the train step: it would compile ~2x faster and run ~2x slower.

Two ways to apply the recommended options, both before the program is compiled:
  - per jitted function: `jax.jit(f, compiler_options=recommended_compiler_options())`;
  - for the whole process: append `recommended_xla_flags()` to the XLA_FLAGS environment variable
    before JAX initialises its CPU backend (XLA reads XLA_FLAGS once).

The project does the second for every process that imports it (`import sami_jax` calls
`apply_process_flags`), so the train step, samplers, evaluation and the API all get it. It is
skipped when XLA_FLAGS already names the option (yours wins), when SAMI_JAX_XLA_FLAGS=off, and for
jaxlib versions it was not measured on (an unknown flag in XLA_FLAGS aborts XLA). It has no effect
if JAX's CPU backend was started before `sami_jax` was imported.

This module imports JAX only inside the functions that need a backend.
"""

from __future__ import annotations

import functools
import os
from typing import Any

# jaxlib releases whose XLA:CPU knows the flag and was measured faster with it (jax 0.10, 0.12).
_MEASURED_JAXLIB = ((0, 10), (0, 11), (0, 12))
_OPT_OUT = "SAMI_JAX_XLA_FLAGS"

# LIBRARY_FUSION_TYPE_* values: XLA's default list is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and
# REDUCE (in both jax 0.10 and 0.12); this is that list without INDIVIDUAL_CONVOLUTION.
_YNN_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE")
_YNN_FLAG_VALUES = ("individual_dot", "reduce")
# The jaxlib releases whose XLA:CPU expands optimization barriers before fusion (measured: 0.10).
_EARLY_BARRIER_EXPANDER = ((0, 10),)
_BARRIER_PASS = "cse_barrier_expander"


def _platform(platform: str | None) -> str:
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.default_backend()
  return platform


def _cpu_options() -> list[tuple[str, str, str]]:
  """The one list of recommended CPU options: (name, compiler-option value, XLA_FLAGS value)."""
  options = [("xla_cpu_experimental_ynn_fusion_type", ",".join(_YNN_TYPES),
              ",".join(_YNN_FLAG_VALUES))]
  if _jaxlib_minor() in _EARLY_BARRIER_EXPANDER:
    options.append(("xla_disable_hlo_passes", _BARRIER_PASS, _BARRIER_PASS))
  return options


def recommended_compiler_options(platform: str | None = None) -> dict[str, Any]:
  """Options for `jax.jit(..., compiler_options=...)` / `Lowered.compile(compiler_options=...)`.

  Args:
    platform: "cpu", "gpu", "tpu", ...; default: JAX's default backend (initialises it).
  Returns:
    A dict of XLA debug options; empty on backends that need none.
  """
  if _platform(platform) != "cpu":
    return {}
  return {name: value for name, value, _ in _cpu_options()}


def recommended_xla_flags(platform: str = "cpu") -> str:
  """The same options as command-line flags for the XLA_FLAGS environment variable ("" if none).

  Unlike `recommended_compiler_options`, this does not ask JAX for its backend (XLA_FLAGS must be
  set before the backend starts), so the platform is an argument.
  """
  if platform != "cpu":
    return ""
  return " ".join(f"--{name}={flag}" for name, _, flag in _cpu_options())


def run_once_compiler_options(platform: str | None = None) -> dict[str, Any]:
  """Options for a jitted program that runs once (e.g. the train state's initialisation).

  On CPU: no LLVM optimisation. The values computed are the same up to float32 rounding.

  Args:
    platform: as in `recommended_compiler_options`.
  Returns:
    A dict of XLA debug options (including the recommended ones); empty where none are needed.
  """
  if _platform(platform) != "cpu":
    return {}
  return {**recommended_compiler_options("cpu"), "xla_backend_optimization_level": 0,
          "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _jaxlib_minor() -> tuple[int, int] | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    parts = metadata.version("jaxlib").split(".")
    return int(parts[0]), int(parts[1])
  except (metadata.PackageNotFoundError, ValueError, IndexError):
    return None


def opted_out(environ: dict[str, str], name: str) -> bool:
  """Whether the environment variable `name` says "off" (or "0", "false", "no"; any case).

  The one reading of the project's process-wide opt-outs (SAMI_JAX_XLA_FLAGS here,
  SAMI_JAX_HOST_MALLOC in `host_memory`).
  """
  return environ.get(name, "").strip().lower() in ("off", "0", "false", "no")


def apply_process_flags(environ: dict[str, str] | None = None) -> bool:
  """Appends the flags of `recommended_xla_flags()` to XLA_FLAGS for this process (and its
  subprocesses).

  Args:
    environ: the environment to change (default os.environ; a dict in tests).
  Returns:
    Whether a flag was added. Each is left out when XLA_FLAGS already names its option (yours
    wins); none is added when SAMI_JAX_XLA_FLAGS is "off"/"0"/"false" or when the installed
    jaxlib is not one they were measured on. Only CPU compiles read them; GPU and TPU ignore
    them.
  """
  env = os.environ if environ is None else environ
  if opted_out(env, _OPT_OUT) or _jaxlib_minor() not in _MEASURED_JAXLIB:
    return False
  flags = env.get("XLA_FLAGS", "")
  new = [f"--{name}={flag}" for name, _, flag in _cpu_options() if name not in flags]
  if not new:
    return False
  env["XLA_FLAGS"] = " ".join([flags, *new]).strip()
  return True

