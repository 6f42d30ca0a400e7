"""Checkpoint integrity: a NaN state is never saved, altered checkpoints are detected and skipped
(with messages that list the steps), a failed write is one clear error that loses nothing, Orbax's
after-the-fact tracebacks stay off stderr, and the workdir lock is never left empty.

Expected values come from the test itself: the saved arrays are kept on the host, and the
fingerprint is recomputed by a plain-Python reference of the algorithm the module documents.
conftest.py gives 8 fake CPU devices.
"""

import asyncio
import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sami_jax import checkpoint as ckpt_lib
from tests.test_checkpoint import _assert_state_equal
from tests.test_config import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reading a damaged checkpoint makes Orbax abandon reads; under pytest their reports are collected
# as warnings (in a real run the module's filters drop them; see the subprocess tests).
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

_M32 = 0xFFFFFFFF


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("data",))


def _random_float32(shape, seed: int) -> np.ndarray:
  """Finite float32 values with (nearly) uniformly random bits: zstd cannot compress them, so
  Orbax stores their bytes verbatim and a test can find and flip one."""
  rng = np.random.default_rng(seed)
  bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
  exponent = rng.integers(1, 255, size=shape, dtype=np.uint32)  # 0 and 255: subnormal / Inf, NaN
  return ((bits & np.uint32(0x807FFFFF)) | (exponent << np.uint32(23))).view(np.float32)


def _host_state(k: int) -> dict:
  """The numpy values of the state saved at step k (the independent expectation)."""
  return {
      "ema_params": {"w": _random_float32((64, 64), 1000 + k)},
      "params": {"b": np.full((3,), k, np.float32), "w": _random_float32((64, 64), k)},
      "step": np.array(k, np.int32),
  }


def _device_state(host: dict, mesh: Mesh) -> dict:
  rows = NamedSharding(mesh, P("data"))
  return {
      "ema_params": {"w": jax.device_put(host["ema_params"]["w"], rows)},
      "params": {"b": jnp.asarray(host["params"]["b"]),
                 "w": jax.device_put(host["params"]["w"], rows)},
      "step": jnp.asarray(host["step"]),
  }


def _target(mesh: Mesh) -> dict:
  cols = NamedSharding(mesh, P(None, "data"))  # another layout than the saved one
  return {
      "ema_params": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=cols)},
      "params": {"b": jax.ShapeDtypeStruct((3,), jnp.float32),
                 "w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=cols)},
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }


def _save_steps(directory, steps) -> None:
  mesh = _mesh()
  ck = ckpt_lib.Checkpointer(directory, keep_last=10)
  for s in steps:
    ck.save(s, _device_state(_host_state(s), mesh), config={"s": s},
            data_position={"step": s, "seed": 0})
  ck.close()


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _step_dirs(directory) -> list[str]:
  """Everything directly in a checkpoint directory except Orbax's bookkeeping files."""
  return sorted(n for n in os.listdir(directory) if not n.startswith("."))


# ------------------------------------------------------------------------------ fingerprints


def _fmix32(h: int) -> int:
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & _M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & _M32
  return h ^ (h >> 16)


def _reference_digest(words: list[int]) -> str:
  """The fingerprint as the module docstring defines it, in plain Python integers."""
  total = sum(words) & _M32
  mixed = sum(_fmix32(w ^ _fmix32((i * 0x9E3779B9 + 1) & _M32)) for i, w in enumerate(words))
  return f"{total:08x}{mixed & _M32:08x}"


def _words(x: np.ndarray) -> list[int]:
  """The array's elements as unsigned 32-bit words, from its little-endian bytes."""
  raw = np.ascontiguousarray(x).tobytes()
  size = x.dtype.itemsize
  fmt = {1: "B", 2: "H", 4: "I"}[size]
  return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


@pytest.mark.parametrize("on_device", [True, False])
def test_fingerprint_is_the_documented_function_and_ignores_sharding(on_device):
  mesh = _mesh()
  w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) * np.float32(0.37) - 5
  host = {
      "bf16": np.array([1.5, -2.0, 0.0, 3.25, 7.0], jnp.bfloat16),
      "bool": np.array([True, False, True]),
      "i8": np.array([-3, 0, 5, 127, -128, 9, 1], np.int8),
      "scalar": np.float32(2.5),
      "w": w,
  }
  tree = {
      "bf16": jnp.asarray(host["bf16"]),
      "bool": jnp.asarray(host["bool"]),
      "i8": jnp.asarray(host["i8"]),
      "scalar": jnp.asarray(host["scalar"]),
      "w": jax.device_put(w, NamedSharding(mesh, P("data"))),
      "w_cols": jax.device_put(w, NamedSharding(mesh, P(None, "data"))),
      "w_host": w,
  }
  got = {f["path"]: f for f in ckpt_lib.fingerprints(tree, on_device=on_device)}
  expected_words = {
      "bf16": _words(host["bf16"]),
      "bool": [1, 0, 1],
      "i8": _words(host["i8"]),
      "scalar": _words(np.array([2.5], np.float32)),
      "w": _words(w), "w_cols": _words(w), "w_host": _words(w),
  }
  assert sorted(got) == sorted(expected_words)
  for name, words in expected_words.items():
    assert got[name]["digest"] == _reference_digest(words), name
    assert got[name]["finite"]
  assert got["w"]["shape"] == [8, 16] and got["w"]["dtype"] == "float32"
  # One flipped bit changes the fingerprint.
  flipped = w.copy()
  flipped.view(np.uint32)[3, 7] ^= np.uint32(1 << 12)
  assert ckpt_lib.fingerprints({"w": flipped}, on_device=on_device)[0]["digest"] != (
      got["w"]["digest"])


def test_nonfinite_leaves_names_each_array_once():
  tree = {"a": {"x": jnp.array([1.0, jnp.nan])}, "b": jnp.ones(3),
          "c": jnp.array([jnp.inf], jnp.bfloat16), "d": jnp.arange(4), "e": np.array([-np.inf])}
  assert ckpt_lib.nonfinite_leaves(tree) == ["a/x", "c", "e"]


# ------------------------------------------------------------------------------ 1. NaN state


def test_save_refuses_a_nonfinite_state_and_writes_nothing(tmp_path):
  _save_steps(tmp_path, [1])
  host = _host_state(2)
  host["params"]["w"][5, 9] = np.nan
  host["ema_params"]["w"][0, 0] = np.inf
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=10)
  with pytest.raises(ckpt_lib.NonFiniteStateError) as info:
    ck.save(2, _device_state(host, _mesh()), config={"s": 2}, data_position={"step": 2})
  error = info.value
  assert isinstance(error, FloatingPointError)
  assert error.step == 2 and error.directory == str(tmp_path)
  assert error.leaves == ["ema_params/w", "params/w"]  # tree order; "step" is an integer
  message = str(error)
  assert "\n" not in message
  for fragment in ("step 2", "NaN/Inf in 2 of 4 arrays (ema_params/w, params/w)",
                   "Nothing was written", f"{tmp_path} (steps [1]) are untouched"):
    assert fragment in message, (fragment, message)
  ck.wait()
  assert _step_dirs(tmp_path) == ["1"]  # not even a temporary directory
  state, config, _, step = ck.restore(_target(_mesh()))
  ck.close()
  assert step == 1 and config == {"s": 1}
  _assert_state_equal(state, _host_state(1))


# ------------------------------------------------------------------------------ 2. altered files


def _flip_one_bit_of(step_dir: str, values: np.ndarray, element: int, bit: int) -> None:
  """Flips one bit of one element of `values` where its bytes are stored in the checkpoint."""
  raw = values.tobytes()
  start = element * values.dtype.itemsize
  needle = raw[start - 32:start + 32]
  hits = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        offset = f.read().find(needle)
      if offset >= 0:
        hits.append(path)
        with open(path, "r+b") as f:
          f.seek(offset + 32)
          byte = f.read(1)[0]
          f.seek(offset + 32)
          f.write(bytes([byte ^ (1 << bit)]))
  assert len(hits) == 1, f"expected the array's bytes verbatim in one file, found {hits}"


def _flip_a_bit_of_params_w(tmp_path) -> str:
  _flip_one_bit_of(str(tmp_path / "3"), _host_state(3)["params"]["w"], element=1000, bit=3)
  return "params/w"


def _replace_state_with_step_1s(tmp_path) -> str:
  # A complete, readable state: only its contents are wrong (e.g. a copy gone astray).
  shutil.rmtree(tmp_path / "3" / "state")
  shutil.copytree(tmp_path / "1" / "state", tmp_path / "3" / "state")
  return "ema_params/w, params/b, params/w and 1 more"  # the 4th: "step" (3 vs 1)


def _raw_orbax_read(step_dir) -> dict:
  """What Orbax alone returns for a step's state (no verification): numpy arrays."""
  path = epath.Path(step_dir) / "state"
  metadata = ocp.PyTreeCheckpointHandler().metadata(path)
  tree = getattr(metadata, "tree", metadata)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree,
                                                                  restore_args=restore_args))


@pytest.mark.parametrize("damage", [_flip_a_bit_of_params_w, _replace_state_with_step_1s])
def test_altered_newest_checkpoint_is_skipped_and_named(tmp_path, caplog, damage):
  _save_steps(tmp_path, [1, 2, 3])
  changed = damage(tmp_path)
  # The damage is silent for Orbax: step 3 reads without error, and its values are not step 3's.
  raw = _raw_orbax_read(tmp_path / "3")
  expected_3 = _host_state(3)
  differing = int(np.sum(raw["params"]["w"] != expected_3["params"]["w"]))
  assert differing == (1 if damage is _flip_a_bit_of_params_w else 64 * 64)

  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=10)
  with caplog.at_level(logging.WARNING):
    state, config, data_position, step = ck.restore(_target(_mesh()))
  assert step == 2 and config == {"s": 2} and data_position == {"step": 2, "seed": 0}
  _assert_state_equal(state, _host_state(2))
  text = _warnings(caplog)
  n_changed = 1 if damage is _flip_a_bit_of_params_w else 4
  assert (f"Checkpoint for step 3 in {tmp_path} is damaged or unreadable (what was read differs "
          f"from what was saved in {n_changed} item(s) ({changed}): checksum mismatch); trying "
          "step 2 next.") in text, text
  assert (f"Restored step 2 from {tmp_path}; skipped damaged checkpoint(s) [3]. Intact: step 2 "
          "(verified against its checksums); older steps [1] were not checked.") in text, text
  # The parameters-only reader (used for a frozen denoiser) verifies the subtree it reads, the
  # EMA params: intact in step 3 when only params/w was hit.
  params = ckpt_lib.restore_params_only(tmp_path)
  ema_step = 3 if damage is _flip_a_bit_of_params_w else 2
  _assert_state_equal(params, _host_state(ema_step)["ema_params"])
  assert _step_dirs(tmp_path) == ["1", "2", "3"]  # nothing deleted

  # Training resumes from 2: saving step 3 again moves the altered one aside, not deleting it.
  ck.save(3, _device_state(_host_state(33), _mesh()), config={"s": 33}, data_position={})
  ck.wait()
  assert os.path.isdir(tmp_path / "damaged" / "3")
  state, _, _, step = ck.restore(_target(_mesh()))
  ck.close()
  assert step == 3
  _assert_state_equal(state, _host_state(33))


def test_altered_config_file_is_detected(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2])
  # Valid JSON, different contents: Orbax cannot tell.
  (tmp_path / "2" / "config" / "metadata").write_text(json.dumps({"s": 99}))
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=10)
  with caplog.at_level(logging.WARNING):
    assert ck.restore_config() == {"s": 1}
    _, config, _, step = ck.restore(_target(_mesh()))
  ck.close()
  assert step == 1 and config == {"s": 1}
  assert "the config file differs from what was saved: checksum mismatch" in _warnings(caplog)


def test_every_checkpoint_altered_lists_the_steps(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for s, other in ((1, 2), (2, 1)):  # swap the two states
    shutil.move(str(tmp_path / str(s) / "state"), str(tmp_path / f"state_{s}"))
  for s, other in ((1, 2), (2, 1)):
    shutil.move(str(tmp_path / f"state_{other}"), str(tmp_path / str(s) / "state"))
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=10)
  with pytest.raises(ckpt_lib.NoIntactCheckpointError) as info:
    ck.restore(_target(_mesh()))
  assert isinstance(info.value, RuntimeError)
  assert sorted(info.value.damaged) == [1, 2]
  message = str(info.value)
  assert f"No intact checkpoint in {tmp_path} (tried steps [2, 1], all damaged; intact: none)" in (
      message)
  assert "step 2: what was read differs" in message and "step 1: what was read differs" in message
  with pytest.raises(ckpt_lib.NoIntactCheckpointError, match="step 1 .* is damaged"):
    ck.restore(_target(_mesh()), step=1)
  ck.close()


def _write_old_format(directory, steps_and_states) -> None:
  """Checkpoints as the previous version wrote them: state, config, data_position; no record."""
  manager = ocp.CheckpointManager(directory, item_names=("state", "config", "data_position"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  for s, state in steps_and_states:
    manager.save(s, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"s": s}),
        data_position=ocp.args.JsonSave({"step": s, "seed": 0})))
  manager.wait_until_finished()
  manager.close()


def test_old_checkpoints_restore_with_one_warning_and_nan_ones_are_skipped(tmp_path, caplog):
  mesh = _mesh()
  poisoned = _host_state(2)
  poisoned["params"]["w"][:] = np.nan  # what lr=inf produced, saved by the previous version
  _write_old_format(tmp_path, [(1, _device_state(_host_state(1), mesh)),
                               (2, _device_state(poisoned, mesh))])
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=10)
  with caplog.at_level(logging.WARNING):
    state, config, _, step = ck.restore(_target(mesh))
  assert step == 1 and config == {"s": 1}
  _assert_state_equal(state, _host_state(1))
  text = _warnings(caplog)
  # One line for the step restored; none for the NaN one, which is reported as damaged instead.
  for s, times in ((1, 1), (2, 0)):
    assert text.count(f"Checkpoint for step {s} in {tmp_path} cannot be verified: it has no "
                      "checksums (it was written by an older version)") == times, text
  assert ("Checkpoint for step 2 in " f"{tmp_path} is damaged or unreadable (NaN/Inf in 1 of 4 "
          "arrays (params/w)); trying step 1 next.") in text, text
  assert ("skipped damaged checkpoint(s) [2]. Intact: step 1 (not verifiable: no checksums)."
          in text), text
  # Training resumes from 1; the poisoned step 2 goes aside when step 2 is saved again.
  ck.save(2, _device_state(_host_state(2), mesh), config={"s": 2}, data_position={})
  ck.wait()
  assert os.path.isdir(tmp_path / "damaged" / "2")
  _, config, _, step = ck.restore(_target(mesh))
  ck.close()
  assert step == 2 and config == {"s": 2}


# ------------------------------------------------------------------------------ 4. failed writes


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_during_a_save_is_one_error_and_loses_nothing(tmp_path, caplog, monkeypatch,
                                                                async_save):
  _save_steps(tmp_path, [1])
  ck = ckpt_lib.Checkpointer(tmp_path, keep_last=1, async_save=async_save)
  path_type = type(epath.Path(str(tmp_path)))
  real_write_text = path_type.write_text

  def write_text(self, *args, **kwargs):
    if f"{os.sep}2.orbax-checkpoint-tmp" in os.fspath(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return real_write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", write_text)
  with caplog.at_level(logging.INFO), pytest.raises(ckpt_lib.CheckpointSaveError) as info:
    ck.save(2, _device_state(_host_state(2), _mesh()), config={"s": 2}, data_position={})
    ck.wait()
  monkeypatch.undo()
  error = info.value
  assert error.errno == errno.ENOSPC and error.step == 2 and error.directory == str(tmp_path)
  message = str(error)
  assert "\n" not in message
  for fragment in (f"Could not write the checkpoint for step 2 to {tmp_path}: No space left on "
                   "device.", "Its partial files were removed.",
                   "The checkpoints already there (steps [1]) are untouched.",
                   f"Free space on the disk that holds {tmp_path}", "another disk"):
    assert fragment in message, (fragment, message)
  # Orbax's own tracebacks of that failure were not logged (it raises the same error).
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
      r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
  # With keep_last=1, step 1 must survive the failed save of step 2.
  assert _step_dirs(tmp_path) == ["1"]
  state, _, _, step = ck.restore(_target(_mesh()))
  ck.close()
  assert step == 1
  _assert_state_equal(state, _host_state(1))


_WRITE_LIMIT_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np
    import jax.numpy as jnp
    from sami_jax import checkpoint as ckpt_lib
    directory = sys.argv[1]
    state = lambda k: {"w": jnp.asarray(np.random.default_rng(k).standard_normal((256, 256),
                                                                               np.float32))}
    ck = ckpt_lib.Checkpointer(directory, keep_last=1)
    ck.save(1, state(1), config={}, data_position={})
    ck.wait()
    # From here no file may grow past 4 kB: every array write of the next save fails in
    # TensorStore (EFBIG), as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
      ck.save(2, state(2), config={}, data_position={})
      ck.wait()
      print("NO ERROR")
    except ckpt_lib.CheckpointSaveError as e:
      print(f"SAVE_ERROR step={e.step} errno={e.errno} {e}")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print("STEPS", ck.all_steps(), sorted(os.listdir(directory)))
    restored, _, _, step = ck.restore({"w": jnp.zeros((256, 256), jnp.float32)})
    assert np.array_equal(np.asarray(restored["w"]), np.asarray(state(1)["w"]))
    print("RESTORED", step)
    ck.close()
""")


def test_real_write_failure_in_a_fresh_process_is_quiet(tmp_path):
  """The array writes fail inside TensorStore (C++), as on a full disk; stderr stays short."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", _WRITE_LIMIT_SCRIPT, str(tmp_path / "ck")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  error = [l for l in lines if l.startswith("SAVE_ERROR")]
  assert error and error[0].startswith(f"SAVE_ERROR step=2 errno={errno.EFBIG} "), out.stdout
  assert f"to {tmp_path / 'ck'}: File too large." in error[0]
  assert "The checkpoints already there (steps [1]) are untouched." in error[0]
  assert "STEPS [1] ['1']" in lines, out.stdout
  assert "RESTORED 1" in lines
  # Without the filters Orbax logs the failure with tracebacks from several threads, and asyncio
  # reports every abandoned write ("Task exception was never retrieved"): hundreds of lines.
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert len(out.stderr.splitlines()) <= 5, out.stderr[-3000:]


def test_unwritable_checkpoint_directory_names_the_fix(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ckpt_lib.CheckpointSaveError, match="Cannot create the checkpoint directory"):
    ckpt_lib.Checkpointer(blocker / "checkpoints", keep_last=1)


# ------------------------------------------------------------------------------ 5. log floods


def _fake_orbax_code(tmp_path):
  """A function whose code lives in a file under an `orbax` directory (as Orbax's does)."""
  namespace = {}
  source = "def fail():\n  raise ValueError('RESOURCE_EXHAUSTED: Error writing x')\n"
  code = compile(source, str(tmp_path / "orbax" / "serialization.py"), "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace["fail"]


def test_noise_filters_drop_exactly_the_orbax_aftermath(tmp_path):
  noise = ckpt_lib._OrbaxNoise()  # pylint: disable=protected-access
  forwarded = []
  noise._previous_hook = forwarded.append  # pylint: disable=protected-access

  # TensorStore's completion callback into the event loop Orbax already closed.
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    closed = e
  event_loop_closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed,
                                            exc_traceback=closed.__traceback__, err_msg=None,
                                            object=None)
  # An abandoned Orbax coroutine raising while it is garbage-collected.
  from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top
  inner = asyncio.sleep(0)
  coroutine = asyncio_utils.cancellable(inner)
  abandoned = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("read failed"),
                                    exc_traceback=None, err_msg=None, object=coroutine)
  # Anything else is someone else's problem and must still be shown.
  other_closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(
      "Event loop is closed"), exc_traceback=None, err_msg=None, object=None)
  user_error = types.SimpleNamespace(exc_type=KeyError, exc_value=KeyError("x"),
                                     exc_traceback=None, err_msg=None, object=object())
  for args in (event_loop_closed, abandoned, other_closed, user_error):
    noise.unraisable_hook(args)
  assert forwarded == [other_closed, user_error]
  coroutine.close()
  inner.close()

  def record(name, level, msg, pathname="/x/y.py", exc_info=None):
    return logging.LogRecord(name, level, pathname, 1, msg, None, exc_info)

  try:
    _fake_orbax_code(tmp_path)()
  except ValueError as e:
    orbax_exc_info = (ValueError, e, e.__traceback__)
  try:
    raise ValueError("mine")
  except ValueError as e:
    user_exc_info = (ValueError, e, e.__traceback__)
  directory = str(tmp_path / "ck")
  noise._directories.add(directory)  # pylint: disable=protected-access
  orbax_file = str(tmp_path / "orbax" / "future.py")
  dropped = [
      record("asyncio", logging.ERROR, "Task exception was never retrieved",
             exc_info=orbax_exc_info),
      record("asyncio", logging.ERROR, "Future exception was never retrieved\nfuture: "
             f"<Future finished exception=ValueError('writing \"{directory}/2.orbax-checkpoint-"
             "tmp/state\"')>"),
      record("absl", logging.ERROR, "[process=%d][thread=%s][operation_id=%s] "
             "_SignalingThread.run() raised an exception: %s", pathname=orbax_file,
             exc_info=orbax_exc_info),
  ]
  kept = [
      record("asyncio", logging.ERROR, "Task exception was never retrieved",
             exc_info=user_exc_info),
      record("absl", logging.ERROR, "Failed to remove checkpoint (%s)", pathname=orbax_file),
      record("absl", logging.ERROR, "_SignalingThread.run() raised an exception",
             pathname="/x/mine.py"),
      record("absl", logging.WARNING, "Waiting for previous save", pathname=orbax_file),
  ]
  assert [noise.filter(r) for r in dropped] == [False] * len(dropped)
  assert [noise.filter(r) for r in kept] == [True] * len(kept)


# ------------------------------------------------------------------------------ 4. the lock


@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"\x00\x00\x00"])
def test_empty_or_corrupt_old_lock_is_taken_over(tmp_path, caplog, content):
  lock_path = tmp_path / ".lock"
  lock_path.write_bytes(content)
  old = time.time() - 60
  os.utime(lock_path, (old, old))
  with caplog.at_level(logging.WARNING):
    with ckpt_lib.WorkdirLock(tmp_path):
      holder = json.loads(lock_path.read_text())
      assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  assert f"Taking over the lock {lock_path}: it is empty or corrupt" in _warnings(caplog)
  assert not lock_path.exists()


def test_young_empty_lock_is_not_stolen_from_a_run_writing_it(tmp_path):
  """A lock created empty a moment ago may be a run (of an older version) about to write it."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_path = tmp_path / ".lock"
    lock_path.write_bytes(b"")

    def fill_in():
      time.sleep(0.3)
      lock_path.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                       "time": time.time()}))

    writer = threading.Thread(target=fill_in)
    writer.start()
    with pytest.raises(RuntimeError, match=f"Another run \\(pid {holder.pid} on host"):
      ckpt_lib.WorkdirLock(tmp_path).acquire()
    writer.join()
    assert json.loads(lock_path.read_text())["pid"] == holder.pid
  finally:
    holder.kill()
    holder.wait()


_LOCK_ON_FULL_DISK = textwrap.dedent("""
    import os, resource, signal, sys
    from sami_jax import checkpoint as ckpt_lib
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
      ckpt_lib.WorkdirLock(sys.argv[1]).acquire()
      print("ACQUIRED")
    except RuntimeError as e:
      print("LOCK_ERROR", e)
""")


def test_lock_that_cannot_be_written_leaves_nothing_behind(tmp_path):
  """No byte can be written (as on a full disk): a clear error, and no empty .lock left over."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", _LOCK_ON_FULL_DISK, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith(f"LOCK_ERROR Cannot create the lock file {tmp_path / '.lock'}: "
                               "File too large."), out.stdout + out.stderr[-2000:]
  assert "nothing was left behind" in out.stdout
  assert os.listdir(tmp_path) == []
  with ckpt_lib.WorkdirLock(tmp_path):  # and the next run gets the lock
    pass
