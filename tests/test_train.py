"""End-to-end training: from `main`, on 8 and 1 devices, in 2 processes, resumed, on CelebA mock data."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sami_jax import checkpoint as ckpt_lib
from sami_jax import inference
from sami_jax import train
from sami_jax import train_state
from sami_jax.utils import compile_cache
from tests.test_config import ROOT, load_config, xla_flags


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _main_args(workdir, data_dir, *extra, config="configs/disks.py:test"):
  return [sys.executable, "-m", "sami_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.train.write_grids=false",
          "--config.train.probe_at_end=false", *extra]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4-step run from `main` on 8 fake devices and on 1 device."""
  base = tmp_path_factory.mktemp("runs")
  data_dir = str(base / "tfds")
  out = {"data_dir": data_dir}
  for devices in (8, 1):
    wd = str(base / f"dev{devices}")
    proc = subprocess.run(_main_args(wd, data_dir), env=_env(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out[devices] = wd
  return out


def test_main_trains_on_8_devices_and_1_device_gives_the_same_loss(runs):
  m8, m1 = _metrics(runs[8]), _metrics(runs[1])
  assert [m["step"] for m in m8] == [1, 2, 4] == [m["step"] for m in m1]
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  assert all(np.isfinite(m["loss"]) for m in m8)
  assert m8[-1]["loss"] < m8[0]["loss"] * 1.5  # it trains, it does not blow up
  ckpt = ckpt_lib.Checkpointer(os.path.join(runs[8], "checkpoints"), keep_last=10)
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_two_processes_on_localhost_agree_with_one_process(runs, tmp_path):
  """jax.distributed over a localhost coordinator: 2 processes x 1 device, data-parallel."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  wd = str(tmp_path / "mp")
  procs = [subprocess.Popen(_main_args(wd, runs["data_dir"], f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                            env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1 of 2" in outs[1][1] or "process 1 of 2" in outs[0][1]
  mp, single = _metrics(wd), _metrics(runs[1])
  assert [m["step"] for m in mp] == [m["step"] for m in single]
  for a, b in zip(mp, single):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def _tiny(data_dir, steps):
  c = load_config("disks", "test")
  c.data.data_dir = data_dir
  c.train.num_steps = steps
  c.train.ckpt_every = 2
  c.train.write_grids = False
  c.train.probe_at_end = False
  return c


def test_a_second_run_loads_the_saved_train_step_and_resumes_exactly(runs, tmp_path,
                                                                     monkeypatch):
  """Resuming is exact, and the next process loads the train step a run saved, without tracing
  it: 4 steps in one go == 2 steps, stop, then a resume (its step loaded from disk) to 4, bitwise
  the same params."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  full, split = str(tmp_path / "full"), str(tmp_path / "split")

  def config(steps):
    c = _tiny(runs["data_dir"], steps)
    # A learning rate no other test uses: a program JAX's cache (shared by the test session)
    # does not hold yet, so it is compiled here, and saved (one from JAX's cache is not).
    c.optim.lr = 1.2345e-3
    return c

  train.train(config(4), full)
  assert len(list((cache / "executables").glob("train_step-*.bin"))) == 1
  train.train(config(2), split)  # another key (num_steps), the same program: JAX's cache has it
  # As a new process: nothing in memory, so the 4-step run's step comes from its file.
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  train_state._jit_train_step.cache_clear()
  built = []
  real = train_state.make_train_step
  monkeypatch.setattr(train_state, "make_train_step", lambda c: built.append(c) or real(c))
  assert train.train(config(4), split)["step"] == 4
  assert not built
  _, p_full, _ = inference.restore(full)
  _, p_split, _ = inference.restore(split)
  assert len(jax.tree.leaves(p_full)) > 0
  for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_split), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The full run logs the mean loss of steps 3-4 at step 4; the resumed run logs steps 3 and 4
  # separately (it logs the first step after a restart).
  m_full = {m["step"]: m["loss"] for m in _metrics(full)}
  m_split = {m["step"]: m["loss"] for m in _metrics(split)}
  np.testing.assert_allclose(m_full[4], (m_split[3] + m_split[4]) / 2, rtol=1e-6)


@pytest.fixture
def compiled_here(monkeypatch):
  """JAX's persistent cache (shared by the test session) off for one test: every program is
  really compiled, so the executable cache saves it (one that came from JAX's cache is not)."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


def test_two_kinds_train_steps_build_in_one_process_on_a_warm_cache(tmp_path, monkeypatch,
                                                                      compiled_here):
  """ddpm, then sami, in one process whose executable cache holds both kinds' state creation
  (as `sami_jax.compare`, or the train-step benchmark, on a user's second run): each kind's train
  step is traced over the loaded state (jax 0.12.1 failed: "Expected cotangent type float32[1]
  but got float32[1]")."""
  from sami_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  configs = []
  for kind in ("ddpm", "sami"):
    c = _tiny(str(tmp_path / "tfds"), 1)
    c.model.kind = kind
    configs.append(c)
  for c in configs:  # the first run: compiled and saved
    train_state.create_sharded_state(c, sharding_lib.make_mesh(c))
  assert len(list((tmp_path / "cache" / "executables").glob("init-*.bin"))) == 2
  # As the next process: nothing in memory.
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  train_state._init_executable_cached.cache_clear()
  train_state._jit_train_step.cache_clear()
  compiles = []
  real_compile = compile_cache._compile
  monkeypatch.setattr(compile_cache, "_compile", lambda lowered: compiles.append(lowered) or
                      real_compile(lowered))
  for c in configs:
    mesh = sharding_lib.make_mesh(c)
    state = train_state.create_sharded_state(c, mesh)
    assert not compiles  # loaded (on 8 devices too: the key is placed as it was compiled for)
    s = c.data.image_size
    batch = sharding_lib.global_batch(
        {"image": np.zeros((c.train.batch_size, s, s, c.data.channels), np.float32)}, mesh)
    assert train_state.jit_train_step(c, mesh).lower(state, batch) is not None
  train_state._init_executable_cached.cache_clear()


def test_celeba_without_data_says_how_to_prepare_it(tmp_path):
  proc = subprocess.run(_main_args(str(tmp_path / "wd"), str(tmp_path / "empty"),
                                   config="configs/celeba.py:test"),
                        env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "celeb_a" in proc.stderr and "python -m sami_jax.data.celeba" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_celeba_one_step_under_mock_data(tmp_path):
  c = load_config("celeba", "test")
  c.data.data_dir = str(tmp_path / "tfds")
  c.train.write_grids = False
  with tfds.testing.mock_data(num_examples=16):
    summary = train.train(c, str(tmp_path / "wd"))
  assert summary["step"] == 1
  m = _metrics(str(tmp_path / "wd"))
  assert np.isfinite(m[-1]["loss"]) and m[-1]["kl"] >= 0
