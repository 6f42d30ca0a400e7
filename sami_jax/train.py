"""The run loop: data -> step -> logs -> checkpoints. Nothing else lives here.

    summary = train(config, workdir)   # resumable; writes checkpoints, metrics, TensorBoard, grids

The state and the jitted step are `train_state.py`'s; image grids and restoring go through
`inference.py`; the end-of-run probe is the evaluation runner's. This is the only module that
combines meshes, files and checkpoints for training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sami_jax import checkpoint as ckpt_lib
from sami_jax import configlib
from sami_jax import inference
from sami_jax import kinds
from sami_jax import models as models_lib
from sami_jax import rngs
from sami_jax import sharding as sharding_lib
from sami_jax import train_state
from sami_jax.data import pipeline
from sami_jax.utils import writers as writers_lib

# Loss terms shown on the progress line, in this order, when the model kind has them.
_PROGRESS_TERMS = ("loss", "diffusion", "recon_mse", "mse_uncond", "kl", "guidance_norm",
                   "posterior_std")


class NonFiniteError(FloatingPointError):
  """The loss, gradient or updated state became NaN/Inf; the message names the step and terms."""


def host_params(tree) -> Any:
  """A (possibly sharded, multi-process) pytree -> numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# Exit status of a run stopped by SIGTERM or Ctrl-C after saving (EX_TEMPFAIL: "try again"); main
# exits with it so a scheduler or script can tell a preempted run from a finished one (0).
PREEMPTED_EXIT_CODE = 75


class PreemptedError(RuntimeError):
  """A run that had to continue (e.g. one of sami_jax.compare's) was stopped after saving."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped the run where it could not save (before the first step, or a second Ctrl-C);
  the message says where and which checkpoints are on disk. `main` prints it as one line."""


class _Preemption:
  """Turns SIGTERM and the first Ctrl-C (SIGINT) into a flag the loop checks, so a stopped run
  saves a checkpoint at the current step before it exits. A second Ctrl-C, or a Ctrl-C before the
  first step has run (while the step compiles: there is nothing new to save), interrupts at once."""

  def __init__(self):
    self.requested = False
    self.stepped = False  # set by the loop once a step has run
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not in the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and (self.requested or not self.stepped):
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint at the current step and stopping (press "
                    "Ctrl-C again to stop without saving).", signal.Signals(signum).name)
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


@dataclasses.dataclass
class _Run:
  """What the loop's helpers share."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  checkpointer: ckpt_lib.Checkpointer
  writer: writers_lib.MetricWriter
  state: Any
  start_step: int
  is_main: bool
  grid_images: np.ndarray | None = None
  pending_step: Any = None  # the train step being loaded from disk, if a previous run saved it
  step: int = 0  # the updates applied so far (the checkpoints' numbering)


# ------------------------------------------------------------------------------ set-up


def _prepare_data(config) -> None:
  """Builds Disks on first use (process 0 first, so processes sharing a data dir do not race)
  and fails fast on missing data, before anything is compiled."""
  if jax.process_index() == 0:
    pipeline.prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sami_jax: dataset prepared")
    pipeline.prepare(config)


def _read_pretrained_denoiser(config) -> Any:
  """The denoiser params of model.denoiser_checkpoint (numpy), checked against the config before
  anything is compiled."""
  path = os.path.expanduser(config.model.denoiser_checkpoint)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"config.model.denoiser_checkpoint={config.model.denoiser_checkpoint!r} does not exist; "
        "point it at the workdir (or checkpoints/ folder) of a trained ddpm run.")
  params = ckpt_lib.restore_params_only(*inference.checkpoint_location(path))
  if "denoiser" not in params:
    raise ValueError(f"config.model.denoiser_checkpoint={path!r} holds no denoiser params (its "
                     f"params are {sorted(params)}): point it at the workdir of a ddpm (or sami) "
                     "run.")
  expected = jax.tree.map(lambda a: tuple(a.shape),
                          train_state.abstract_state(config)["params"]["denoiser"])
  got = jax.tree.map(lambda a: tuple(a.shape), params["denoiser"])
  if expected != got:
    raise ValueError(f"config.model.denoiser_checkpoint={path!r}: its denoiser does not match "
                     "config.model.denoiser (different layers or shapes); use the model.denoiser "
                     "and data.image_size/channels settings of the run that trained it.")
  return params["denoiser"]


def _put_pretrained_denoiser(state, denoiser, shardings):
  """The state with the pre-trained denoiser in its params and EMA params."""
  def put(where):
    # One device copy per use: the train step donates the state, and XLA refuses to donate one
    # buffer twice (params and EMA params must not share arrays).
    return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), denoiser,
                        shardings[where]["denoiser"])
  state = dict(state)
  state["params"] = dict(state["params"], denoiser=put("params"))
  state["ema_params"] = dict(state["ema_params"], denoiser=put("ema_params"))
  return state


def _state_layout(config) -> Any:
  """The train state's structure, shapes and dtypes under `config` (traced, not compiled)."""
  return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), train_state.abstract_state(config))


def _fields_that_change_the_layout(before, after, changed: list[str]) -> list[str]:
  """The fields of `changed` that, each set alone to its new value on the checkpoint's config,
  change the train state's shapes or layout (the others only change what the run does). If none
  does alone, all of them together do."""
  candidates = [f for f in changed if f not in train_state.NOT_TRACED]  # not bookkeeping
  if len(candidates) <= 1:
    return candidates
  base = _state_layout(before)
  new = configlib.training_fields(after)
  found = []
  for field in candidates:
    one = configlib.copy(before)
    *path, name = field.split(".")
    try:
      node = one
      for part in path:
        node = node[part]
      node[name] = new[field]
      same = _state_layout(one) == base
    except Exception:  # pylint: disable=broad-except  (a field that cannot change alone)
      same = False
    if not same:
      found.append(field)
  return found or candidates


def _check_resume_config(config, saved: dict) -> None:
  """Compares the config with the one the checkpoint was trained with: refuses changes that
  change the state's shapes or layout (naming those fields apart from the rest), warns about
  every other change."""
  if not saved:
    return
  before = configlib.from_json(saved)
  old, new = configlib.training_fields(before), configlib.training_fields(config)
  changed = sorted(k for k in new if old.get(k) != new[k])
  if not changed:
    return
  describe = lambda fields: ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fields)
  if _state_layout(before) != _state_layout(config):
    layout = _fields_that_change_the_layout(before, config, changed)
    rest = [k for k in changed if k not in layout]
    also = (f" The other changes ({describe(rest)}) only change what the run does; a resume "
            "accepts those with a warning." if rest else "")
    if not layout:  # e.g. another device count under optim.update_layout="auto"
      raise ValueError(
          f"The checkpoint's train state cannot resume under this config on {jax.device_count()} "
          "device(s): the train state has other shapes or layout here (set optim.update_layout "
          f"to the run's layout, or run on its number of devices), or use a new workdir.{also}")
    raise ValueError(
        f"The checkpoint's train state cannot resume under this config: {describe(layout)} "
        f"change{'s' if len(layout) == 1 else ''} the shapes or layout of the train state. Set "
        f"{'it' if len(layout) == 1 else 'them'} back (the run's config is saved in the "
        f"checkpoint) or use a new workdir.{also}")
  logging.warning("Resuming with a config that differs from the checkpoint's: %s.",
                  describe(changed))


def _restore_or_init(config, mesh, checkpointer, denoiser) -> tuple[Any, int]:
  """(state, start step): the newest intact checkpoint, or a fresh state (with `denoiser`, the
  pre-trained one, if the kind freezes it). The checkpoint's config was checked against this one
  before (`_check_resume_config`)."""
  types = train_state.state_types(config, mesh)  # shapes, dtypes and shardings
  if checkpointer.latest_step() is not None:
    state, _, data_pos, start_step = checkpointer.restore(types)
    logging.info("Resumed from step %d.", start_step)
    if data_pos.get("seed", config.seed) != config.seed:
      logging.warning("The checkpoint was trained with seed %s, this config says %s: the data "
                      "order changes from here.", data_pos.get("seed"), config.seed)
    return state, start_step
  state = train_state.create_sharded_state(config, mesh)
  if denoiser is not None:
    state = _put_pretrained_denoiser(state, denoiser,
                                     jax.tree.map(lambda t: t.sharding, types))
    logging.info("Restored the frozen denoiser from %s.", config.model.denoiser_checkpoint)
  return state, 0


# ------------------------------------------------------------------------------ the loop


def _checkpoints_line(checkpointer: ckpt_lib.Checkpointer) -> str:
  steps = checkpointer.all_steps()
  if not steps:
    return "no checkpoint has been written yet"
  return (f"the checkpoints in {checkpointer.directory} are steps {steps} (each checked finite "
          "when it was written)")


def _check_finite(history: list[tuple[int, dict]], checkpointer: ckpt_lib.Checkpointer) -> None:
  """Raises NonFiniteError at the first non-finite update of `history`: (step, metrics) pairs,
  numbered as checkpoints are (the update from step - 1 to step)."""
  for step, m in history:
    if bool(m["finite"]):
      continue
    bad = [k for k, v in m.items() if k not in ("finite", "state_finite")
           and not np.isfinite(v)]
    if not bool(m["state_finite"]):
      bad.append("the updated params/EMA/optimizer state")
    checkpointer.wait()  # a save in flight: let it commit, so the listing below is right
    raise NonFiniteError(
        f"Non-finite values in the update from step {step - 1} to step {step}: "
        f"{', '.join(bad) or 'loss/grad_norm'} (loss="
        f"{m['loss']}, grad_norm={m['grad_norm']}). That update was not applied and nothing "
        f"non-finite was saved; {_checkpoints_line(checkpointer)}. Lower optim.lr, raise "
        "model.encoder.min_std or set optim.grad_clip, then rerun to resume from the newest "
        "checkpoint.")


def _log(run: _Run, step: int, history, progress) -> None:
  """Fetches the metrics of the steps since the last log, checks them, writes their mean."""
  fetched = [(s, jax.device_get(m)) for s, m in history]
  _check_finite(fetched, run.checkpointer)
  mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]
          if k not in ("finite", "state_finite")}
  mean["steps_per_sec"] = progress.rate(step)
  run.writer.write_scalars(step, mean)
  if run.is_main:
    logging.info(progress.line(step, {k: mean[k] for k in _PROGRESS_TERMS if k in mean}))


def _save(run: _Run, step: int, force: bool = False) -> None:
  try:
    run.checkpointer.save(step, run.state, config=configlib.to_dict(run.config),
                          data_position={"step": step, "seed": run.config.seed}, force=force)
  except ckpt_lib.NonFiniteStateError as e:  # the last line of defence behind the step's guard
    raise NonFiniteError(f"{e} Lower optim.lr, raise model.encoder.min_std or set "
                         "optim.grad_clip, then rerun to resume from the newest checkpoint."
                         ) from None


def _grids(run: _Run, step: int, images: np.ndarray) -> None:
  if not run.config.train.write_grids:
    return
  params = host_params(run.state["ema_params"])
  if run.is_main:
    rng = jax.random.fold_in(rngs.stream(run.config.seed, rngs.SAMPLE), step)
    grids = inference.sample_grids(run.config, params, images, rng)
    paths = inference.write_grids(run.workdir, step, grids, run.writer)
    logging.info("Wrote %s", ", ".join(paths))


def _stop_requested(preemption: _Preemption, step: int, log_every: int) -> bool:
  stop = preemption.requested
  if jax.process_count() > 1 and step % log_every == 0:
    stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
  return stop


def _loop(run: _Run) -> tuple[int, bool]:
  """Steps until train.num_steps (or a preemption); returns (step reached, preempted)."""
  t = run.config.train
  step_fn = None  # compiled (or loaded: run.pending_step) for the first batch's types
  progress = writers_lib.Progress(t.num_steps, run.start_step)
  run.grid_images = inference.grid_images(run.config, "test", t.num_sample_images)
  data_iter = pipeline.train_iterator(run.config, start_step=run.start_step,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  history, step = [], run.start_step
  with _Preemption() as preemption:
    while step < t.num_steps:
      batch = sharding_lib.global_batch(next(data_iter), run.mesh)
      if step_fn is None:
        step_fn = train_state.compiled_train_step(run.config, run.mesh, run.state, batch,
                                                  run.pending_step)
      run.state, metrics = step_fn(run.state, batch)
      preemption.stepped = True
      step += 1
      run.step = step
      history.append((step, metrics))  # numbered as the checkpoint of its result would be
      last = step == t.num_steps
      save = step % t.ckpt_every == 0 and not last
      # Every step before a save is checked first, so a checkpoint never follows an unchecked
      # non-finite step.
      if step % t.log_every == 0 or last or step == run.start_step + 1 or save:
        _log(run, step, history, progress)
        history = []
      if _stop_requested(preemption, step, t.log_every):
        if history:
          _log(run, step, history, progress)
        return step, True
      if save:
        _save(run, step)
      if t.sample_every and step % t.sample_every == 0 and not last:
        _grids(run, step, run.grid_images)
  return step, False


# ------------------------------------------------------------------------------ the run


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) a model in `workdir`. Returns a summary dict (also written to
  workdir/summary.json)."""
  configlib.validate(config, jax.device_count(), jax.process_count())
  workdir = os.path.expanduser(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with ckpt_lib.WorkdirLock(workdir, enabled=is_main):
    return _train_locked(config, workdir, is_main)


def _train_locked(config, workdir: str, is_main: bool) -> dict[str, Any]:
  t_start = time.time()
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep_last=config.train.keep_ckpts,
                                       keep_every=config.train.keep_every)
  writer = None
  pending_step = None
  run = None
  resumed = False
  try:
    resumed = checkpointer.latest_step() is not None
    # A fresh run of a kind that freezes a pre-trained denoiser reads (and checks) it first:
    # a wrong path or model is named before the data is built or anything compiled.
    denoiser = None
    if kinds.of(config).needs_denoiser_checkpoint and not resumed:
      denoiser = _read_pretrained_denoiser(config)
    if resumed:
      _check_resume_config(config, checkpointer.restore_config())
    _prepare_data(config)
    mesh = sharding_lib.make_mesh(config)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape),
                 jax.device_count(), jax.process_count())
    # Loads (in a background thread) the step a previous run of this config saved, while the
    # state is created or restored; started after every check that can refuse the run.
    pending_step = train_state.begin_train_step(config, mesh)
    state, start_step = _restore_or_init(config, mesh, checkpointer, denoiser)
    writer = writers_lib.MetricWriter(workdir, enabled=is_main)
    run = _Run(config, workdir, mesh, checkpointer, writer, state, start_step, is_main,
               pending_step=pending_step, step=start_step)
    step, preempted = _loop(run)
  except BaseException as e:
    # The train step's load, if still running, is waited for (an interpreter that exits under it
    # can crash). A save started before the failure (the last good step) runs in a background
    # thread that dies with the interpreter: let it commit, so that the checkpoint the error
    # message points to really is on disk. Its own failure must not hide the error that stopped
    # the run.
    if pending_step is not None:
      pending_step.close()
    try:
      checkpointer.close()
    except ckpt_lib.CheckpointSaveError as err:
      logging.error("%s", err)
    if writer is not None:
      writer.close()
    if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
      raise Interrupted(_interrupted_line(run, checkpointer, resumed)) from None
    raise
  try:
    _save(run, step, force=True)
    checkpointer.wait()
  except BaseException:
    writer.close()
    raise
  try:
    if preempted:
      logging.warning("Preempted at step %d; checkpoint saved. Rerun the same command to "
                      "resume.", step)
      return {"step": step, "preempted": True}
    return _finish(run, step, t_start)
  finally:
    writer.close()
    checkpointer.close()


def _interrupted_line(run: _Run | None, checkpointer: ckpt_lib.Checkpointer,
                      resumed: bool) -> str:
  """What a Ctrl-C that could not save left behind, in one line (checkpoint numbering)."""
  try:
    steps = checkpointer.all_steps()
    on_disk = (f"the checkpoints in {checkpointer.directory} are steps {steps}" if steps else
               "there is no checkpoint")
  except Exception:  # pylint: disable=broad-except  (the line must not hide the interrupt)
    on_disk = f"the checkpoints in {checkpointer.directory} are as they were"
  if run is None or run.step == run.start_step:
    where = "Interrupted before the first step"
    if not resumed:
      return f"{where}; no checkpoint was written. Rerun the same command to start again."
    return (f"{where} after the restore; nothing was saved and {on_disk}. Rerun the same command "
            "to resume.")
  return (f"Interrupted at step {run.step} without a final save; {on_disk}. Rerun the same "
          "command to resume from the newest one.")


def _finish(run: _Run, step: int, t_start: float) -> dict[str, Any]:
  """End-of-run grids and probe, and summary.json."""
  _grids(run, step, run.grid_images)
  counts = {k: models_lib.count_params(v) for k, v in run.state["params"].items()}
  summary: dict[str, Any] = {"step": step, "wall_time_s": time.time() - t_start,
                             "params": counts}
  if run.config.train.probe_at_end:
    from sami_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    probe = runner.probe(run.config, host_params(run.state["ema_params"]))
    if probe is not None:
      summary["probe"] = probe
      if run.is_main:
        logging.info("How well the latents predict each factor (test split):\n%s",
                     runner.probe_lines(probe))
  if run.is_main:
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
