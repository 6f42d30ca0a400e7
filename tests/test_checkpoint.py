"""Tests for sami_jax.checkpoint: round trips with shardings, keep policy, damaged checkpoints,
restore_params_only and the workdir lock. conftest.py gives 8 fake CPU devices."""

import gc
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sami_jax import checkpoint as ckpt_lib
from tests.test_config import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# When one array of a damaged checkpoint fails to read, Orbax abandons the reads of the others;
# their coroutines are reported as "never awaited" when garbage-collected. That is expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


@pytest.fixture
def collect_abandoned_reads():
  """Collects Orbax's abandoned read coroutines inside the test, where the filters above apply.

  They are released by Orbax's background threads a little later, hence the short waits.
  """
  yield
  for _ in range(3):
    time.sleep(0.1)
    gc.collect()


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("data",))


def _host_state(k: float) -> dict:
  """The numpy values of the state saved at step k (the independent expectation)."""
  return {
      "params": {"w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16) + k,
                 "b": np.full((3,), k, np.float32)},
      "step": np.array(int(k), np.int32),
  }


def _device_state(k: float, mesh: Mesh) -> dict:
  host = _host_state(k)
  return {
      "params": {"w": jax.device_put(host["params"]["w"], NamedSharding(mesh, P("data"))),
                 "b": jax.device_put(host["params"]["b"], NamedSharding(mesh, P()))},
      "step": jnp.asarray(host["step"]),
  }


def _target(mesh: Mesh) -> dict:
  # Deliberately a different layout from the one saved (columns instead of rows), so the test
  # sees that the target's sharding, not the stored one, decides where arrays go.
  return {
      "params": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                           sharding=NamedSharding(mesh, P(None, "data"))),
                 "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))},
      "step": jax.ShapeDtypeStruct((), jnp.int32),  # no sharding: first local device
  }


def _save_steps(directory, steps, **kwargs) -> None:
  mesh = _mesh()
  ck = ckpt_lib.Checkpointer(directory, **kwargs)
  for s in steps:
    ck.save(s, _device_state(s, mesh), config={"s": s}, data_position={"step": s, "seed": 0})
  ck.close()


def _assert_state_equal(restored, expected) -> None:
  got = jax.tree.map(np.asarray, restored)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_round_trip_with_shardings_config_and_data_position(tmp_path):
  mesh = _mesh()
  config = {"lr": 1e-3, "name": "disks", "nested": {"dims": [1, 2, 3]}, "flag": True}
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=3)
  assert ck.latest_step() is None
  assert ck.save(7, _device_state(7, mesh), config=config, data_position={"step": 7, "seed": 3})
  ck.close()

  reader = ckpt_lib.Checkpointer(tmp_path, keep_last=3)  # a fresh object reads from disk
  assert reader.latest_step() == 7
  target = _target(mesh)
  state, got_config, data_position, step = reader.restore(target)
  reader.close()
  assert step == 7
  assert got_config == config
  assert data_position == {"step": 7, "seed": 3}
  _assert_state_equal(state, _host_state(7))
  assert state["params"]["w"].sharding == target["params"]["w"].sharding
  assert state["params"]["b"].sharding == target["params"]["b"].sharding
  assert state["step"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def test_restore_config_and_explicit_step(tmp_path):
  _save_steps(tmp_path, [1, 2], keep_last=5)
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=5)
  assert ck.restore_config() == {"s": 2}
  assert ck.restore_config(1) == {"s": 1}
  state, _, _, step = ck.restore(_target(_mesh()), step=1)
  assert step == 1
  _assert_state_equal(state, _host_state(1))
  with pytest.raises(FileNotFoundError, match="step 9"):
    ck.restore_config(9)
  ck.close()


@pytest.mark.parametrize("keep_last,keep_every,expected", [
    (2, 5, [5, 10, 11, 12]),  # the two newest plus every multiple of 5
    (3, 0, [10, 11, 12]),
])
def test_keep_policy(tmp_path, keep_last, keep_every, expected):
  _save_steps(tmp_path, range(1, 13), keep_last=keep_last, keep_every=keep_every)
  on_disk = sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit())
  assert on_disk == expected
  assert ckpt_lib.Checkpointer(tmp_path, keep_last=1).all_steps() == expected


def test_async_pruning_never_leaves_no_committed_checkpoint(tmp_path):
  """With keep_last=1, the old step may only go once the new one is committed."""
  mesh = _mesh()
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=1, async_save=True)
  ck.save(1, _device_state(1, mesh), config={}, data_position={})
  ck.wait()
  for s in range(2, 5):
    ck.save(s, _device_state(s, mesh), config={}, data_position={})
    waiter = threading.Thread(target=ck.wait)
    waiter.start()
    while waiter.is_alive():
      assert os.path.isdir(tmp_path / str(s - 1)) or os.path.isdir(tmp_path / str(s))
    waiter.join()
  ck.close()
  assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["4"]


def _truncate_array_files(step_dir) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, f"no array data files found under {step_dir}"
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(10)


def _delete_state(step_dir) -> None:
  shutil.rmtree(os.path.join(step_dir, "state"))


def _truncate_json(step_dir) -> None:
  path = os.path.join(step_dir, "data_position", "metadata")
  assert os.path.isfile(path)
  with open(path, "r+b") as fh:
    fh.truncate(3)


def _truncate_integrity_record(step_dir) -> None:
  path = os.path.join(step_dir, "integrity", "metadata")
  assert os.path.isfile(path)
  with open(path, "r+b") as fh:
    fh.truncate(5)


@pytest.mark.parametrize("damage", [_truncate_array_files, _delete_state, _truncate_json,
                                    _truncate_integrity_record])
def test_damaged_newest_falls_back_with_warning(collect_abandoned_reads, tmp_path, caplog, damage):
  _save_steps(tmp_path, [1, 2, 3], keep_last=5)
  damage(str(tmp_path / "3"))
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=5)
  with caplog.at_level(logging.WARNING):
    state, config, data_position, step = ck.restore(_target(_mesh()))
  assert step == 2
  assert config == {"s": 2} and data_position == {"step": 2, "seed": 0}
  _assert_state_equal(state, _host_state(2))
  warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "step 3" in warnings and "damaged" in warnings

  # Training resumes from step 2: saving step 3 again moves the damaged one aside first.
  assert ck.save(3, _device_state(30, _mesh()), config={"s": 30}, data_position={})
  ck.wait()
  assert os.path.isdir(tmp_path / "damaged" / "3")
  state, config, _, step = ck.restore(_target(_mesh()))
  ck.close()
  assert step == 3 and config == {"s": 30}
  _assert_state_equal(state, _host_state(30))


def test_all_damaged_raises_clear_error(collect_abandoned_reads, tmp_path):
  _save_steps(tmp_path, [1, 2], keep_last=5)
  for s in (1, 2):
    _truncate_array_files(str(tmp_path / str(s)))
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=5)
  with pytest.raises(RuntimeError, match="No intact checkpoint") as info:
    ck.restore(_target(_mesh()))
  assert str(tmp_path) in str(info.value)
  assert "[2, 1]" in str(info.value)
  with pytest.raises(RuntimeError, match="No intact checkpoint"):
    ckpt_lib.restore_params_only(tmp_path)
  ck.close()


def test_wrong_target_is_a_value_error_not_damage(tmp_path):
  _save_steps(tmp_path, [1, 2], keep_last=5)
  target = _target(_mesh())
  target["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=5)
  with pytest.raises(ValueError, match="does not match"):
    ck.restore(target)
  bad_shape = _target(_mesh())
  bad_shape["params"]["b"] = jax.ShapeDtypeStruct((4,), jnp.float32)
  with pytest.raises(ValueError, match="step 2"):
    ck.restore(bad_shape)
  ck.close()


def test_missing_and_empty_directories(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "empty", keep_last=2)
  assert ck.latest_step() is None
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    ck.restore(_target(_mesh()))
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    ck.restore_config()
  ck.close()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.restore_params_only(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    ckpt_lib.restore_params_only(tmp_path / "empty")


def test_save_refuses_to_overwrite_or_go_back(tmp_path):
  mesh = _mesh()
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=5)
  assert ck.save(2, _device_state(2, mesh), config={}, data_position={})
  assert not ck.save(2, _device_state(99, mesh), config={}, data_position={}, force=True)
  with pytest.raises(RuntimeError, match="newer checkpoints"):
    ck.save(1, _device_state(1, mesh), config={}, data_position={})
  with pytest.raises(ValueError, match="JSON"):
    ck.save(3, _device_state(3, mesh), config={"x": object()}, data_position={})
  state, _, _, step = ck.restore(_target(mesh))
  ck.close()
  assert step == 2
  _assert_state_equal(state, _host_state(2))


@pytest.mark.parametrize("with_ema", [True, False])
def test_restore_params_only(tmp_path, with_ema):
  params = {"denoiser": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "encoder": {"bias": np.ones(4, np.float32)}}
  ema = jax.tree.map(lambda a: a * 10.0, params)
  state = {"params": jax.tree.map(jnp.asarray, params),
           "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)},
           "step": jnp.array(5), "rng": jax.random.PRNGKey(0)}
  if with_ema:
    state["ema_params"] = jax.tree.map(jnp.asarray, ema)
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=2)
  ck.save(5, state, config={}, data_position={})
  ck.close()
  got = ckpt_lib.restore_params_only(tmp_path)
  expected = ema if with_ema else params
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, b)


_SUBPROCESS_RESTORE = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sami_jax import checkpoint as ckpt_lib
    assert jax.device_count() == 4, jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    target = {"params": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                                   sharding=NamedSharding(mesh, P("data"))),
                         "b": jax.ShapeDtypeStruct((3,), jnp.float32,
                                                   sharding=NamedSharding(mesh, P()))},
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    ck = ckpt_lib.Checkpointer(sys.argv[1], keep_last=2)
    state, _, _, step = ck.restore(target)
    w = state["params"]["w"]
    assert w.sharding == target["params"]["w"].sharding, w.sharding
    assert sorted(s.data.shape for s in w.addressable_shards) == [(2, 16)] * 4
    expected = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) + step
    np.testing.assert_array_equal(np.asarray(w), expected)
    print("OK", step)
""")


def test_restore_on_a_different_device_count(tmp_path):
  """Saved over 8 devices here, restored over 4 in a fresh process."""
  _save_steps(tmp_path, [4], keep_last=2)
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", _SUBPROCESS_RESTORE, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK 4" in out.stdout


# ---------------------------------------------------------------------------------- lock


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_blocks_second_run_and_is_released(tmp_path):
  with ckpt_lib.WorkdirLock(tmp_path) as lock:
    with open(tmp_path / ".lock") as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RuntimeError) as info:
      ckpt_lib.WorkdirLock(tmp_path).acquire()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "delete" in message and str(tmp_path / ".lock") in message
    assert lock.path == str(tmp_path / ".lock")
  assert not os.path.exists(tmp_path / ".lock")
  with ckpt_lib.WorkdirLock(tmp_path):  # free again
    pass


def test_lock_released_on_exception(tmp_path):
  with pytest.raises(KeyError):
    with ckpt_lib.WorkdirLock(tmp_path):
      raise KeyError("boom")
  assert not os.path.exists(tmp_path / ".lock")


def test_stale_lock_is_taken_over(tmp_path, caplog):
  pid = _dead_pid()
  with open(tmp_path / ".lock", "w") as f:
    json.dump({"pid": pid, "host": socket.gethostname(), "time": 0}, f)
  with caplog.at_level(logging.WARNING):
    with ckpt_lib.WorkdirLock(tmp_path):
      with open(tmp_path / ".lock") as f:
        assert json.load(f)["pid"] == os.getpid()
  assert any("stale" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records)
  assert not os.path.exists(tmp_path / ".lock")


def test_lock_with_own_pid_from_an_earlier_process_is_stale(tmp_path):
  """E.g. a restarted container where the run gets the same pid as before."""
  with open(tmp_path / ".lock", "w") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": 0}, f)
  with ckpt_lib.WorkdirLock(tmp_path):
    with pytest.raises(RuntimeError, match="Another run"):  # now really held by this process
      ckpt_lib.WorkdirLock(tmp_path).acquire()
  assert not os.path.exists(tmp_path / ".lock")


def test_lock_from_another_host_is_respected(tmp_path):
  with open(tmp_path / ".lock", "w") as f:
    json.dump({"pid": _dead_pid(), "host": "some-other-host", "time": 0}, f)
  with pytest.raises(RuntimeError, match="some-other-host"):
    with ckpt_lib.WorkdirLock(tmp_path):
      pass
  assert os.path.exists(tmp_path / ".lock")  # not ours to remove


def test_disabled_lock_does_nothing(tmp_path):
  with ckpt_lib.WorkdirLock(tmp_path, enabled=True):
    with ckpt_lib.WorkdirLock(tmp_path, enabled=False):  # e.g. process 1 of a multi-host run
      pass
    assert os.path.exists(tmp_path / ".lock")
