"""Checkpoints (Orbax) of the train state, the config and the data position, plus a workdir lock.

    ckpt = Checkpointer(workdir + "/checkpoints", keep_last=3, keep_every=10_000)
    ckpt.save(step, state, config=config_dict, data_position={"step": step, "seed": seed})
    state, config, data_position, step = ckpt.restore(abstract_state_with_shardings)

Layout on disk (Orbax's `CheckpointManager`, one directory per step):

    <directory>/<step>/state/          the state pytree (OCDBT/zarr, written by every process)
    <directory>/<step>/config/         the run's config as JSON
    <directory>/<step>/data_position/  {"step": int, "seed": int} as JSON
    <directory>/<step>/integrity/      a fingerprint of every array of the state, as JSON
    <directory>/damaged/<step>/        checkpoints found damaged, moved aside (see `save`)

Safety properties this module relies on (checked in the installed Orbax 0.12.8 source):
- A step is written to a temporary directory and renamed into place only when every file is
  committed, so a crash mid-save never leaves a half-written `<step>` that looks complete.
- Old steps are removed by the keep policy only in the save's finalize phase, *after* the new
  step's commit succeeded (a failed commit raises before deletion), so an intact checkpoint is
  never deleted before a newer one is committed, and a save that fails (a full disk) loses nothing.

What this module adds:
- `save` refuses a state holding NaN/Inf (`NonFiniteStateError`): such a checkpoint would be
  restored on every rerun and fail the same way.
- `save` records a fingerprint of every array (`integrity/`); `restore` recomputes it on what was
  read and treats a checkpoint whose contents differ (overwritten bytes, a flipped bit) or are not
  finite exactly like an unreadable one: the newest intact checkpoint is used and the damaged ones
  are reported by step. Checkpoints written before fingerprints existed still restore, with a
  warning that they cannot be verified (they are still checked to be finite).
- A failed write (full disk, read-only or forbidden directory) is one `CheckpointSaveError`
  naming the directory and the fix, and Orbax's background-thread tracebacks about it (and about
  the reads it abandons after a damaged read) are kept off the console.

The fingerprint (`fingerprints`) is a reduction computed where the array lives (jitted on
accelerators; numpy for host arrays and small CPU arrays) rather than a crc32 of the bytes: the
bytes of a sharded array are spread over processes (no process could checksum the whole array),
copying an accelerator's state to the host once more per save costs as much as the save's own
copy, and zlib's crc32 runs at about 1 GB/s on one core (measured: 0.39 s for 400 MB). Each array
is viewed as 32-bit words w_i (bitcast; 8/16-bit types widened, 64-bit ones split in two) and
summarised by two sums modulo 2**32: sum_i w_i, which changes under any single flipped bit, and
sum_i fmix32(w_i ^ fmix32(i * 0x9E3779B9 + 1)) with Murmur3's finaliser fmix32 and i the word's
flat (C-order) index, which also changes when words are swapped or overwritten (a random change
goes unnoticed with probability about 2**-32 per sum). Addition modulo 2**32 is exact and
order-free, so the result does not depend on how the array is sharded: every process computes
the same fingerprint of the global array, a restore on another number of devices verifies
against the same record, and all processes of a multi-process run reach the same verdict (and
fall back together).
"""

from __future__ import annotations

import errno as errno_lib
import glob
import json
import logging as std_logging
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_STATE = "state"
_CONFIG = "config"
_DATA_POSITION = "data_position"
_INTEGRITY = "integrity"
_ITEM_NAMES = (_STATE, _CONFIG, _DATA_POSITION, _INTEGRITY)
_DAMAGED_SUBDIR = "damaged"
# Written into every integrity record; a record of another format is ignored (with a warning).
_INTEGRITY_FORMAT = "sami_jax.checkpoint.integrity/1"
_FINGERPRINT_ALGORITHM = "u32sum+fmix32sum/1"
# How many array names an error message lists before "and N more".
_NAMES_SHOWN = 3

# Orbax raises plain ValueErrors both for damaged files and for a target that does not match the
# saved tree; these fragments (Orbax 0.12.8 wording) single out the latter, which is a user error
# (wrong config) rather than damage, so that it is reported at once instead of falling back.
_MISMATCH_FRAGMENTS = ("tree structures do not match", "is not compatible with the stored shape")

PyTree = Any


class NonFiniteStateError(FloatingPointError):
  """`Checkpointer.save` was given a state holding NaN or Inf; nothing was written.

  Attributes:
    step: the step that was not saved.
    directory: the checkpoint directory (left as it was).
    leaves: paths ("params/denoiser/...") of every array holding a non-finite value.
  """

  def __init__(self, message: str, *, step: int, directory: str, leaves: list[str]):
    super().__init__(message)
    self.step, self.directory, self.leaves = step, directory, leaves


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (full disk, read-only or forbidden directory, ...).

  The message is one line naming the directory, the cause and the fix. Older checkpoints are
  untouched and the partial files of the failed one are removed.

  Attributes:
    step: the step whose save failed.
    directory: the checkpoint directory.
    errno: the OS error number (e.g. errno.ENOSPC) when one was found, else None.
  """

  def __init__(self, message: str, *, step: int | None, directory: str, errno: int | None):
    super().__init__(message)
    self.step, self.directory, self.errno = step, directory, errno


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint tried was damaged (unreadable, altered or non-finite).

  Attributes:
    directory: the checkpoint directory.
    damaged: {step: one-line reason} for every step tried.
  """

  def __init__(self, message: str, *, directory: str, damaged: dict[int, str]):
    super().__init__(message)
    self.directory, self.damaged = directory, damaged


class _DamagedContents(Exception):
  """What was read does not match the checkpoint's record, or is not finite."""


def _is_mismatch(error: BaseException) -> bool:
  return isinstance(error, ValueError) and any(f in str(error) for f in _MISMATCH_FRAGMENTS)


def _short(error: BaseException, limit: int = 300) -> str:
  """One-line summary of an exception for log messages (Orbax's can be pages long)."""
  text = " ".join(str(error).split())
  if len(text) > limit:
    text = text[:limit] + " ..."
  if isinstance(error, _DamagedContents):
    return text
  return f"{type(error).__name__}: {text}"


def _names(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_NAMES_SHOWN])
  if len(paths) > _NAMES_SHOWN:
    shown += f" and {len(paths) - _NAMES_SHOWN} more"
  return shown


def _abstract_target(target: PyTree) -> PyTree:
  """`ShapeDtypeStruct`s with a sharding for every array leaf of `target`.

  Leaves without a sharding (plain `ShapeDtypeStruct`s, numpy arrays) get the first local device:
  otherwise Orbax would reuse the sharding stored in the checkpoint, which names devices of the
  machine that saved it and fails on a different topology.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      return x
    sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, target)


def _sync(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------ fingerprints


def _fmix32(h):
  """Murmur3's 32-bit finaliser: a bijection of uint32 that mixes every input bit into all.

  Works on jax and numpy uint32 arrays alike (both wrap modulo 2**32).
  """
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


_INDEX_MULTIPLIER = np.uint32(0x9E3779B9)
# Words per step of the host computation: bounds its temporaries to a few times 16 MiB.
_HOST_CHUNK = 1 << 22


def _is_key(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _can_be_nonfinite(dtype) -> bool:
  return not _is_key(dtype) and jnp.issubdtype(dtype, jnp.inexact)


def _word_plan(dtype) -> tuple[str, Any]:
  """How an element type becomes uint32 words: ("bool"|"wide"|"bitcast", unsigned type)."""
  if dtype == np.bool_:
    return "bool", None
  bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
          else jnp.finfo(dtype).bits)
  if bits < 8:  # int4, float4: no bitcast to a byte; widening is exact
    return "wide", np.float32 if jnp.issubdtype(dtype, jnp.floating) else np.int32
  return "bitcast", {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint32}[bits]


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (8/16-bit elements widened, 64-bit ones split in two)."""
  if _is_key(x.dtype):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  kind, target = _word_plan(x.dtype)
  if kind == "bool":
    return x.astype(jnp.uint32)
  if kind == "wide":
    return jax.lax.bitcast_convert_type(x.astype(target), jnp.uint32)
  return jax.lax.bitcast_convert_type(x, target).astype(jnp.uint32)


def _leaf_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(all finite: bool [], fingerprint: uint32 [2]) of one array, on its devices."""
  finite = jnp.all(jnp.isfinite(x)) if _can_be_nonfinite(x.dtype) else jnp.array(True)
  words = _as_words(x)
  if words.size == 0:
    return finite, jnp.zeros((2,), jnp.uint32)
  if words.ndim == 0:
    words = words[None]
  # The flat (C-order) word index from per-axis iotas: no reshape, so a sharded array stays put.
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
    stride = (stride * words.shape[axis]) % 2**32
  mixed = _fmix32(words ^ _fmix32(index * _INDEX_MULTIPLIER + np.uint32(1)))
  return finite, jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


# One compilation per (shape, dtype, sharding): a train state has far fewer distinct ones than
# arrays, and XLA compiles a single program over every array of the state several times slower
# (measured on CPU for the 360 arrays of configs/disks.py:test: one program 12-15 s, per-shape
# programs 6 s in all).
_leaf_stats_jit = jax.jit(_leaf_stats)


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_as_words` on the host: a flat uint32 array (a view when the dtype allows)."""
  if np.issubdtype(x.dtype, np.complexfloating):
    x = np.stack([x.real, x.imag], axis=-1)
  x = np.ascontiguousarray(x)
  kind, target = _word_plan(x.dtype)
  if kind == "bool":
    return x.astype(np.uint32).ravel()
  if kind == "wide":
    return x.astype(target).view(np.uint32).ravel()
  return x.view(target).astype(np.uint32, copy=False).ravel()


def _host_stats(x: np.ndarray) -> tuple[bool, int, int]:
  """`_leaf_stats` computed with numpy: (all finite, sum of words, sum of mixed words)."""
  finite = bool(np.all(np.isfinite(x))) if _can_be_nonfinite(x.dtype) else True
  words = _host_words(x)
  total = mixed_total = 0
  for start in range(0, words.size, _HOST_CHUNK):
    w = words[start:start + _HOST_CHUNK]
    index = (np.arange(start, start + w.size, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    mixed = _fmix32(w ^ _fmix32(index * _INDEX_MULTIPLIER + np.uint32(1)))
    total += int(np.sum(w, dtype=np.uint64))
    mixed_total += int(np.sum(mixed, dtype=np.uint64))
  return finite, total & 0xFFFFFFFF, mixed_total & 0xFFFFFFFF


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _on_host(x) -> bool:
  """Whether a leaf is best fingerprinted with numpy: host data, or small CPU arrays.

  Measured on this project's 2-core CPU machine: numpy takes 0.06 s for the 360 arrays (64k
  values) of configs/disks.py:test where XLA first compiles for 3 s; for 100M float32 values XLA
  takes 0.19 s and numpy 1.9 s. So CPU arrays up to `_HOST_CHUNK` words go through numpy.
  """
  if not isinstance(x, jax.Array):
    return True
  return (x.is_fully_addressable and x.size <= _HOST_CHUNK
          and all(d.platform == "cpu" for d in x.sharding.device_set))


def fingerprints(tree: PyTree, *, on_device: bool | None = None) -> list[dict[str, Any]]:
  """Finiteness and fingerprint of every array leaf of `tree` (see the module docstring).

  Arrays on accelerators are reduced where they are, one jitted call per array (compiled once per
  shape, dtype and sharding); only a flag and two words per array come back to the host, in one
  transfer. Host arrays and small CPU arrays are reduced with numpy (no copy, no compile).
  Both give identical results (integer arithmetic modulo 2**32).

  Args:
    tree: pytree of jax.Arrays (any sharding, multi-process included: then every process must
      call this together) and/or numpy arrays.
    on_device: force the jitted (True) or numpy (False) computation; None chooses per array.

  Returns:
    One dict per array leaf, in tree order: {"path": "params/denoiser/...", "shape": [...],
    "dtype": "float32", "finite": bool, "digest": 16 hex digits}.
  """
  flat, _ = jax.tree.flatten_with_path(tree)
  leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for _, x in flat]
  results: list[Any] = [None] * len(leaves)
  device_jobs = []
  for i, x in enumerate(leaves):
    host = _on_host(x) if on_device is None else not on_device
    if host and isinstance(x, jax.Array) and not x.is_fully_addressable:
      host = False  # other processes hold parts of it
    if host:
      results[i] = _host_stats(np.asarray(jax.random.key_data(x) if _is_key(x.dtype) else x))
    else:
      device_jobs.append((i, _leaf_stats_jit(x)))
  for (i, _), (flag, words) in zip(device_jobs, jax.device_get([j for _, j in device_jobs])):
    results[i] = (bool(flag), int(words[0]), int(words[1]))
  return [{"path": _path_name(path), "shape": [int(d) for d in x.shape], "dtype": str(x.dtype),
           "finite": r[0], "digest": f"{r[1]:08x}{r[2]:08x}"}
          for (path, _), x, r in zip(flat, leaves, results)]


def nonfinite_leaves(tree: PyTree) -> list[str]:
  """Paths ("params/denoiser/...") of the array leaves of `tree` holding a NaN or Inf."""
  return [f["path"] for f in fingerprints(tree) if not f["finite"]]


def _json_digest(value: Any) -> str:
  """crc32 of a JSON item as Orbax writes it (json.dumps round-trips its own output)."""
  return f"{zlib.crc32(json.dumps(value).encode('utf-8')):08x}"


def _integrity_record(prints: list[dict[str, Any]], config: dict, data_position: dict) -> dict:
  return {
      "format": _INTEGRITY_FORMAT,
      "algorithm": _FINGERPRINT_ALGORITHM,
      "arrays": [{k: f[k] for k in ("path", "shape", "dtype", "digest")} for f in prints],
      _CONFIG: _json_digest(config),
      _DATA_POSITION: _json_digest(data_position),
  }


# ------------------------------------------------------------------------------ quiet failures


# Orbax (0.12.8) logs a failed background save up to four times with a full traceback each, from
# the threads involved, and then raises the same error from `wait_until_finished`, where this
# module turns it into one CheckpointSaveError. These fragments of its format strings single out
# exactly those records (each is followed by a `raise` in Orbax's source).
_ORBAX_SAVE_FAILURE_LOGS = ("_SignalingThread.run() raised an exception",
                            "Handler Commit operations or the Commit callback",
                            "Save Finalize thread (%s) failed",
                            "Failed to write metadata=%s path=%s")


_ORBAX_PATH = f"{os.sep}orbax{os.sep}"
_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved")


class _OrbaxNoise:
  """Keeps Orbax's after-the-fact tracebacks about a failed save or a damaged read off stderr.

  When one array of a checkpoint fails to read (or write), Orbax gives up on the others and closes
  its event loop while TensorStore is still working on them. Each of those operations then ends in
  a traceback printed through `sys.unraisablehook`: "RuntimeError: Event loop is closed" (from
  TensorStore's completion callback) or "Exception ignored in: <coroutine object ...>" (an
  abandoned Orbax coroutine raising while it is garbage-collected), and through the "asyncio"
  logger: "Task exception was never retrieved" for every abandoned write of a failed save, often
  at exit. That is hundreds to thousands of lines for one damaged checkpoint or full disk, at
  random times after the failure was already handled. They carry no information beyond the error
  this module reports, so they are counted and one line is logged. Only those are dropped (an
  Orbax coroutine, TensorStore's callback into a closed asyncio loop, an asyncio report whose
  traceback runs through Orbax, Orbax's own repeats of a save failure that it then raises): any
  other unraisable exception or log record passes through.
  """

  def __init__(self):
    self.dropped = 0
    self._lock = threading.Lock()
    self._previous_hook = None
    # Checkpoint directories of this process: an abandoned write names its file in them.
    self._directories: set[str] = set()

  def install(self, directory: str) -> None:
    with self._lock:
      self._directories.add(directory)
      if not isinstance(getattr(sys.unraisablehook, "__self__", None), _OrbaxNoise):
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable_hook
      for name in ("absl", "asyncio"):
        logger = std_logging.getLogger(name)
        if self not in logger.filters:
          logger.addFilter(self)

  @staticmethod
  def is_noise(unraisable) -> bool:
    """Whether an unraisable exception is one of the after-the-fact Orbax/TensorStore ones."""
    obj = unraisable.object
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    if code is not None and _ORBAX_PATH in code.co_filename:
      return True
    exc = unraisable.exc_value
    if obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      tb, last = unraisable.exc_traceback, None
      while tb is not None:
        last, tb = tb, tb.tb_next
      return last is not None and f"{os.sep}asyncio{os.sep}" in last.tb_frame.f_code.co_filename
    return False

  def _count(self) -> None:
    with self._lock:
      self.dropped += 1
      first = self.dropped == 1
    if first:
      logging.info("Dropping the tracebacks of the reads/writes Orbax abandoned after a checkpoint "
                   "failed ('Event loop is closed', 'exception was never retrieved'): harmless, "
                   "the failure itself is reported once.")

  def unraisable_hook(self, unraisable) -> None:
    try:
      noise = self.is_noise(unraisable)
    except Exception:  # pylint: disable=broad-except
      noise = False
    if noise:
      self._count()
      return
    (self._previous_hook or sys.__unraisablehook__)(unraisable)

  def filter(self, record: std_logging.LogRecord) -> bool:
    """False (drop) for Orbax's repeats of a save failure and asyncio's reports of its tasks."""
    if record.levelno < std_logging.ERROR:
      return True
    msg = str(record.msg)
    if record.name == "asyncio":
      # Logged when an abandoned Orbax task or future is garbage-collected, often at exit:
      # "Task exception was never retrieved", "Task was destroyed but it is pending!".
      if not (_NEVER_RETRIEVED.match(msg) or msg.startswith("Task was destroyed")):
        return True
      text = record.getMessage()
      if (_ORBAX_PATH in text or self._from_orbax(record.exc_info)
          or any(d + os.sep in text for d in tuple(self._directories))):
        self._count()
        return False
      return True
    if _ORBAX_PATH not in record.pathname:
      return True
    return not any(fragment in msg for fragment in _ORBAX_SAVE_FAILURE_LOGS)

  @staticmethod
  def _from_orbax(exc_info) -> bool:
    error = exc_info[1] if exc_info and len(exc_info) > 1 else None
    tb = getattr(error, "__traceback__", None)
    while tb is not None:
      if _ORBAX_PATH in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    return False


_NOISE = _OrbaxNoise()


# ------------------------------------------------------------------------------ save errors


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# TensorStore's status names for the OS errors that a save can hit.
_STATUS_ERRNO = (("RESOURCE_EXHAUSTED", errno_lib.ENOSPC), ("PERMISSION_DENIED", errno_lib.EACCES))


def _find_errno(error: BaseException) -> int | None:
  """The OS error number behind an exception (an OSError, or TensorStore's message), if any."""
  seen = set()
  cause: BaseException | None = error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.errno:
      return cause.errno
    match = _OS_ERROR_CODE.search(str(cause))
    if match:
      return int(match.group(1))
    for status, number in _STATUS_ERRNO:
      if status in str(cause):
        return number
    cause = cause.__cause__ or cause.__context__
  return None


def _save_fix(number: int | None, directory: str) -> str:
  if number in (errno_lib.ENOSPC, errno_lib.EDQUOT):
    return (f"Free space on the disk that holds {directory} (see `df -h {directory}`) or train "
            "with a --workdir on another disk, then rerun")
  if number == errno_lib.EROFS:
    return f"{directory} is on a read-only file system: use a writable --workdir and rerun"
  if number in (errno_lib.EACCES, errno_lib.EPERM):
    return (f"This user may not write to {directory}: fix its permissions or use another "
            "--workdir, then rerun")
  return f"Check that {directory} is writable and has free space, then rerun"


# ------------------------------------------------------------------------------ the checkpointer


class Checkpointer:
  """Saves and restores (state, config, data position) with Orbax, keeping recent/periodic steps.

  Every process of a multi-process run must make the same calls (Orbax synchronises them); each
  process writes its own shards of the state.
  """

  def __init__(self, directory: str | os.PathLike, *, keep_last: int, keep_every: int = 0,
               async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the step directories live.
      keep_last: how many of the newest checkpoints to keep (at least 1).
      keep_every: also keep every checkpoint whose step is a multiple of this; 0 keeps none extra.
      async_save: write in a background thread; `save` returns once the arrays are copied to host.

    Raises:
      CheckpointSaveError: the directory cannot be created.
    """
    if int(keep_last) < 1:
      raise ValueError(f"keep_last={keep_last}: keep at least the newest checkpoint (set it >= 1).")
    if int(keep_every) < 0:
      raise ValueError(f"keep_every={keep_every} must be >= 0 (0 disables periodic keeping).")
    self._directory = os.path.abspath(os.fspath(directory))
    _NOISE.install(self._directory)
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=int(keep_last))]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # Leftover temporary directories are ignored by Orbax anyway; deleting them here could
        # remove a save in progress of a training run when this object is only used to read.
        cleanup_tmp_directories=False,
        create=True,
    )
    self._options = options
    try:
      self._manager = self._new_manager()
    except OSError as e:
      raise CheckpointSaveError(
          f"Cannot create the checkpoint directory {self._directory}: {e.strerror or e}. "
          f"{_save_fix(e.errno, self._directory)}.", step=None, directory=self._directory,
          errno=e.errno) from None
    # Steps found damaged by `restore`; `save` moves them aside before writing older steps.
    self._damaged: set[int] = set()
    # The step of a save started in the background and not yet known to be committed.
    self._pending: int | None = None
    # Steps restored without a record to verify against (warned about once each).
    self._unverified_warned: set[int] = set()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self._directory, options=self._options, item_names=_ITEM_NAMES)

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of the committed checkpoints, ascending (damaged ones included until moved aside)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  # ---------------------------------------------------------------------------- saving

  def save(self, step: int, state: PyTree, *, config: Mapping[str, Any],
           data_position: Mapping[str, Any], force: bool = False) -> bool:
    """Saves a checkpoint of `state` (a pytree of arrays, possibly sharded) at `step`.

    Args:
      step: the training step the state is at (after `step` updates).
      state: pytree of jax.Arrays / numpy arrays; every floating array must be finite.
      config: the run's config as a JSON-serialisable dict.
      data_position: where the data stream is, e.g. {"step": step, "seed": seed}.
      force: save even if Orbax's save policy would skip this step.

    Returns:
      True if a save was started; False if this step is already saved (nothing is overwritten).

    Raises:
      NonFiniteStateError: the state holds NaN/Inf (checked on device before anything is
        written; nothing is written).
      CheckpointSaveError: this save, or the previous background one, could not be written.
      ValueError: config or data_position is not JSON-serialisable.
      RuntimeError: the directory holds newer steps than `step` that are not known to be damaged.
    """
    step = int(step)
    for name, value in ((_CONFIG, config), (_DATA_POSITION, data_position)):
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        # Checked here because in an async save the failure would surface later, in a thread.
        raise ValueError(f"Checkpointer.save: `{name}` must be a JSON-serialisable dict "
                         f"(plain str/int/float/bool/list/dict): {e}") from e
    # A failure of the previous background save is reported as such, before this one starts.
    self._finish_pending()
    existing = self.all_steps()
    if step in existing and step not in self._damaged:
      logging.info("Checkpoint for step %d already exists in %s; not overwriting it.", step,
                   self._directory)
      return False
    # Steps >= `step` can only be there after `restore` fell back past damaged ones; they must go
    # before Orbax accepts an older step (and before the keep policy counts them as recent).
    later = [s for s in existing if s >= step]
    unknown = [s for s in later if s not in self._damaged]
    if unknown:
      raise RuntimeError(
          f"Cannot save step {step} in {self._directory}: it already holds newer checkpoints "
          f"{unknown}, and continuing from an older step would mix two training histories. "
          "Move those step directories out of the way (or use a new workdir) and rerun.")
    # Checked before anything on disk changes. Every process computes the same verdict.
    prints = fingerprints(state)
    bad = [f["path"] for f in prints if not f["finite"]]
    if bad:
      raise NonFiniteStateError(
          f"Not saving the checkpoint for step {step}: the state holds NaN/Inf in {len(bad)} of "
          f"{len(prints)} arrays ({_names(bad)}), and resuming from it would fail the same way. "
          f"Nothing was written; the checkpoints in {self._directory} "
          f"({self._describe(existing)}) are untouched.", step=step, directory=self._directory,
          leaves=bad)
    if later:
      self._move_aside(later)
    config, data_position = dict(config), dict(data_position)
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardSave(state),
              _CONFIG: ocp.args.JsonSave(config),
              _DATA_POSITION: ocp.args.JsonSave(data_position),
              _INTEGRITY: ocp.args.JsonSave(_integrity_record(prints, config, data_position)),
          }),
          force=force)
    except Exception as e:  # pylint: disable=broad-except
      if not isinstance(e, OSError) and _find_errno(e) is None:
        raise  # not a failed write (e.g. a leaf Orbax cannot save): shown as it is
      raise self._save_error(step, e) from None
    if saved:
      self._pending = step
      logging.info("Saving checkpoint for step %d in %s.", step, self._directory)
    return bool(saved)

  def _describe(self, steps: list[int]) -> str:
    """'steps [1, 2]', naming the ones a restore found damaged: 'steps [1, 2]; damaged: [3]'."""
    damaged = [s for s in steps if s in self._damaged]
    text = f"steps {[s for s in steps if s not in self._damaged]}"
    return text + (f"; damaged: {damaged}" if damaged else "")

  def _finish_pending(self) -> None:
    """Waits for a background save; its failure becomes a CheckpointSaveError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise self._save_error(step, e) from None
    self._pending = None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    """One-line error for a failed save; removes that save's partial files (one process only)."""
    number = _find_errno(error)
    reason = os.strerror(number) if number else _short(error, 200)
    removed = ""
    if step is not None and jax.process_count() == 1:
      # Orbax writes into <step>.orbax-checkpoint-tmp*, renamed only once complete: what is left
      # there is garbage that fills the disk further (another save would remove it too).
      pattern = os.path.join(glob.escape(self._directory), f"{step}.orbax-checkpoint-tmp*")
      partial = glob.glob(pattern)
      # Writes that Orbax abandoned when the save failed can still land in there (measured: a
      # 1.7 kB file right after the first removal): removed until it stays gone for 0.25 s.
      for _ in range(12):
        for path in glob.glob(pattern):
          shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.25)
        if not glob.glob(pattern):
          break
      if partial:
        removed = (" Its partial files were removed." if not glob.glob(pattern)
                   else f" Its partial files could not all be removed ({pattern}).")
    # Orbax keeps parts of a failed save's errors (e.g. its metadata writes) and raises them again
    # from later calls, even restores of intact steps: start over with a fresh manager.
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      self._manager = self._new_manager()
    except Exception:  # pylint: disable=broad-except
      pass  # the directory itself became unusable; the message below says what to do
    try:
      kept = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      kept = None
    what = f"the checkpoint for step {step}" if step is not None else "a checkpoint"
    kept_text = (f" The checkpoints already there ({self._describe(kept)}) are untouched."
                 if kept is not None else "")
    detail = "" if reason.startswith(type(error).__name__) else f" [{_short(error, 200)}]"
    return CheckpointSaveError(
        f"Could not write {what} to {self._directory}: {reason}.{removed}{kept_text} "
        f"{_save_fix(number, self._directory)}.{detail}",
        step=step, directory=self._directory, errno=number)

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged step directories to <directory>/damaged/ so that older steps can be saved."""
    if jax.process_index() == 0:
      dest_root = os.path.join(self._directory, _DAMAGED_SUBDIR)
      os.makedirs(dest_root, exist_ok=True)
      for s in steps:
        dest = os.path.join(dest_root, str(s))
        if os.path.exists(dest):
          dest = f"{dest}.{int(time.time())}"
        os.rename(os.path.join(self._directory, str(s)), dest)
        logging.warning("Moved the damaged checkpoint for step %d to %s (training continues from "
                        "an older step; delete it once you no longer need it).", s, dest)
    _sync("sami_jax_checkpoint_move_aside")
    self._damaged.difference_update(steps)
    self._manager.reload()

  # ---------------------------------------------------------------------------- restoring

  def _candidates(self, step: int | None) -> list[int]:
    """Steps to try, newest first; raises if there is nothing to restore."""
    self._finish_pending()  # our own in-flight save must be visible
    self._manager.reload()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"No checkpoint in {self._directory}. Train first (or point at the workdir of a run "
          "that has saved a checkpoint).")
    if step is None:
      return steps[::-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self._directory}; the steps "
                              f"there are {steps}.")
    return [int(step)]

  def _has_record(self, step: int) -> bool:
    return (epath.Path(self._directory) / str(step) / _INTEGRITY).exists()

  def _read_record(self, step: int) -> tuple[dict[str, Any] | None, str]:
    """(the integrity record of a step, ""), or (None, why it has none)."""
    if not self._has_record(step):
      return None, "it has no checksums (it was written by an older version)"
    record = self._manager.restore(step, args=ocp.args.Composite(**{
        _INTEGRITY: ocp.args.JsonRestore()}))[_INTEGRITY]
    if not isinstance(record, Mapping) or record.get("format") != _INTEGRITY_FORMAT:
      found = record.get("format") if isinstance(record, Mapping) else record
      return None, f"its checksums are in an unknown format ({found!r})"
    return dict(record), ""

  def _warn_unverified(self, step: int, why: str) -> None:
    if step not in self._unverified_warned:
      self._unverified_warned.add(step)
      logging.warning("Checkpoint for step %d in %s cannot be verified: %s; only checking that "
                      "its arrays are finite.", step, self._directory, why)

  def _verify(self, step: int, tree: PyTree, record: tuple[dict[str, Any] | None, str], *,
              prefix: str = "", json_items: Mapping[str, Any] | None = None) -> None:
    """Raises _DamagedContents if `tree` (restored from `step`) is not what was saved.

    Args:
      step: the step restored.
      tree: the restored arrays (or a subtree of the state, see prefix).
      record: `_read_record(step)`: the step's record, or None and why there is none (then
        only finiteness is checked, with a warning once the contents pass that check).
      prefix: path of `tree` inside the saved state ("" for the whole state).
      json_items: restored JSON items {"config": ..., "data_position": ...} to check too.
    """
    prints = fingerprints(tree)
    for f in prints:
      if prefix:
        f["path"] = f"{prefix}/{f['path']}" if f["path"] else prefix
    bad = [f["path"] for f in prints if not f["finite"]]
    if bad:
      raise _DamagedContents(f"NaN/Inf in {len(bad)} of {len(prints)} arrays ({_names(bad)})")
    record, why_not = record
    if record is None:
      self._warn_unverified(step, why_not)
      return
    saved = {a["path"]: a for a in record.get("arrays", [])}
    changed, unverifiable = [], []
    for f in prints:
      s = saved.get(f["path"])
      if s is None or s["dtype"] != f["dtype"] or list(s["shape"]) != f["shape"]:
        unverifiable.append(f["path"])
      elif s["digest"] != f["digest"]:
        changed.append(f["path"])
    for name, value in (json_items or {}).items():
      if name in record and _json_digest(value) != record[name]:
        changed.append(name)
    if changed:
      raise _DamagedContents(
          f"what was read differs from what was saved in {len(changed)} item(s) "
          f"({_names(changed)}): checksum mismatch")
    if unverifiable:
      self._warn_unverified(step, f"{len(unverifiable)} restored arrays have no matching checksum "
                            f"(e.g. {_names(unverifiable)}; restored with another dtype or "
                            "shape?)")

  def _restore_first_intact(self, step: int | None, restore_one):
    """Runs `restore_one(step)` on the newest intact checkpoint, warning about damaged ones."""
    candidates = self._candidates(step)
    failures: dict[int, str] = {}
    for i, s in enumerate(candidates):
      try:
        result = restore_one(s)
      except Exception as e:  # pylint: disable=broad-except
        if _is_mismatch(e):
          raise ValueError(
              f"The checkpoint for step {s} in {self._directory} does not match the state this "
              f"config builds ({_short(e)}). Restore with the config the run was trained with "
              "(it is saved in the checkpoint), or train in a new workdir.") from e
        failures[s] = _short(e, 200)
        self._damaged.add(s)
        if i + 1 < len(candidates):
          logging.warning("Checkpoint for step %d in %s is damaged or unreadable (%s); trying "
                          "step %d next.", s, self._directory, _short(e), candidates[i + 1])
        continue
      if failures:
        verified = ("not verifiable: no checksums" if s in self._unverified_warned
                    else "verified against its checksums")
        older = candidates[i + 1:]
        logging.warning(
            "Restored step %d from %s; skipped damaged checkpoint(s) %s. Intact: step %d (%s)%s.",
            s, self._directory, list(failures), s, verified,
            f"; older steps {older} were not checked" if older else "")
      return result, s
    details = "; ".join(f"step {s}: {why}" for s, why in failures.items())
    if step is None:
      message = (f"No intact checkpoint in {self._directory} (tried steps {list(failures)}, "
                 f"all damaged; intact: none). {details}. Restore the directory from a backup, "
                 "or move it away to start training from scratch.")
    else:
      others = [s for s in self.all_steps() if s != step]
      message = (f"The checkpoint for step {step} in {self._directory} is damaged ({details}). "
                 f"The other steps there, {others}, were not checked: restore one of them (or "
                 "the newest intact one, with no step given).")
    raise NoIntactCheckpointError(message, directory=self._directory, damaged=failures)

  def restore(self, target: PyTree, step: int | None = None
              ) -> tuple[PyTree, dict[str, Any], dict[str, Any], int]:
    """Restores (state, config, data_position, step), verified against the saved fingerprints.

    Args:
      target: pytree with the structure of the saved state; its leaves are
        `jax.ShapeDtypeStruct`s (or arrays) whose `.sharding` says where each restored array goes.
        Leaves without a sharding are restored onto the first local device.
      step: the step to restore; None means the newest intact checkpoint (damaged newer ones are
        skipped with a warning).

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      ValueError: the checkpoint's tree or shapes differ from `target` (a different config).
      NoIntactCheckpointError (a RuntimeError): every checkpoint tried is unreadable, altered
        (fingerprint mismatch) or holds NaN/Inf.
      CheckpointSaveError: a background save of this object failed (reported before reading).
    """
    abstract = _abstract_target(target)

    def restore_one(s):
      record = self._read_record(s)
      restored = self._manager.restore(s, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _CONFIG: ocp.args.JsonRestore(),
          _DATA_POSITION: ocp.args.JsonRestore(),
      }))
      self._verify(s, restored[_STATE], record, json_items={
          _CONFIG: restored[_CONFIG], _DATA_POSITION: restored[_DATA_POSITION]})
      return restored

    restored, s = self._restore_first_intact(step, restore_one)
    return (restored[_STATE], dict(restored[_CONFIG] or {}),
            dict(restored[_DATA_POSITION] or {}), s)

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with a checkpoint (newest intact one if step is None); reads no arrays.

    Only the config file is checked here (readable, and matching its checksum when recorded); a
    later `restore` of the same step verifies the arrays.
    """

    def restore_one(s):
      has_record = self._has_record(s)
      items = {_CONFIG: ocp.args.JsonRestore()}
      if has_record:
        items[_INTEGRITY] = ocp.args.JsonRestore()
      restored = self._manager.restore(s, args=ocp.args.Composite(**items))
      record = restored[_INTEGRITY] if has_record else None
      if (isinstance(record, Mapping) and _CONFIG in record
          and _json_digest(restored[_CONFIG]) != record[_CONFIG]):
        raise _DamagedContents("the config file differs from what was saved: checksum mismatch")
      return restored

    restored, _ = self._restore_first_intact(step, restore_one)
    return dict(restored[_CONFIG] or {})

  def wait(self) -> None:
    """Blocks until a background save has been committed (and old steps pruned).

    Raises:
      CheckpointSaveError: that save could not be written.
    """
    self._finish_pending()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources.

    Raises:
      CheckpointSaveError: the last background save could not be written (resources are
        released all the same).
    """
    try:
      self._finish_pending()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # a save failure was reported just above

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def step_directory(path: str | os.PathLike) -> tuple[str, int] | None:
  """(the checkpoints folder, the step) when `path` is one step's folder of a checkpoints folder
  (e.g. WORKDIR/checkpoints/6: step 6), else None."""
  path = os.path.abspath(os.fspath(path))
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, _STATE)):
    return os.path.dirname(path), int(name)
  return None


def restore_params_only(directory: str | os.PathLike, step: int | None = None, *,
                        return_step: bool = False) -> PyTree:
  """Parameters (numpy arrays) from another run's checkpoint directory.

  The state saved there is a dict with "params" (and usually "ema_params"); the EMA params are
  returned when present since they are the ones used for sampling. Only that subtree is read, and
  it is verified (finite, and matching its fingerprints when the checkpoint has them).

  Args:
    directory: a Checkpointer directory (e.g. <workdir>/checkpoints).
    step: which step; None means the newest intact one.

    return_step: also return the step that was read.

  Returns:
    The params pytree, e.g. {"denoiser": ..., "encoder": ...}, with np.ndarray leaves (and the
    step, with return_step).
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Checkpoint directory {directory} does not exist; point at the "
                            "checkpoints/ folder (or workdir) of a finished run.")
  reader = Checkpointer(directory, keep_last=1, async_save=False)

  def restore_one(s):
    record = reader._read_record(s)  # pylint: disable=protected-access
    path = epath.Path(directory) / str(s) / _STATE
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, Mapping) or not ({"ema_params", "params"} & set(tree)):
      keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
      raise KeyError(f"the state has no 'params' or 'ema_params' entry (found {keys})")
    key = "ema_params" if "ema_params" in tree else "params"
    item = {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    reader._verify(s, restored[key], record, prefix=key)  # pylint: disable=protected-access
    return restored[key]

  try:
    params, s = reader._restore_first_intact(step, restore_one)  # pylint: disable=protected-access
  finally:
    reader.close()
  logging.info("Read params of step %d from %s.", s, directory)
  return (params, s) if return_step else params


# ------------------------------------------------------------------------------ workdir lock


# Lock files held by WorkdirLock objects of this process: a lock naming this process's pid that is
# not in here was left by an earlier process that had the same pid (e.g. pid 1 in a restarted
# container), so it is stale.
_LOCKS_HELD_HERE: set[str] = set()

# A lock file is written completely before it appears (see WorkdirLock._try_create), so an empty
# or unparsable one was left by a run that failed while writing it (e.g. on a full disk), or by an
# older version of this module that wrote it in place. Those wrote it within microseconds of
# creating it: once the file is this old, no run can still be about to fill it in.
_UNREADABLE_LOCK_GRACE_S = 10.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


class WorkdirLock:
  """Context manager that stops two runs from training in the same workdir at once.

  Creates `<workdir>/.lock` holding {"pid", "host", "time"}, written to a temporary file and
  hard-linked into place, so the lock never exists empty or half-written. A lock left by a process
  that no longer exists on this host is taken over with a warning, and so is an empty or
  unparsable one older than a few seconds (left by a run that failed while writing it); a lock
  from another host cannot be checked and must be removed by hand. Only process 0 of a
  multi-process run should take it (`enabled=False` elsewhere).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(os.fspath(workdir)), ".lock")
    self.enabled = enabled
    self._held = False
    self._record = {"pid": os.getpid(), "host": socket.gethostname()}

  def _read(self) -> dict[str, Any] | None:
    """The lock's content; None if it is missing, unreadable or not a JSON object."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def _write_error(self, error: OSError) -> RuntimeError:
    workdir = os.path.dirname(self.path)
    return RuntimeError(f"Cannot create the lock file {self.path}: {error.strerror or error}. "
                        f"{_save_fix(error.errno, workdir)}; nothing was left behind.")

  def _try_create(self) -> bool:
    """Creates the lock with our record; False if it already exists."""
    content = json.dumps(dict(self._record, time=time.time())).encode("utf-8")
    tmp = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
      fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      try:
        os.write(fd, content)
        os.fsync(fd)  # complete on disk before it becomes the lock
      finally:
        os.close(fd)
    except OSError as e:
      _remove_quietly(tmp)
      raise self._write_error(e) from None
    try:
      os.link(tmp, self.path)  # atomic, and fails if the lock exists
      return True
    except FileExistsError:
      return False
    except OSError:
      return self._create_in_place(content)  # a file system without hard links
    finally:
      _remove_quietly(tmp)

  def _create_in_place(self, content: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise self._write_error(e) from None
    try:
      os.write(fd, content)
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      _remove_quietly(self.path)
      raise self._write_error(e) from None
    os.close(fd)
    return True

  def _unreadable_age(self) -> float | None:
    """Seconds since an empty/unparsable lock was written; None if it is gone or readable."""
    try:
      mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None
    except OSError as e:
      raise RuntimeError(
          f"{self.path} exists but cannot be read ({e.strerror}), so another run may be using "
          f"{os.path.dirname(self.path)}. If no other run uses it, delete {self.path} and "
          "rerun.") from None
    try:
      with open(self.path, "rb") as f:
        f.read()
    except OSError as e:
      raise RuntimeError(
          f"{self.path} exists but cannot be read ({e.strerror}), so another run may be using "
          f"{os.path.dirname(self.path)}. If no other run uses it, delete {self.path} and "
          "rerun.") from None
    if self._read() is not None:
      return None
    return max(0.0, time.time() - mtime)

  def acquire(self) -> None:
    """Takes the lock or raises RuntimeError naming the run that holds it."""
    if not self.enabled or self._held:
      return
    workdir = os.path.dirname(self.path)
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise RuntimeError(f"Cannot create the workdir {workdir}: {e.strerror or e}. "
                         f"{_save_fix(e.errno, workdir)}.") from None
    deadline = time.time() + _UNREADABLE_LOCK_GRACE_S + 5.0
    for _ in range(1000):  # a few retries after removing a stale lock or waiting out a young one
      if self._try_create():
        self._held = True
        _LOCKS_HELD_HERE.add(self.path)
        return
      holder = self._read()
      if holder is None:
        age = self._unreadable_age()
        if age is None:
          continue  # removed (or completed) meanwhile: look again
        if age < _UNREADABLE_LOCK_GRACE_S and time.time() < deadline:
          time.sleep(min(0.5, _UNREADABLE_LOCK_GRACE_S - age))
          continue
        logging.warning("Taking over the lock %s: it is empty or corrupt (written %.0f s ago), "
                        "which only a run that failed while writing it leaves behind.", self.path,
                        age)
        _remove_quietly(self.path)  # if someone else removed it first, O_EXCL/link decides
        continue
      pid, host = holder.get("pid"), holder.get("host")
      if pid == os.getpid():
        stale = self.path not in _LOCKS_HELD_HERE
      else:
        stale = isinstance(pid, int) and not _pid_alive(pid)
      if host == self._record["host"] and stale:
        logging.warning("Taking over the stale lock %s of process %d on %s, which no longer "
                        "exists.", self.path, pid, host)
        _remove_quietly(self.path)  # if someone else removed it first, O_EXCL/link decides
        continue
      since = holder.get("time")
      when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
              if isinstance(since, (int, float)) else "")
      raise RuntimeError(
          f"Another run (pid {pid} on host {host}{when}) is using {workdir}. "
          "Wait for it to finish or use another workdir; if that process is gone (e.g. killed "
          f"on another machine), delete {self.path} and rerun.")
    raise RuntimeError(f"Could not take the lock {self.path} (it keeps reappearing); another run "
                       "is starting in the same workdir.")

  def release(self) -> None:
    """Removes the lock file if this object holds it (and it is still ours)."""
    if not self._held:
      return
    self._held = False
    _LOCKS_HELD_HERE.discard(self.path)
    holder = self._read()
    if holder is not None and (holder.get("pid"), holder.get("host")) != (
        self._record["pid"], self._record["host"]):
      logging.warning("Not removing %s: it now belongs to pid %s on %s.", self.path,
                      holder.get("pid"), holder.get("host"))
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
