"""Executables saved on disk and loaded by the next process (utils/compile_cache.load_or_compile):
loaded without tracing, identical results, a new key for anything the program depends on, and a
damaged file costs a compile, nothing else."""

import logging as py_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sami_jax.utils import compile_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  return tmp_path / "cache" / "executables"


def _fresh_scale() -> float:
  """A constant no earlier compile used: the program is then not in JAX's persistent cache (which
  this test session shares between tests), so it is really compiled, and saved."""
  return 0.5 + (int.from_bytes(os.urandom(4), "little") % 100000) / 1e6


def _program(mesh, scale=0.5):
  """A sharded, donating program: (state, batch) -> (scale * state + sum(batch) rows, mean)."""
  shard = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  made = []  # one entry per jitted function built (only when a compile is needed)

  def step(state, batch):
    return {"w": state["w"] * scale + batch.sum(axis=0)}, jnp.mean(batch)

  def make():
    made.append(1)
    return jax.jit(step, in_shardings=({"w": repl}, shard), out_shardings=({"w": repl}, repl),
                   donate_argnums=(0,))

  args = ({"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=repl)},
          jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=shard))
  return make, args, made


def _mesh(devices):
  return Mesh(np.array(devices), ("data",))


def _inputs(mesh):
  repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  batch = np.arange(24, dtype=np.float32).reshape(8, 3) / 7.0
  return ({"w": jax.device_put(np.array([1.0, -2.0, 3.0], np.float32), repl)},
          jax.device_put(batch, shard), batch)


def test_a_saved_executable_is_loaded_without_tracing_and_computes_the_same(cache_dir):
  mesh = _mesh(jax.devices()[:4])
  scale = _fresh_scale()
  make, args, made = _program(mesh, scale)
  first = compile_cache.load_or_compile(make, args, name="prog", description="d",
                                        devices=mesh.devices.flat)
  assert len(made) == 1 and len(list(cache_dir.glob("prog-*.bin"))) == 1
  compile_cache._IN_MEMORY.clear()  # as a new process would
  second = compile_cache.load_or_compile(make, args, name="prog", description="d",
                                         devices=mesh.devices.flat)
  assert len(made) == 1  # loaded: nothing built, traced or compiled
  for compiled in (first, second):
    state, batch, host = _inputs(mesh)
    new_state, mean = compiled(state, batch)
    # Expected values computed here, in numpy.
    np.testing.assert_allclose(np.asarray(new_state["w"]),
                               scale * np.array([1.0, -2.0, 3.0]) + host.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(float(mean), host.mean(), rtol=1e-6)
    assert state["w"].is_deleted()  # the loaded executable still donates its state


def test_the_key_changes_with_everything_the_program_depends_on(monkeypatch):
  mesh = _mesh(jax.devices()[:4])
  _, args, _ = _program(mesh)
  devices = list(mesh.devices.flat)
  key = lambda **kw: compile_cache.executable_key(
      kw.get("name", "prog"), kw.get("description", "d"), kw.get("args", args),
      kw.get("devices", devices))
  base = key()
  assert key() == base
  wider = (args[0], jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=args[1].sharding))
  other_mesh = _mesh(jax.devices()[4:8])
  _, args_other_mesh, _ = _program(other_mesh)
  changed = {
      "description": key(description="e"),
      "shape": key(args=wider),
      "dtype": key(args=(args[0], jax.ShapeDtypeStruct((8, 3), jnp.bfloat16,
                                                       sharding=args[1].sharding))),
      "device order": key(devices=devices[::-1]),
      "other devices": key(args=args_other_mesh, devices=list(other_mesh.devices.flat)),
  }
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  changed["XLA_FLAGS"] = key()
  monkeypatch.undo()
  monkeypatch.setattr(compile_cache, "_source_digest", lambda: "edited source")
  changed["source"] = key()
  for what, k in changed.items():
    assert k != base, what
  assert len(set(changed.values())) == len(changed)


def test_a_damaged_file_is_ignored_with_one_warning_and_compiled(cache_dir, caplog):
  mesh = _mesh(jax.devices()[:2])
  make, args, made = _program(mesh, _fresh_scale())
  compile_cache.load_or_compile(make, args, name="prog", description="d",
                                devices=mesh.devices.flat)
  (path,) = cache_dir.glob("prog-*.bin")
  path.write_bytes(b"not an executable")
  compile_cache._IN_MEMORY.clear()
  with caplog.at_level(py_logging.WARNING):
    compiled = compile_cache.load_or_compile(make, args, name="prog", description="d",
                                             devices=mesh.devices.flat)
  assert len(made) == 2
  assert sum("Ignoring the saved executable" in r.getMessage() for r in caplog.records) == 1
  state, batch, host = _inputs(mesh)
  np.testing.assert_allclose(float(compiled(state, batch)[1]), host.mean(), rtol=1e-6)
  assert path.read_bytes() != b"not an executable"  # rewritten by the compile


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("SAMI_JAX_CACHE_DIR", "off")
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setattr(compile_cache, "_IN_MEMORY", {})
  mesh = _mesh(jax.devices()[:1])
  make, args, made = _program(mesh)
  compile_cache.load_or_compile(make, args, name="prog", description="d",
                                devices=mesh.devices.flat)
  compile_cache.load_or_compile(make, args, name="prog", description="d",
                                devices=mesh.devices.flat)
  assert len(made) == 2 and not list(tmp_path.rglob("*.bin"))


def test_a_program_that_came_from_jax_cache_is_used_but_not_saved(cache_dir):
  """XLA:CPU cannot re-save an executable JAX loaded from its persistent cache (on in this test
  session): such a program is used as it is and not saved, so nothing broken is ever loaded."""
  mesh = _mesh(jax.devices()[:2])
  make, args, _ = _program(mesh)
  state, batch, host = _inputs(mesh)
  make()(state, batch)  # compiled through JAX's cache: it is written there
  jax.clear_caches()  # forget the in-memory executable: the next compile reads JAX's cache
  for _ in range(2):  # as two later processes would
    compile_cache._IN_MEMORY.clear()
    compiled = compile_cache.load_or_compile(make, args, name="prog", description="d",
                                             devices=mesh.devices.flat)
    state, batch, host = _inputs(mesh)
    new_state, mean = compiled(state, batch)
    np.testing.assert_allclose(np.asarray(new_state["w"]),
                               np.array([0.5, -1.0, 1.5]) + host.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(float(mean), host.mean(), rtol=1e-6)
  assert not list(cache_dir.glob("prog-*.bin"))


def test_a_loaded_executable_for_other_argument_types_is_compiled_again(cache_dir, caplog):
  """The key covers only the types given to `begin` (here the state's); the arguments the
  program finally gets are checked against the loaded executable, and a mismatch compiles."""
  mesh = _mesh(jax.devices()[:2])
  make, args, made = _program(mesh, _fresh_scale())
  state_only = (args[0],)
  compile_cache.begin("prog", "d", state_only, mesh.devices.flat).result(make, args)
  compile_cache._IN_MEMORY.clear()
  fewer_rows = (args[0], jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=args[1].sharding))
  with caplog.at_level(py_logging.WARNING):
    compiled = compile_cache.begin("prog", "d", state_only, mesh.devices.flat).result(
        make, fewer_rows)
  assert len(made) == 2
  assert any("takes other argument types" in r.getMessage() for r in caplog.records)
  repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  host = np.ones((4, 3), np.float32)
  new_state, mean = compiled({"w": jax.device_put(np.zeros(3, np.float32), repl)},
                             jax.device_put(host, shard))
  np.testing.assert_allclose(np.asarray(new_state["w"]), np.full(3, 4.0))
  assert float(mean) == 1.0


def test_a_loaded_programs_results_have_a_fresh_compiles_types_and_can_be_differentiated(
    cache_dir):
  """The arrays a loaded executable returns carry the types it saved: they must equal a fresh
  compile's, or tracing over them fails (jax 0.12.1: "Expected cotangent type float32[3,3,1,8]
  but got float32[3,3,1,8]", the layout unpickled as a second `AutoLayout`)."""
  mesh = _mesh(jax.devices()[:1])
  repl = NamedSharding(mesh, P())
  scale = _fresh_scale()

  def make():
    return jax.jit(lambda r: {"w": jax.random.normal(r, (3, 3, 1, 8)) * scale,
                              "b": jnp.zeros((8,))}, out_shardings=repl)
  rng = jax.random.PRNGKey(0)
  fresh = compile_cache.load_or_compile(make, (rng,), name="init", description="d",
                                        devices=mesh.devices.flat)(rng)
  compile_cache._IN_MEMORY.clear()  # as a new process would
  loaded = compile_cache.load_or_compile(make, (rng,), name="init", description="d",
                                         devices=mesh.devices.flat)(rng)
  assert len(list(cache_dir.glob("init-*.bin"))) == 1
  for k in fresh:
    assert jax.typeof(loaded[k]) == jax.typeof(fresh[k]), k
  x = jnp.linspace(-1.0, 1.0, 50).reshape(2, 5, 5, 1)

  def loss(p):
    y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum((y + p["b"]) ** 2)
  grads = [jax.jit(jax.grad(loss))(p) for p in (fresh, loaded)]
  for k in fresh:
    np.testing.assert_array_equal(np.asarray(grads[0][k]), np.asarray(grads[1][k]))


def test_a_load_in_the_background_is_not_a_daemon_and_close_waits_for_it(cache_dir,
                                                                         monkeypatch):
  """An interpreter that exits while XLA deserialises can crash: the loading thread is joined by
  `close` (every exit path of a run calls it) and, as a non-daemon thread, by the interpreter's
  own shutdown before JAX's exit handlers run."""
  import threading  # pylint: disable=g-import-not-at-top
  mesh = _mesh(jax.devices()[:2])
  make, args, _ = _program(mesh, _fresh_scale())
  compile_cache.load_or_compile(make, args, name="prog", description="d",
                                devices=mesh.devices.flat)
  compile_cache._IN_MEMORY.clear()
  release, loaded = threading.Event(), []
  real_load = compile_cache._load

  def slow_load(path, devices):
    release.wait(10)
    loaded.append(real_load(path, devices))
    return loaded[-1]
  monkeypatch.setattr(compile_cache, "_load", slow_load)
  pending = compile_cache.begin("prog", "d", args, mesh.devices.flat)
  thread = pending._thread
  assert thread is not None and thread.is_alive() and not thread.daemon
  threading.Timer(0.2, release.set).start()
  pending.close()
  assert not thread.is_alive() and loaded and loaded[0] is not None
  pending.close()  # idempotent
