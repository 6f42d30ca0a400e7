"""Training, sampling and evaluation runs: the one module that knows meshes, files and checkpoints.

    train(config, workdir)   # resumable; writes checkpoints, metrics, TensorBoard, PNG grids
    sample(config, workdir)  # PNG grids from the latest checkpoint

The train step is a single `jax.jit` over the ("data", "fsdp") mesh with explicit in/out
shardings and a donated state: loss, guidance score (`jax.grad` inside the loss), gradient,
clipping, Adam, EMA and the non-finite guard all happen inside it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from sami_jax import checkpoint as ckpt_lib
from sami_jax import configlib
from sami_jax import models as models_lib
from sami_jax import objective
from sami_jax import samplers
from sami_jax import schedules
from sami_jax import sharding as sharding_lib
from sami_jax.data import pipeline
from sami_jax.utils import images as images_lib
from sami_jax.utils import writers as writers_lib

# Purposes folded into the root key, so every stream of randomness is separate and reproducible.
_RNG_INIT, _RNG_TRAIN, _RNG_SAMPLE = 0, 1, 2
_RNG_LATENT_PRIOR = 4  # (3 is evaluation/report.py's)


# Loss terms shown on the progress line, in this order, when the model kind has them.
_PROGRESS_TERMS = ("loss", "diffusion", "recon_mse", "mse_uncond", "kl", "guidance_norm",
                   "posterior_std")


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the message names the step and the terms."""


# ------------------------------------------------------------------------------ components


def trainable_labels(config, params: dict) -> dict:
  """Optimizer label per parameter subtree: its own name ("denoiser", "decoder", "encoder") or
  "frozen" (the denoiser of sami_frozen, the unused encoder of ddpm)."""
  kind = config.model.kind
  labels = {}
  for name in params:
    frozen = (name == "denoiser" and kind == "sami_frozen") or (name == "encoder" and
                                                                  kind == "ddpm")
    labels[name] = jax.tree.map(lambda _: "frozen" if frozen else name, params[name])
  return labels


def learning_rate_fn(config):
  o = config.optim
  warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
  if o.lr_decay == "cosine":
    rest = optax.cosine_decay_schedule(o.lr, max(config.train.num_steps - o.warmup_steps, 1))
  else:
    rest = optax.constant_schedule(o.lr)
  return optax.join_schedules([warmup, rest], [o.warmup_steps])


def make_optimizer(config, params) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam(W) per trainable subtree (encoder lr scaled by
  optim.encoder_lr_mult); frozen subtrees get exactly zero updates."""
  o = config.optim
  lr = learning_rate_fn(config)

  def adam(mult):
    sched = (lambda s: lr(s) * mult) if mult != 1.0 else lr
    return optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)

  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.multi_transform(
      {"denoiser": adam(1.0), "decoder": adam(1.0), "encoder": adam(o.encoder_lr_mult),
       "frozen": optax.set_to_zero()},
      trainable_labels(config, params)))
  return optax.chain(*parts)


@functools.lru_cache(maxsize=8)
def _components(config_json: str):
  config = config_from_json(config_json)
  denoiser, encoder = models_lib.build_models(config)
  schedule = schedules.from_config(config)
  return denoiser, encoder, schedule


def components(config):
  """(denoiser, encoder, schedule) for a config (cached: modules are static jit arguments)."""
  return _components(config_to_json(config))


def config_to_json(config) -> str:
  return json.dumps(config.to_dict(), sort_keys=True)


def _tuplify(x):
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


def config_from_json(text_or_dict) -> ml_collections.ConfigDict:
  """A config saved as JSON, merged over the current defaults (lists become tuples again)."""
  d = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
  config = configlib.default_config()
  unknown = []

  def merge(dst, src, prefix):
    for k, v in src.items():
      if k not in dst:
        unknown.append(prefix + k)
      elif isinstance(v, dict):
        merge(dst[k], v, prefix + k + ".")
      else:
        dst[k] = _tuplify(v)
  merge(config, d, "")
  if unknown:
    logging.warning("Ignoring config fields this version does not know: %s", unknown)
  return config


# ------------------------------------------------------------------------------ train state


def init_state(config, rng: jax.Array) -> dict[str, Any]:
  """The train state: params, EMA params, optimizer state, step and the root PRNG key."""
  params = models_lib.init_params(config, jax.random.fold_in(rng, _RNG_INIT))
  opt = make_optimizer(config, params)
  return {"params": params, "ema_params": params, "opt_state": opt.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": rng}


def abstract_state(config):
  return jax.eval_shape(lambda: init_state(config, jax.random.PRNGKey(config.seed)))


def make_train_step(config):
  """The pure train step `(state, batch) -> (state, metrics)` (metrics are batch-mean scalars)."""
  denoiser, encoder, schedule = components(config)
  loss_fn = objective.make_loss_fn(config, denoiser, encoder, schedule)
  ema_decay = config.optim.ema_decay
  frozen_denoiser = config.model.kind == "sami_frozen"

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.fold_in(state["rng"], _RNG_TRAIN), step)
    params = state["params"]

    def total(p):
      loss, terms = loss_fn(p, batch, rng, step, train=True)
      return loss, terms
    (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    opt = make_optimizer(config, params)
    updates, new_opt_state = opt.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # EMA with the usual warm-up, so early EMA params are not dominated by the random init.
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"],
                           new_params)
    if frozen_denoiser:  # keep the frozen params bitwise identical in the EMA too
      new_ema = dict(new_ema, denoiser=params["denoiser"])

    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing (the host stops the run when it sees the flag).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": keep(new_params, params),
        "ema_params": keep(new_ema, state["ema_params"]),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": step + 1,
        "rng": state["rng"],
    }
    metrics = {k: jnp.mean(v) for k, v in terms.items() if k != "t"}
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite,
                   lr=learning_rate_fn(config)(step),
                   beta=objective.beta_at(config.objective, step))
    return new_state, metrics

  return train_step


def jit_train_step(config, mesh, state_sharding):
  """The jitted, sharded train step (state donated). Cached per (config, mesh), so a resumed or
  repeated run in the same process reuses the compiled step."""
  del state_sharding  # derived from (config, mesh); kept in the signature for callers' clarity
  return _jit_train_step(config_to_json(config), mesh)


@functools.lru_cache(maxsize=4)
def _jit_train_step(config_json: str, mesh):
  config = config_from_json(config_json)
  shardings = sharding_lib.state_shardings(abstract_state(config), mesh, config)
  return jax.jit(make_train_step(config),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def create_sharded_state(config, mesh):
  """The initial state, created directly with its final shardings (no host copy)."""
  abstract = abstract_state(config)
  shardings = sharding_lib.state_shardings(abstract, mesh, config)
  init = jax.jit(lambda rng: init_state(config, rng), out_shardings=shardings)
  return init(jax.random.PRNGKey(config.seed)), shardings


# ------------------------------------------------------------------------------ helpers


def host_params(tree) -> Any:
  """A (possibly sharded, multi-process) pytree -> numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _sampling_kwargs(config, schedule):
  s = config.sampling
  return dict(schedule=schedule, steps=s.steps, sampler=s.sampler, eta=s.eta,
              gamma=s.guidance_scale, time_conditioning=config.model.encoder.time_conditioning,
              kind=config.model.kind)


def encode_dataset(config, params, split: str, num_examples: int, batch_size: int = 256):
  """Posterior means and stds (and factors/attributes if present) of the first `num_examples`
  examples of a split, computed on this process's devices. Returns dict of numpy arrays."""
  enc = _jitted_encoder(config_to_json(config))
  out: dict[str, list] = {}
  for batch in pipeline.eval_iterator(config, split, batch_size, num_examples=num_examples):
    mask = np.asarray(batch["mask"], bool)
    mean, std = jax.device_get(enc(params, jnp.asarray(batch["image"])))
    out.setdefault("mean", []).append(np.asarray(mean)[mask])
    out.setdefault("std", []).append(np.asarray(std)[mask])
    for key in ("factors", "attributes", "id"):
      if key in batch:
        out.setdefault(key, []).append(np.asarray(batch[key])[mask])
  return {k: np.concatenate(v) for k, v in out.items()}


@functools.lru_cache(maxsize=8)
def _jitted_encoder(config_json: str):
  _, encoder, _ = _components(config_json)
  tc = json.loads(config_json)["model"]["encoder"]["time_conditioning"]
  return jax.jit(lambda p, x: samplers.encode(encoder, p, x, time_conditioning=tc))


def first_images(config, split: str, n: int) -> np.ndarray:
  """The first n images of a split (for reconstruction grids), [n, H, W, C] in [-1, 1]."""
  batch = next(iter(pipeline.eval_iterator(config, split, n, num_examples=n)))
  return np.asarray(batch["image"])


def sample_grids(config, params, images: np.ndarray, rng: jax.Array,
                 kl_order: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Image grids (uint8 HWC) of reconstructions, prior samples and latent traversals."""
  denoiser, encoder, schedule = components(config)
  kw = _sampling_kwargs(config, schedule)
  n = images.shape[0]
  image_shape = tuple(images.shape[1:])
  r_rec, r_prior, r_trav = jax.random.split(rng, 3)
  grids = {}
  if config.model.kind == "ddpm":
    z = jnp.zeros((n, 1))
    samples = samplers.generate(denoiser, encoder, params, z, r_prior, image_shape=image_shape,
                                **kw)
    grids["samples"] = images_lib.make_grid(np.asarray(samples), ncol=int(math.sqrt(n)) or 1)
    return grids
  x = jnp.asarray(images)
  rec = samplers.reconstruct(denoiser, encoder, params, x, r_rec,
                             use_mean=config.sampling.use_mean, **kw)
  grids["reconstructions"] = images_lib.make_grid(
      np.concatenate([images, np.asarray(rec)]), ncol=n)
  d = config.model.encoder.latent_dim
  z = jax.random.normal(r_prior, (n, d))
  samples = samplers.generate(denoiser, encoder, params, z, r_prior, image_shape=image_shape,
                              **kw)
  grids["prior_samples"] = images_lib.make_grid(np.asarray(samples), ncol=n)
  mean, _ = samplers.encode(encoder, params, x[:1], time_conditioning=kw["time_conditioning"])
  values = jnp.linspace(-config.sampling.traverse_range, config.sampling.traverse_range,
                        config.sampling.traverse_points)
  dims = list(kl_order[:8]) if kl_order is not None else list(range(min(d, 8)))
  rows = [samplers.traverse(denoiser, encoder, params, mean[0], int(dim), values, r_trav,
                            image_shape=image_shape, **kw) for dim in dims]
  grids["traversals"] = images_lib.make_grid(np.concatenate([np.asarray(r) for r in rows]),
                                             ncol=len(values))
  return grids


def write_grids(workdir: str, step: int, grids: dict[str, np.ndarray], writer=None) -> list[str]:
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, grid in grids.items():
    path = os.path.join(out_dir, f"{name}_{step:07d}.png")
    images_lib.save_png(path, grid)
    paths.append(path)
  if writer is not None:
    writer.write_images(step, grids)
  return paths


def probe_summary(config, params) -> dict[str, Any] | None:
  """R^2 of each ground-truth factor predicted from latent means (linear and kNN probes)."""
  from sami_jax.evaluation import probes  # scikit-learn is only needed here
  if config.data.name != "disks" or config.model.kind == "ddpm":
    return None
  n = config.eval.num_examples
  tr = encode_dataset(config, params, "train", n)
  te = encode_dataset(config, params, "test", n)
  r2 = probes.factor_r2(tr["mean"], tr["factors"], te["mean"], te["factors"])
  names = pipeline.factor_names(config)
  return {"factors": names, "linear_r2": [float(v) for v in r2["linear"]],
          "knn_r2": [float(v) for v in r2["knn"]], "num_train": len(tr["mean"]),
          "num_test": len(te["mean"])}


def _load_pretrained_denoiser(config, state, shardings):
  path = config.model.denoiser_checkpoint
  params = ckpt_lib.restore_params_only(_checkpoint_dir(path))
  if "denoiser" not in params:
    raise ValueError(f"{path} holds no denoiser params; point model.denoiser_checkpoint at the "
                     "workdir of a ddpm (or sami) run.")
  expected = jax.tree.map(lambda a: a.shape, state["params"]["denoiser"])
  got = jax.tree.map(lambda a: a.shape, params["denoiser"])
  if expected != got:
    raise ValueError(f"The denoiser in {path} does not match config.model.denoiser (its shapes "
                     f"differ); use the same model.denoiser settings as that run.")
  def put(where):
    # One device copy per use: the train step donates the state, and XLA refuses to donate one
    # buffer twice (params and EMA params must not share arrays).
    return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), params["denoiser"],
                        shardings[where]["denoiser"])
  state = dict(state)
  state["params"] = dict(state["params"], denoiser=put("params"))
  state["ema_params"] = dict(state["ema_params"], denoiser=put("ema_params"))
  # The optimizer state of the frozen subtree is empty (set_to_zero), nothing to reset.
  logging.info("Restored the frozen denoiser from %s.", path)
  return state


def _checkpoint_dir(workdir: str) -> str:
  sub = os.path.join(workdir, "checkpoints")
  return sub if os.path.isdir(sub) else workdir


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so a preempted run saves before it exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(history: list[tuple[int, dict]]):
  for step, m in history:
    if not bool(m["finite"]):
      bad = [k for k, v in m.items() if k != "finite" and not np.isfinite(v)]
      raise NonFiniteError(
          f"Non-finite values at step {step}: {', '.join(bad) or 'loss/grad_norm'} (loss="
          f"{m['loss']}, grad_norm={m['grad_norm']}). The update of that step was not applied "
          "and no checkpoint was written after it; the last checkpoint in the workdir is intact. "
          "Lower optim.lr, raise model.encoder.min_std or set optim.grad_clip, then rerun to "
          "resume from that checkpoint.")


# ------------------------------------------------------------------------------ runs


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) a model in `workdir`. Returns a summary dict (also written to
  workdir/summary.json)."""
  configlib.validate(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with ckpt_lib.WorkdirLock(workdir, enabled=is_main):
    return _train_locked(config, workdir, is_main)


def _train_locked(config, workdir, is_main):
  t_start = time.time()
  # Builds Disks on first use (process 0 first, so processes sharing a data dir do not race) and
  # fails fast on missing data, before anything is compiled.
  if jax.process_index() == 0:
    pipeline.prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sami_jax: dataset prepared")
    pipeline.prepare(config)
  mesh = sharding_lib.make_mesh(config)
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep_last=config.train.keep_ckpts,
                                       keep_every=config.train.keep_every)
  abstract = abstract_state(config)
  shardings = sharding_lib.state_shardings(abstract, mesh, config)
  if checkpointer.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state, saved_config, data_pos, start_step = checkpointer.restore(target)
    logging.info("Resumed from step %d in %s.", start_step, workdir)
    if data_pos.get("seed", config.seed) != config.seed:
      logging.warning("The checkpoint was trained with seed %s, this config says %s: the data "
                      "order changes from here.", data_pos.get("seed"), config.seed)
  else:
    frozen_from = config.model.denoiser_checkpoint
    if config.model.kind == "sami_frozen" and not os.path.isdir(frozen_from):
      # Checked before the state is compiled, so a typo costs seconds, not a compilation.
      raise FileNotFoundError(
          f"config.model.denoiser_checkpoint={frozen_from!r} does not exist; point it at the "
          "workdir (or checkpoints/ folder) of a trained ddpm run.")
    state, _ = create_sharded_state(config, mesh)
    start_step = 0
    if config.model.kind == "sami_frozen":
      state = _load_pretrained_denoiser(config, state, shardings)
  counts = {k: models_lib.count_params(v) for k, v in abstract["params"].items()}
  logging.info("Parameters: %s", counts)

  step_fn = jit_train_step(config, mesh, shardings)
  writer = writers_lib.MetricWriter(workdir, enabled=is_main)
  progress = writers_lib.Progress(config.train.num_steps, start_step)
  sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), _RNG_SAMPLE)
  grid_images = first_images(config, "test", config.train.num_sample_images)
  config_dict = json.loads(config_to_json(config))
  data_iter = pipeline.train_iterator(config, start_step=start_step,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())

  def save(step, force=False):
    checkpointer.save(step, state, config=config_dict,
                      data_position={"step": step, "seed": config.seed}, force=force)

  def grids(step):
    if not config.train.write_grids:
      return
    params = host_params(state["ema_params"])
    if is_main:
      paths = write_grids(workdir, step, sample_grids(config, params, grid_images,
                                                      jax.random.fold_in(sample_rng, step)),
                          writer)
      logging.info("Wrote %s", ", ".join(paths))

  history: list[tuple[int, dict]] = []
  step = start_step
  preempted = False
  try:
    with _Preemption() as preemption:
      while step < config.train.num_steps:
        batch = sharding_lib.global_batch(next(data_iter), mesh)
        state, metrics = step_fn(state, batch)
        history.append((step, metrics))
        step += 1
        last = step == config.train.num_steps
        if step % config.train.log_every == 0 or last or step == start_step + 1:
          fetched = [(s, jax.device_get(m)) for s, m in history]
          history = []
          _check_finite(fetched)
          mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]
                  if k != "finite"}
          mean["steps_per_sec"] = progress.rate(step)
          writer.write_scalars(step, mean)
          if is_main:
            logging.info(progress.line(step, {k: mean[k] for k in _PROGRESS_TERMS if k in mean}))
        stop = preemption.requested
        if jax.process_count() > 1 and step % config.train.log_every == 0:
          stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
        if stop:
          preempted = True
          break
        if step % config.train.ckpt_every == 0 and not last:
          save(step)
        if config.train.sample_every and step % config.train.sample_every == 0 and not last:
          grids(step)
    fetched = [(s, jax.device_get(m)) for s, m in history]
    _check_finite(fetched)
  except BaseException:
    # A save started before the failure (the last good step) runs in a background thread that
    # dies with the interpreter: let it commit, so that the checkpoint the error message points
    # to really is on disk.
    checkpointer.close()
    writer.close()
    raise
  save(step, force=True)
  checkpointer.wait()
  if preempted:
    logging.warning("Preempted at step %d; checkpoint saved. Rerun the same command to resume.",
                    step)
    writer.close()
    checkpointer.close()
    return {"step": step, "preempted": True}

  grids(step)
  summary: dict[str, Any] = {"step": step, "wall_time_s": time.time() - t_start,
                             "params": counts}
  if config.train.probe_at_end:
    probe = probe_summary(config, host_params(state["ema_params"]))
    if probe is not None:
      summary["probe"] = probe
      if is_main:
        lines = [f"  {name:>12s}: linear R^2 {lin:6.3f} | kNN R^2 {knn:6.3f}" for name, lin, knn
                 in zip(probe["factors"], probe["linear_r2"], probe["knn_r2"])]
        logging.info("How well the latents predict each factor (test split):\n%s",
                     "\n".join(lines))
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  writer.close()
  checkpointer.close()
  return summary


def restore_for_inference(config, workdir: str, step: int | None = None):
  """(config saved with the run, EMA params as numpy, step) from a workdir's checkpoint."""
  ckpt_dir = _checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"No checkpoints in {workdir}: train first with --mode=train.")
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep_last=10**6)
  saved = checkpointer.restore_config(step)
  run_config = config_from_json(saved) if saved else config
  abstract = abstract_state(run_config)
  state, _, _, restored_step = checkpointer.restore(abstract, step)
  checkpointer.close()
  return run_config, jax.device_get(state["ema_params"]), restored_step


def latent_prior_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "latent_prior", f"prior_{step:07d}.msgpack")


def fitted_latent_prior(cfg, params, workdir: str, step: int):
  """The latent diffusion prior of a checkpoint: loaded from workdir/latent_prior/, or fitted on
  the encoded training latents (cfg.latent_prior.num_examples of them) and saved there first.
  cfg: the run's config with the latent_prior.* fields of the command line."""
  from sami_jax import latent_prior  # pylint: disable=g-import-not-at-top
  path = latent_prior_path(workdir, step)
  d = cfg.model.encoder.latent_dim
  if os.path.exists(path):
    logging.info("Using the latent prior in %s.", path)
    return latent_prior.load(path, d, cfg)
  t0 = time.time()
  latents = encode_dataset(cfg, params, "train", cfg.latent_prior.num_examples)["mean"]
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), _RNG_LATENT_PRIOR)
  prior = latent_prior.fit(cfg, latents, rng)
  if jax.process_index() == 0:
    latent_prior.save(path, prior)
  logging.info("Fitted the latent prior on %d training latents in %.1f s (final loss %.4f); "
               "saved to %s.", len(latents), time.time() - t0, prior.final_loss, path)
  return prior


def sample(config, workdir: str) -> list[str]:
  """Writes reconstruction / prior / traversal grids for the latest checkpoint; with
  sampling.prior == "latent_diffusion" also samples whose z come from the fitted latent prior."""
  from sami_jax import latent_prior  # pylint: disable=g-import-not-at-top
  run_config, params, step = restore_for_inference(config, workdir)
  wants_prior = config.sampling.prior == "latent_diffusion"
  if wants_prior and run_config.model.kind == "ddpm":
    raise ValueError("sampling.prior=latent_diffusion needs latents; this run is a ddpm (no "
                     "encoder). Drop --config.sampling.prior.")
  rng = jax.random.fold_in(jax.random.PRNGKey(run_config.seed), _RNG_SAMPLE)
  images = first_images(run_config, "test", run_config.train.num_sample_images)
  grids = sample_grids(run_config, params, images, rng)
  if wants_prior:
    cfg = config_from_json(config_to_json(run_config))
    cfg.latent_prior = config.latent_prior
    prior = fitted_latent_prior(cfg, params, workdir, step)
    n = run_config.train.num_sample_images
    r_z, r_x = jax.random.split(jax.random.fold_in(rng, _RNG_LATENT_PRIOR))
    z = latent_prior.sample(cfg, prior, n, r_z)
    denoiser, encoder, schedule = components(run_config)
    x = samplers.generate(denoiser, encoder, params, z, r_x, image_shape=tuple(images.shape[1:]),
                          **_sampling_kwargs(run_config, schedule))
    grids["latent_prior_samples"] = images_lib.make_grid(np.asarray(x), ncol=n)
  return write_grids(workdir, step, grids)
