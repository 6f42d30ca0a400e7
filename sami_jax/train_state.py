"""The train state and the pure train step: optimizer, state initialisation, the jitted step.

    state = create_sharded_state(config, mesh)        # created directly with its shardings
    step_fn = jit_train_step(config, mesh)            # one jax.jit over the mesh, state donated
    state, metrics = step_fn(state, batch)

The step is a single jitted call: loss, guidance score (`jax.grad` inside the loss), gradient,
clipping, Adam, EMA and the non-finite guard all happen inside it; nothing goes back to the host.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree

from sami_jax import configlib
from sami_jax import kinds
from sami_jax import models as models_lib
from sami_jax import rngs
from sami_jax import schedules
from sami_jax import sharding as sharding_lib
from sami_jax.utils import compile_cache

State = dict[str, Any]


def learning_rate_fn(config: ml_collections.ConfigDict):
  """Linear warm-up over optim.warmup_steps, then constant or cosine decay to 0 at num_steps."""
  o = config.optim
  warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
  if o.lr_decay == "cosine":
    rest = optax.cosine_decay_schedule(o.lr, max(config.train.num_steps - o.warmup_steps, 1))
  else:
    rest = optax.constant_schedule(o.lr)
  return optax.join_schedules([warmup, rest], [o.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict, labels) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam(W) per trained subtree (encoder lr scaled by
  optim.encoder_lr_mult); what is labelled "frozen" gets exactly zero updates.

  Args:
    labels: the optimizer's view of the params with each leaf replaced by its subtree's label
      (`optimizer_view(config, params)[1]`).
  """
  o = config.optim
  lr = learning_rate_fn(config)

  def adam(mult):
    sched = (lambda s: lr(s) * mult) if mult != 1.0 else lr
    return optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)

  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.multi_transform(
      {"denoiser": adam(1.0), "decoder": adam(1.0), "encoder": adam(o.encoder_lr_mult),
       "frozen": optax.set_to_zero()}, labels))
  return optax.chain(*parts)


def _flat(config: ml_collections.ConfigDict) -> bool:
  return configlib.flat_update(config, jax.device_count())


def optimizer_view(config: ml_collections.ConfigDict, tree: dict):
  """What the optimizer (and the EMA and the guard) work on, its labels, and the way back.

  "tree" layout: `tree` itself (each array its own leaf, frozen subtrees labelled "frozen").
  "flat" layout: one float vector per trained subtree, `{name: [n_name]}` (raveled in
  jax.tree order); frozen subtrees are left out. Per element the arithmetic is the same; the
  flat one runs as a few fused kernels instead of several per array.

  Args:
    tree: params-shaped dict `{subtree name: pytree of arrays}` (params, gradients or EMA).
  Returns:
    (view, labels, to_tree): `to_tree(new_view, like)` puts the view's values back into a
    params-shaped dict, taking the left-out subtrees from `like`.
  """
  kind = kinds.of(config)
  if not _flat(config):
    return tree, kinds.trainable_labels(kind, tree), lambda view, like: view
  names = [n for n in tree if kind.trains(n)]
  raveled = {n: ravel_pytree(tree[n]) for n in names}
  view = {n: raveled[n][0] for n in names}

  def to_tree(new_view, like):
    return dict(like, **{n: raveled[n][1](new_view[n]) for n in names})
  return view, {n: n for n in names}, to_tree


def init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> State:
  """The train state: params, EMA params, optimizer state, step and the root PRNG key."""
  params = models_lib.init_params(config, jax.random.fold_in(rng, rngs.INIT))
  view, labels, _ = optimizer_view(config, params)
  return {"params": params, "ema_params": params,
          "opt_state": make_optimizer(config, labels).init(view),
          "step": jnp.zeros((), jnp.int32), "rng": rng}


@functools.lru_cache(maxsize=16)
def _abstract_state(frozen_config: ml_collections.FrozenConfigDict, num_devices: int) -> State:
  config = ml_collections.ConfigDict(frozen_config)
  return jax.eval_shape(lambda: init_state(config, jax.random.PRNGKey(config.seed)))


def abstract_state(config: ml_collections.ConfigDict) -> State:
  """The state's shapes and dtypes (jax.ShapeDtypeStruct leaves), computed once per config."""
  return _abstract_state(configlib.frozen(config), jax.device_count())


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(config: ml_collections.ConfigDict):
  """The pure train step `(state, batch) -> (state, metrics)` (metrics are batch-mean scalars).

  A step whose loss, gradient or updated state (params, EMA params, optimizer state) is not finite
  changes nothing: the old state is kept and `metrics["finite"]` is False, so the host can stop
  the run before anything non-finite is saved.
  """
  kind = kinds.of(config)
  image_model, encoder = models_lib.build_models(config)
  schedule = schedules.from_config(config)
  loss_fn = kinds.make_loss_fn(config, image_model, encoder, schedule)
  ema_decay = config.optim.ema_decay
  lr_fn = learning_rate_fn(config)

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.fold_in(state["rng"], rngs.TRAIN), step)
    params = state["params"]
    (loss, terms), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, rng, step, train=True), has_aux=True)(params)
    # Adam, the EMA and the guard on the optimizer's view (flat vectors or the params' tree).
    p, labels, to_tree = optimizer_view(config, params)
    g, e = optimizer_view(config, grads)[0], optimizer_view(config, state["ema_params"])[0]
    updates, new_opt_state = make_optimizer(config, labels).update(g, state["opt_state"], p)
    new_p = optax.apply_updates(p, updates)
    # EMA with the usual warm-up, so early EMA params are not dominated by the random init.
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    new_e = jax.tree.map(lambda a, b: decay * a + (1.0 - decay) * b, e, new_p)
    # Subtrees that do not train stay bitwise identical in the EMA too.
    frozen = {k: params[k] for k in kind.frozen if k in params}
    new_e = dict(new_e, **{k: v for k, v in frozen.items() if k in new_e})

    # Frozen subtrees have zero gradients (stop_gradient / unused), so leaving them out of the
    # flat view does not change the norm.
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
    state_finite = _all_finite((new_p, new_e, new_opt_state))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": to_tree(keep(new_p, p), params),
        "ema_params": dict(to_tree(keep(new_e, e), state["ema_params"]), **frozen),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": step + 1,
        "rng": state["rng"],
    }
    metrics = {k: jnp.mean(v) for k, v in terms.items() if k != "t"}
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite, state_finite=state_finite,
                   lr=lr_fn(step))
    beta = kinds.kl_weight(kind, config, step)
    if beta is not None:
      metrics["beta"] = beta
    return new_state, metrics

  return train_step


@functools.lru_cache(maxsize=4)
def _jit_train_step(frozen_config: ml_collections.FrozenConfigDict, mesh):
  config = ml_collections.ConfigDict(frozen_config)
  shardings = sharding_lib.state_shardings(abstract_state(config), mesh, config)
  return jax.jit(make_train_step(config),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def jit_train_step(config: ml_collections.ConfigDict, mesh):
  """The jitted, sharded train step (state donated). Cached per (config, mesh), so a resumed or
  repeated run in the same process reuses the compiled step."""
  return _jit_train_step(configlib.frozen(config), mesh)


# Training fields the traced init and step do not read: the seed (the PRNG key is an argument, or
# part of the state) and the run loop's bookkeeping.
NOT_TRACED = ("seed", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
               "train.keep_every", "train.sample_every", "train.num_sample_images",
               "train.write_grids", "train.probe_at_end")


def _program_description(config: ml_collections.ConfigDict) -> str:
  """What the traced init and train step depend on besides their arguments' types: the config's
  training fields but those of NOT_TRACED."""
  fields = {k: v for k, v in configlib.training_fields(config).items() if k not in NOT_TRACED}
  return json.dumps(fields, sort_keys=True, default=repr)


def begin_train_step(config: ml_collections.ConfigDict, mesh) -> compile_cache.Pending:
  """Starts loading the train step a previous run of this config, code and jax saved (in a
  background thread); `compiled_train_step` picks it up. Call it early: the load (seconds at the
  quick-start size) then overlaps the state's creation and the data pipeline's start."""
  return compile_cache.begin("train_step", _program_description(config),
                             (state_types(config, mesh),), mesh.devices.flat)


def compiled_train_step(config: ml_collections.ConfigDict, mesh, state: State, batch,
                        pending: compile_cache.Pending | None = None):
  """`jit_train_step` compiled for these arguments' types: loaded from disk when a previous run
  saved it (see utils/compile_cache), without tracing, else compiled and saved for the next."""
  types = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       (state, batch))
  pending = pending or begin_train_step(config, mesh)
  return pending.result(lambda: jit_train_step(config, mesh), types)


def _init_key(config: ml_collections.ConfigDict, mesh) -> jax.Array:
  """The state creation's argument, replicated over the mesh: placed like that, a loaded
  executable takes it as the compiled one does (an uncommitted key on one device is not the
  argument type a mesh of several devices compiled for)."""
  return jax.device_put(jax.random.PRNGKey(config.seed), sharding_lib.replicated(mesh))


@functools.lru_cache(maxsize=4)
def _init_executable_cached(frozen_config: ml_collections.FrozenConfigDict, mesh):
  config = ml_collections.ConfigDict(frozen_config)
  rng = _init_key(config, mesh)

  def make():
    return jax.jit(lambda r: init_state(config, r), in_shardings=rng.sharding,
                   out_shardings=state_shardings(config, mesh),
                   compiler_options=models_lib.init_compiler_options() or None)
  return compile_cache.load_or_compile(make, (rng,), name="init",
                                       description=_program_description(config),
                                       devices=mesh.devices.flat)


def _init_executable(config: ml_collections.ConfigDict, mesh):
  """The jitted state creation, compiled without LLVM optimisation (it runs once) or loaded;
  once per (config, mesh) in a process, also where nothing is saved (multi-process runs), since
  both `state_types` and `create_sharded_state` need it."""
  return _init_executable_cached(configlib.frozen(config), mesh)


def state_types(config: ml_collections.ConfigDict, mesh) -> State:
  """The state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), read from the state
  creation's executable (loaded from disk on a second run: nothing is traced)."""
  return _init_executable(config, mesh).out_info


def state_shardings(config: ml_collections.ConfigDict, mesh) -> State:
  """The NamedSharding of every state leaf (FSDP rules of sharding.py)."""
  return sharding_lib.state_shardings(abstract_state(config), mesh, config)


def create_sharded_state(config: ml_collections.ConfigDict, mesh) -> State:
  """The initial state, created directly with its final shardings (no host copy)."""
  return _init_executable(config, mesh)(_init_key(config, mesh))
