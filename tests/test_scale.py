"""The knobs for scaling up change how the step is computed, not what it computes: FSDP sharding,
bfloat16 compute and rematerialisation, each checked against the plain float32 replicated step.

Runs in-process on the 8 fake CPU devices of conftest.py, with the tiny disks `test` model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import configlib
from sami_jax import inference
from sami_jax import kinds
from sami_jax import models as models_lib
from sami_jax import objective
from sami_jax import sharding as sharding_lib
from sami_jax import train_state
from tests.test_config import load_config


def _config(**overrides):
  """The disks `test` config with dotted-path overrides, e.g. _config(**{"model.dtype": ...})."""
  c = load_config("disks", "test")
  # No warm-up: step 0 already moves conv_out (zero-initialised, so until it moves no gradient
  # reaches the rest of the U-Net), and step 1 then updates every parameter.
  c.optim.warmup_steps = 0
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _batches(config, n: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  s, ch, b = config.data.image_size, config.data.channels, config.train.batch_size
  return [{"image": rng.uniform(-1, 1, (b, s, s, ch)).astype(np.float32)} for _ in range(n)]


def _perturb(params, scale: float = 0.05):
  """Host (numpy) copy of `params` plus fixed noise, so that the zero-initialised output conv does
  not hide the rest of the network from the loss and the gradients. Numpy, not jax.random: no
  extra compilation."""
  leaves, treedef = jax.tree.flatten(jax.device_get(params))
  rng = np.random.default_rng(123)
  noisy = [np.asarray(p + scale * rng.standard_normal(p.shape), dtype=p.dtype) for p in leaves]
  return jax.tree.unflatten(treedef, noisy)


def _assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert len(la) > 0
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ FSDP


def _two_steps(mesh_spec: str, fsdp_min_size: int):
  """Two train steps from the (perturbed) initial state on a mesh. Returns (final host state,
  initial host params, per-step metrics, PartitionSpecs of the params)."""
  config = _config(mesh=mesh_spec, fsdp_min_size=fsdp_min_size)
  mesh = sharding_lib.make_mesh(config)
  state = train_state.create_sharded_state(config, mesh)
  shardings = train_state.state_shardings(config, mesh)
  initial = _perturb(state["params"])
  state = dict(state, params=jax.device_put(initial, shardings["params"]),
               ema_params=jax.device_put(initial, shardings["ema_params"]))
  step_fn = train_state.jit_train_step(config, mesh)
  metrics = []
  for batch in _batches(config, 2):
    state, m = step_fn(state, sharding_lib.global_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  specs = [s.spec for s in jax.tree.leaves(shardings["params"])]
  return jax.device_get(state), initial, metrics, specs


_FSDP_MIN_SIZE = 512  # small enough that the tiny U-Net's 3x3x8x8 convs are split over fsdp


@pytest.fixture(scope="module")
def replicated():
  """The reference: two steps on data:8,fsdp:1 (its initial params also serve the bf16 and remat
  tests, which saves compiling the init again)."""
  assert jax.device_count() == 8
  return _two_steps("data:8,fsdp:1", _FSDP_MIN_SIZE)


def test_fsdp_step_matches_replicated_step(replicated):
  rep_state, rep_init, rep_metrics, rep_specs = replicated
  fsdp_state, fsdp_init, fsdp_metrics, fsdp_specs = _two_steps("data:4,fsdp:2", _FSDP_MIN_SIZE)

  # optim.update_layout "auto": the replicated run's Adam moments are one vector per trained
  # subtree ("flat"), the FSDP run's one array per parameter ("tree"), so this also checks that
  # the two layouts compute the same step.
  n_params = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in rep_init.items()}
  rep_moments = [x for x in jax.tree.leaves(rep_state["opt_state"]) if x.ndim > 0]
  assert sorted(x.size for x in rep_moments) == sorted(2 * list(n_params.values()))
  assert all(x.ndim == 1 for x in rep_moments)
  fsdp_moments = [x for x in jax.tree.leaves(fsdp_state["opt_state"]) if x.ndim > 0]
  assert len(fsdp_moments) == 2 * len(jax.tree.leaves(fsdp_init))
  assert any("fsdp" in tuple(spec) for spec in fsdp_specs), fsdp_specs
  assert any(tuple(spec) == () for spec in fsdp_specs)  # small leaves stay replicated
  assert all(tuple(spec) == () for spec in rep_specs)

  for m_f, m_r in zip(fsdp_metrics, rep_metrics):
    assert bool(m_f["finite"]) and bool(m_r["finite"])
    np.testing.assert_allclose(m_f["loss"], m_r["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_f["grad_norm"], m_r["grad_norm"], rtol=1e-4)
  assert int(fsdp_state["step"]) == int(rep_state["step"]) == 2
  _assert_trees_close(fsdp_init, rep_init, rtol=0, atol=0)  # the same start on both meshes
  # Adam moves each parameter by about lr=2e-4 per step; a wrong (e.g. unsummed) gradient flips
  # signs and is off by that much. Summation order alone gives differences of a few 1e-6.
  _assert_trees_close(fsdp_state["params"], rep_state["params"], rtol=1e-5, atol=2e-5)
  _assert_trees_close(fsdp_state["ema_params"], rep_state["ema_params"], rtol=1e-5, atol=2e-5)
  # Every parameter moved, so the comparison above is not one of untouched values.
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(fsdp_state["params"]),
                                                  jax.tree.leaves(fsdp_init))]
  assert min(moved) > 5e-5, moved


# ------------------------------------------------------------------------------ bf16 and remat


_LOSS_AND_GRAD_CACHE: dict[str, object] = {}


def _loss_and_grad(config):
  """jit(value_and_grad) of the SAMI loss at step 0 with a fixed key; cached per config, so the
  float32 reference is compiled once for both tests."""
  key = configlib.to_json(config)
  if key not in _LOSS_AND_GRAD_CACHE:
    comp = inference.components(config)
    loss_fn = kinds.make_loss_fn(config, comp.image_model, comp.encoder, comp.schedule)

    def f(p, batch):
      return loss_fn(p, batch, jax.random.PRNGKey(7), jnp.int32(0), train=True)
    _LOSS_AND_GRAD_CACHE[key] = jax.jit(jax.value_and_grad(f, has_aux=True))
  return _LOSS_AND_GRAD_CACHE[key]


@pytest.fixture(scope="module")
def tiny(replicated):
  """float32 params (the perturbed init of `replicated`) and one batch."""
  _, initial, _, _ = replicated
  params = jax.device_put(initial, jax.devices()[0])
  batch = {"image": jnp.asarray(_batches(_config(), 1)[0]["image"])}
  return params, batch


def test_bfloat16_loss_is_close_to_float32_and_params_stay_float32(tiny):
  params, batch = tiny
  c32, c16 = _config(), _config(**{"model.dtype": "bfloat16"})
  (l32, t32), _ = _loss_and_grad(c32)(params, batch)
  (l16, t16), g16 = _loss_and_grad(c16)(params, batch)
  assert np.isfinite(float(l16))
  assert float(l16) != float(l32)  # the compute dtype is really in use
  np.testing.assert_allclose(float(l16), float(l32), rtol=0.03)
  np.testing.assert_allclose(np.mean(t16["mse_uncond"]), np.mean(t32["mse_uncond"]), rtol=0.03)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))

  # Params, EMA and optimizer state stay float32 through a bf16 train step (traced, not compiled).
  init16 = jax.eval_shape(lambda: models_lib.init_params(c16, jax.random.PRNGKey(0)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init16))
  abstract = train_state.abstract_state(c16)
  batch_struct = {"image": jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32)}
  new_state, metrics = jax.eval_shape(train_state.make_train_step(c16), abstract, batch_struct)
  for key in ("params", "ema_params", "opt_state"):
    floats = [x for x in jax.tree.leaves(new_state[key]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats), key
  assert metrics["loss"].dtype == jnp.float32


def test_remat_gives_the_same_loss_and_gradients(tiny):
  params, batch = tiny
  c_plain, c_remat = _config(), _config(**{"model.denoiser.remat": True})
  f_plain = _loss_and_grad(c_plain)
  f_remat = _loss_and_grad(c_remat)
  # remat really rematerialises (a checkpoint/remat primitive in the traced program).
  remat_names = ("checkpoint", "remat")
  assert any(n in str(jax.make_jaxpr(f_remat)(params, batch)) for n in remat_names)
  assert not any(n in str(jax.make_jaxpr(f_plain)(params, batch)) for n in remat_names)

  (l_plain, _), g_plain = f_plain(params, batch)
  (l_remat, _), g_remat = f_remat(params, batch)
  np.testing.assert_allclose(float(l_remat), float(l_plain), rtol=1e-6)
  _assert_trees_close(g_remat, g_plain, rtol=1e-4, atol=1e-7)
  # The gradients reach the whole U-Net, so the comparison covers every rematerialised block.
  den = g_plain["denoiser"]
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(den))
