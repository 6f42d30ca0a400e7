"""glibc malloc settings under which XLA:CPU steps stop page-faulting their working set.

XLA:CPU allocates each execution's temporaries afresh and frees them when it ends. glibc serves
allocations above its mmap threshold with `mmap` and returns them with `munmap`, and trims the top
of its heaps back to the kernel, so on Linux every train step touches fresh pages again: measured
on a 2-core x86 CPU (benchmarks/README.md), 15k minor page faults per SAMI step at the quick-start
size and 266k at the 32x32 size, each a kernel entry plus a zeroed page. Two `mallopt` settings
make glibc keep freed memory for the next step instead:

  - M_MMAP_MAX = 0: no allocation is served by its own mmap; they come from the arenas' heaps;
  - M_TRIM_THRESHOLD = 64 MB: freed memory at the top of a heap is handed back only beyond 64 MB.
    A per-thread heap never grows past 64 MB, so XLA's worker threads keep theirs; the main heap
    still returns a large block freed at its top (a dataset array, an evaluation's outputs).

Measured on that CPU (jax 0.12.0.1, benchmarks/ab_step.py, 40 interleaved rounds, same loss and
gradients bitwise): the quick-start SAMI step takes 0.81x the wall time (0.80x the CPU time), the
plain step 0.85x (measured with no trimming at all; the 64 MB threshold is the same for the
worker threads' heaps). The quick start (`python -m sami_jax.main --config=configs/disks.py:cpu`),
alone on a 2-core AMD EPYC with AVX-512, runs at 10.0-10.4 steps/s against 8.1-9.0 with glibc's
defaults, 5:49-5:59 wall against 6:24-7:02, in 2.4-2.6 GiB max RSS against 1.4 GiB: the price is
memory, freed blocks kept for reuse rather than returned to the kernel.

What it does not reach: glibc's per-thread arenas grow in heaps of at most 64 MB, so a buffer
larger than that, allocated by one of XLA's worker threads, is still mapped and unmapped each
step. That is the case for the 32x32 benchmark's step (a 567-664 MB temporary buffer and
several ~151 MB ones: ~15% of its CPU time is system time spent faulting them in; no change
measured) and for the quick-start step under jax 0.10 (64.2 MB; 1.01x). `MALLOC_ARENA_MAX=1`
in the environment (one arena for every thread), together with no trimming at all
(`MALLOC_TRIM_THRESHOLD_` above the buffer's size; with the 64 MB threshold here the main heap
returns the block and the faults stay), removes those faults as well, but the threads then
contend for that arena: measured 0.86x in one interleaved 32x32 run, 1.08-1.09x in separate
processes, 1.19x at the quick-start size. Not set here.

`import sami_jax` calls `apply_process_settings()` once: skipped when SAMI_JAX_HOST_MALLOC=off,
when the environment already sets either value (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, or
GLIBC_TUNABLES naming glibc.malloc.mmap_max / glibc.malloc.trim_threshold: yours wins), and where
the C library is not glibc (macOS, musl). It changes no computed value. No JAX import.
"""

from __future__ import annotations

import ctypes
import os
import sys

from sami_jax.utils import xla_options

_OPT_OUT = "SAMI_JAX_HOST_MALLOC"

# mallopt parameter numbers, glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# What the user may already have set, per parameter: glibc's environment variable, its tunable.
_USER_SETTINGS = {
    M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
}
TRIM_THRESHOLD_BYTES = 64 << 20
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def _glibc() -> ctypes.CDLL | None:
  """The process's C library if it is glibc (it exports gnu_get_libc_version), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    libc.mallopt  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def settings_to_apply(environ: dict[str, str] | None = None) -> list[tuple[int, int]]:
  """The (parameter, value) pairs `apply_process_settings` would set under `environ`.

  Empty when SAMI_JAX_HOST_MALLOC is "off"/"0"/"false"/"no"; a parameter the environment already
  sets (glibc's variable or tunable) is left out.
  """
  env = os.environ if environ is None else environ
  if xla_options.opted_out(env, _OPT_OUT):
    return []
  tunables = env.get("GLIBC_TUNABLES", "")
  return [(param, value) for param, value in SETTINGS
          if _USER_SETTINGS[param][0] not in env and _USER_SETTINGS[param][1] not in tunables]


def apply_process_settings(environ: dict[str, str] | None = None) -> bool:
  """Sets `settings_to_apply(environ)` with mallopt for this process.

  Returns:
    Whether every setting asked for was applied (False when none were asked for, or the C
    library is not glibc, or mallopt refused one).
  """
  wanted = settings_to_apply(environ)
  libc = _glibc() if wanted else None
  if libc is None:
    return False
  return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
             for param, value in wanted)
