"""Checkpoints (Orbax) of the train state, the config and the data position, plus a workdir lock.

    ckpt = Checkpointer(workdir + "/checkpoints", keep_last=3, keep_every=10_000)
    ckpt.save(step, state, config=config_dict, data_position={"step": step, "seed": seed})
    state, config, data_position, step = ckpt.restore(abstract_state_with_shardings)

Layout on disk (Orbax's `CheckpointManager`, one directory per step):

    <directory>/<step>/state/          the state pytree (OCDBT/zarr, written by every process)
    <directory>/<step>/config/         the run's config as JSON
    <directory>/<step>/data_position/  {"step": int, "seed": int} as JSON
    <directory>/damaged/<step>/        checkpoints found unreadable, moved aside (see `save`)

Safety properties this module relies on (checked in the installed Orbax 0.12.8 source):
- A step is written to a temporary directory and renamed into place only when every file is
  committed, so a crash mid-save never leaves a half-written `<step>` that looks complete.
- Old steps are removed by the keep policy only in the save's finalize phase, *after* the new
  step's commit succeeded (a failed commit raises before deletion), so an intact checkpoint is
  never deleted before a newer one is committed.
Damage that happens afterwards (a truncated or deleted file) is caught at restore time: the newest
readable checkpoint is used and the damaged ones are reported.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_STATE = "state"
_CONFIG = "config"
_DATA_POSITION = "data_position"
_ITEM_NAMES = (_STATE, _CONFIG, _DATA_POSITION)
_DAMAGED_SUBDIR = "damaged"

# Orbax raises plain ValueErrors both for damaged files and for a target that does not match the
# saved tree; these fragments (Orbax 0.12.8 wording) single out the latter, which is a user error
# (wrong config) rather than damage, so that it is reported at once instead of falling back.
_MISMATCH_FRAGMENTS = ("tree structures do not match", "is not compatible with the stored shape")

PyTree = Any


def _is_mismatch(error: BaseException) -> bool:
  return isinstance(error, ValueError) and any(f in str(error) for f in _MISMATCH_FRAGMENTS)


def _short(error: BaseException, limit: int = 300) -> str:
  """One-line summary of an exception for log messages (Orbax's can be pages long)."""
  text = " ".join(str(error).split())
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


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


class Checkpointer:
  """Saves and restores (state, config, data position) with Orbax, keeping recent and periodic steps.

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
    """
    if int(keep_last) < 1:
      raise ValueError(f"keep_last={keep_last}: keep at least the newest checkpoint (set it >= 1).")
    if int(keep_every) < 0:
      raise ValueError(f"keep_every={keep_every} must be >= 0 (0 disables periodic keeping).")
    self._directory = os.path.abspath(os.fspath(directory))
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
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=_ITEM_NAMES)
    # Steps found unreadable by `restore`; `save` moves them aside before writing older steps.
    self._damaged: set[int] = set()

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of the committed checkpoints, ascending (damaged ones included until moved aside)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, *, config: Mapping[str, Any],
           data_position: Mapping[str, Any], force: bool = False) -> bool:
    """Saves a checkpoint of `state` (a pytree of arrays, possibly sharded) at `step`.

    Args:
      step: the training step the state is at (after `step` updates).
      state: pytree of jax.Arrays / numpy arrays.
      config: the run's config as a JSON-serialisable dict.
      data_position: where the data stream is, e.g. {"step": step, "seed": seed}.
      force: save even if Orbax's save policy would skip this step.

    Returns:
      True if a save was started; False if this step is already saved (nothing is overwritten).
    """
    step = int(step)
    for name, value in ((_CONFIG, config), (_DATA_POSITION, data_position)):
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        # Checked here because in an async save the failure would surface later, in a thread.
        raise ValueError(f"Checkpointer.save: `{name}` must be a JSON-serialisable dict "
                         f"(plain str/int/float/bool/list/dict): {e}") from e
    existing = self.all_steps()
    if step in existing and step not in self._damaged:
      logging.info("Checkpoint for step %d already exists in %s; not overwriting it.", step,
                   self._directory)
      return False
    # Steps >= `step` can only be there after `restore` fell back past damaged ones; they must go
    # before Orbax accepts an older step (and before the keep policy counts them as recent).
    later = [s for s in existing if s >= step]
    if later:
      unknown = [s for s in later if s not in self._damaged]
      if unknown:
        raise RuntimeError(
            f"Cannot save step {step} in {self._directory}: it already holds newer checkpoints "
            f"{unknown}, and continuing from an older step would mix two training histories. "
            "Move those step directories out of the way (or use a new workdir) and rerun.")
      self._move_aside(later)
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _CONFIG: ocp.args.JsonSave(dict(config)),
            _DATA_POSITION: ocp.args.JsonSave(dict(data_position)),
        }),
        force=force)
    if saved:
      logging.info("Saving checkpoint for step %d in %s.", step, self._directory)
    return bool(saved)

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

  def _candidates(self, step: int | None) -> list[int]:
    """Steps to try, newest first; raises if there is nothing to restore."""
    self._manager.wait_until_finished()  # our own in-flight save must be visible
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

  def _restore_first_intact(self, step: int | None, restore_one):
    """Runs `restore_one(step)` on the newest readable checkpoint, warning about damaged ones."""
    candidates = self._candidates(step)
    failures: list[tuple[int, BaseException]] = []
    for s in candidates:
      try:
        result = restore_one(s)
      except Exception as e:  # pylint: disable=broad-except
        if _is_mismatch(e):
          raise ValueError(
              f"The checkpoint for step {s} in {self._directory} does not match the state this "
              f"config builds ({_short(e)}). Restore with the config the run was trained with "
              "(it is saved in the checkpoint), or train in a new workdir.") from e
        failures.append((s, e))
        self._damaged.add(s)
        if step is None and s != candidates[-1]:
          logging.warning("Checkpoint for step %d in %s is damaged or unreadable (%s); falling "
                          "back to the next newest one.", s, self._directory, _short(e))
        continue
      if failures:
        logging.warning("Restored step %d from %s; skipped damaged checkpoint(s) %s.", s,
                        self._directory, [f for f, _ in failures])
      return result, s
    details = "; ".join(f"step {s}: {_short(e, 200)}" for s, e in failures)
    raise RuntimeError(
        f"No intact checkpoint in {self._directory} (tried steps {[s for s, _ in failures]}; "
        f"{details}). The files were truncated or deleted. Restore the directory from a backup, "
        "or move it away to start training from scratch.") from None

  def restore(self, target: PyTree, step: int | None = None
              ) -> tuple[PyTree, dict[str, Any], dict[str, Any], int]:
    """Restores (state, config, data_position, step).

    Args:
      target: pytree with the structure of the saved state; its leaves are
        `jax.ShapeDtypeStruct`s (or arrays) whose `.sharding` says where each restored array goes.
        Leaves without a sharding are restored onto the first local device.
      step: the step to restore; None means the newest intact checkpoint (damaged newer ones are
        skipped with a warning).

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      ValueError: the checkpoint's tree or shapes differ from `target` (a different config).
      RuntimeError: no intact checkpoint could be read.
    """
    abstract = _abstract_target(target)

    def restore_one(s):
      return self._manager.restore(s, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _CONFIG: ocp.args.JsonRestore(),
          _DATA_POSITION: ocp.args.JsonRestore(),
      }))

    restored, s = self._restore_first_intact(step, restore_one)
    return (restored[_STATE], dict(restored[_CONFIG] or {}),
            dict(restored[_DATA_POSITION] or {}), s)

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with a checkpoint (newest intact one if step is None); reads no arrays."""

    def restore_one(s):
      return self._manager.restore(s, args=ocp.args.Composite(**{
          _CONFIG: ocp.args.JsonRestore()}))

    restored, _ = self._restore_first_intact(step, restore_one)
    return dict(restored[_CONFIG] or {})

  def wait(self) -> None:
    """Blocks until a background save has been committed (and old steps pruned)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params_only(directory: str | os.PathLike, step: int | None = None, *,
                        return_step: bool = False) -> PyTree:
  """Parameters (numpy arrays) from another run's checkpoint directory.

  The state saved there is a dict with "params" (and usually "ema_params"); the EMA params are
  returned when present since they are the ones used for sampling. Only that subtree is read.

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
    return restored[key]

  try:
    params, s = reader._restore_first_intact(step, restore_one)  # pylint: disable=protected-access
  finally:
    reader.close()
  logging.info("Read params of step %d from %s.", s, directory)
  return (params, s) if return_step else params


# Lock files held by WorkdirLock objects of this process: a lock naming this process's pid that is
# not in here was left by an earlier process that had the same pid (e.g. pid 1 in a restarted
# container), so it is stale.
_LOCKS_HELD_HERE: set[str] = set()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Context manager that stops two runs from training in the same workdir at once.

  Creates `<workdir>/.lock` holding {"pid", "host", "time"}. A lock left by a process that no
  longer exists on this host is taken over with a warning; a lock from another host cannot be
  checked and must be removed by hand. Only process 0 of a multi-process run should take it
  (`enabled=False` elsewhere).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(os.fspath(workdir)), ".lock")
    self.enabled = enabled
    self._held = False
    self._record = {"pid": os.getpid(), "host": socket.gethostname()}

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(dict(self._record, time=time.time()), f)
    return True

  def acquire(self) -> None:
    """Takes the lock or raises RuntimeError naming the run that holds it."""
    if not self.enabled or self._held:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
      if self._try_create():
        self._held = True
        _LOCKS_HELD_HERE.add(self.path)
        return
      holder = self._read()
      if holder is None:
        raise RuntimeError(
            f"{self.path} exists but cannot be read, so another run may be using "
            f"{os.path.dirname(self.path)}. If no other run uses it, delete {self.path} and rerun.")
      pid, host = holder.get("pid"), holder.get("host")
      if pid == os.getpid():
        stale = self.path not in _LOCKS_HELD_HERE
      else:
        stale = isinstance(pid, int) and not _pid_alive(pid)
      if host == self._record["host"] and stale:
        logging.warning("Taking over the stale lock %s of process %d on %s, which no longer "
                        "exists.", self.path, pid, host)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass  # someone else removed it first; the O_EXCL create decides who wins
        continue
      since = holder.get("time")
      when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
              if isinstance(since, (int, float)) else "")
      raise RuntimeError(
          f"Another run (pid {pid} on host {host}{when}) is using {os.path.dirname(self.path)}. "
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
