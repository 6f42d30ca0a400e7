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

Who allocates those buffers (gdb, a catchpoint on `mmap` above 100 MB, 32x32 plain step, jax
0.12.0.1): XLA's temporary buffer is allocated by the PJRT CPU client
(`CpuDeviceMemory::AllocateInto` -> `posix_memalign`) on a thread of its async work runner, and the
~151 MB blocks are Eigen's packing buffers for its convolution contractions, on the intra-op
threads; neither can be moved to the main thread's heap from here.

jemalloc can keep them: with decay off it reuses any freed extent, per thread, without one
contended arena. It must be in the process before anything allocates, so it is preloaded
(LD_PRELOAD) by `launch/cpu.sh`, which calls `launcher_main()`: `preload_environment()` finds the
library (SAMI_JAX_JEMALLOC, the conda environment, the system's library directories) and adds
MALLOC_CONF=JEMALLOC_CONF unless you set your own. Measured (benchmarks/README.md): the 32x32
SAMI step at 0.63x the time, no page faults, the same loss and gradients bit for bit. Under
jemalloc the glibc settings below step aside (`active_allocator()`).

`import sami_jax` calls `apply_process_settings()` once: skipped when SAMI_JAX_HOST_MALLOC=off,
when jemalloc is the process's allocator, when the environment already sets either value
(MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES naming glibc.malloc.mmap_max /
glibc.malloc.trim_threshold: yours wins), and where the C library is not glibc (macOS, musl). It
changes no computed value. No JAX import.
"""

from __future__ import annotations

import ctypes
import os
import shlex
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
  libc = _glibc() if wanted and active_allocator() == "glibc" else None
  if libc is None:
    return False
  return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
             for param, value in wanted)


# --- jemalloc, preloaded by launch/cpu.sh -------------------------------------------------------
#
# glibc cannot keep a worker thread's block above 64 MB; jemalloc keeps any freed extent for reuse
# (with decay off), per thread and without one contended arena. It has to be in the process before
# anything allocates, so it is preloaded (LD_PRELOAD) by the launcher, not set here at import.

_JEMALLOC_VAR = "SAMI_JAX_JEMALLOC"
# Freed extents are kept, never purged (dirty/muzzy decay off), and large ones are served by the
# ordinary arenas (jemalloc otherwise gives allocations above 8 MB an arena that purges at once).
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_JEMALLOC_FILES = ("libjemalloc.so.2", "libjemalloc.so")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/usr/local/lib64")
INSTALL_HINT = ("install jemalloc (apt-get install libjemalloc2, dnf install jemalloc, or conda "
                "install jemalloc) or set SAMI_JAX_JEMALLOC=/path/to/libjemalloc.so.2")


def _skipped(env: dict[str, str]) -> bool:
  """Whether jemalloc is not to be looked for: opted out (SAMI_JAX_JEMALLOC=off) or not Linux."""
  return not sys.platform.startswith("linux") or xla_options.opted_out(env, _JEMALLOC_VAR)


def _already_preloaded(env: dict[str, str]) -> bool:
  return "jemalloc" in env.get("LD_PRELOAD", "")


def find_jemalloc(environ: dict[str, str] | None = None) -> str | None:
  """The path of the jemalloc shared library to preload, or None (not found, or opted out).

  SAMI_JAX_JEMALLOC names the file (or "off" to run with glibc); otherwise the conda environment's
  lib/ (CONDA_PREFIX) and the usual system library directories are searched.

  Raises:
    ValueError: SAMI_JAX_JEMALLOC names something that is not a file.
  """
  env = os.environ if environ is None else environ
  if _skipped(env):
    return None
  explicit = env.get(_JEMALLOC_VAR, "").strip()
  if explicit:
    if not os.path.isfile(explicit):
      raise ValueError(f"{_JEMALLOC_VAR}={explicit} is not a file: point it at "
                       "libjemalloc.so.2, or set it to off to run with glibc's malloc")
    return explicit
  conda = (os.path.join(env["CONDA_PREFIX"], "lib"),) if env.get("CONDA_PREFIX") else ()
  dirs = conda + _LIB_DIRS
  for d in dirs:
    for name in _JEMALLOC_FILES:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def preload_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
  """The environment variables that make a new process run on jemalloc (empty: nothing to set).

  LD_PRELOAD gets the library in front of what it already lists; MALLOC_CONF gets JEMALLOC_CONF
  unless the environment sets its own. Empty when jemalloc is not found, opted out, or already
  in LD_PRELOAD.

  Raises:
    ValueError: from `find_jemalloc`.
  """
  env = os.environ if environ is None else environ
  if _already_preloaded(env):
    return {}
  path = find_jemalloc(env)
  if path is None:
    return {}
  out = {"LD_PRELOAD": ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)}
  if "MALLOC_CONF" not in env:
    out["MALLOC_CONF"] = JEMALLOC_CONF
  return out


def active_allocator() -> str:
  """"jemalloc" when it is loaded in this process (preloaded), else "glibc" or "other"."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      if "libjemalloc" in f.read():
        return "jemalloc"
  except OSError:
    pass
  return "glibc" if _glibc() is not None else "other"


def launcher_main(environ: dict[str, str] | None = None) -> int:
  """launch/cpu.sh's step: prints `export` lines for `preload_environment`, a note on stderr.

  Returns:
    The exit status: 2 when SAMI_JAX_JEMALLOC is bad (one line on stderr naming the fix), else 0
    (also when jemalloc is not found: the command then runs on the system malloc).
  """
  env = os.environ if environ is None else environ
  try:
    wanted = preload_environment(env)
  except ValueError as e:
    print(f"sami_jax: {e}", file=sys.stderr)
    return 2
  if wanted:
    for k, v in wanted.items():
      print(f"export {k}={shlex.quote(v)}")
    note = f"preloading {wanted['LD_PRELOAD'].split(':')[0]}"
  elif _already_preloaded(env):
    note = "jemalloc already in LD_PRELOAD"
  elif _skipped(env):
    note = "running on the system malloc"
  else:
    note = f"jemalloc not found, running on glibc's malloc; to run faster, {INSTALL_HINT}"
  print(f"sami_jax: {note}", file=sys.stderr)
  return 0
