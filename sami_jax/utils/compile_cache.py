"""JAX's persistent compilation cache, shared by every run, resume, evaluation and the API.

A second run of the same model (a resume, `--mode=eval`, `sami_jax.load`) then loads its compiled
programs from disk instead of compiling them again: the first train step starts seconds after the
imports instead of after the whole compilation.

Where: $JAX_COMPILATION_CACHE_DIR if you set it (JAX's own variable), else $SAMI_JAX_CACHE_DIR,
else `sami_jax/jax_cache` under the user's cache directory ($XDG_CACHE_HOME or ~/.cache).
SAMI_JAX_CACHE_DIR=off disables it. The cache is safe to delete at any time.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from absl import logging

# Programs that compile faster than this are not worth a disk round trip.
MIN_COMPILE_TIME_S = 0.5


def default_dir() -> str | None:
  """The cache directory this process would use (None: disabled)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  chosen = os.environ.get("SAMI_JAX_CACHE_DIR", "")
  if chosen.lower() in ("off", "none", "0", "false"):
    return None
  if chosen:
    return os.path.expanduser(chosen)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sami_jax", "jax_cache")


def enable() -> str | None:
  """Turns the cache on (unless disabled); returns its directory. Idempotent."""
  import jax  # pylint: disable=g-import-not-at-top
  path = default_dir()
  if path is None:
    return None
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return path


# ------------------------------------------------------------------ whole executables on disk
#
# JAX's cache above saves the compile, but a second run still traces the train step (the guided
# double backward through Flax: seconds) and lowers it to MLIR (to compute the cache key) before
# it can look the executable up. For the few programs a run is waiting on (the train step), the
# executable itself is saved next to that cache, under a key computed without tracing: the
# caller's description of the program (e.g. its config), the shapes, dtypes and shardings of its
# arguments, the devices, XLA_FLAGS, the jax/jaxlib versions and a digest of this package's
# source. A changed model, config, jax, flag or line of sami_jax gives a new key; an entry that
# cannot be read or loaded is ignored (and the program compiled as usual).

_EXECUTABLES = "executables"
# Executables kept per cache directory (least recently used removed first).
MAX_EXECUTABLES = 16


# JAX settings that change what a function traces to.
_TRACE_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
                "jax_default_prng_impl", "jax_numpy_rank_promotion", "jax_dynamic_shapes")


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
  """sha256 over every .py file of the sami_jax package (path and bytes)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


def _arg_signature(args) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(args)
  parts = [str(treedef)]
  for x in leaves:
    sharding = getattr(x, "sharding", None)
    parts.append(f"{tuple(x.shape)}|{x.dtype}|{sharding!r}")
  return "\n".join(parts)


def executable_key(name: str, description: str, args, devices) -> str:
  """The file name under which the executable of `name` for these arguments and devices (in mesh
  order) is kept."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  all_devices = jax.devices()
  parts = [name, description, _arg_signature(args), jax.__version__,
           getattr(jaxlib, "__version__", "?"), os.environ.get("XLA_FLAGS", ""),
           f"{jax.process_count()}|{jax.default_backend()}|"
           f"{[(d.id, d.device_kind) for d in all_devices]}", f"{[d.id for d in devices]}",
           _source_digest(),
           repr([getattr(jax.config, f, None) for f in _TRACE_FLAGS])]
  digest = hashlib.sha256("\n\n".join(parts).encode()).hexdigest()[:32]
  return f"{name}-{digest}"


def _executables_dir() -> str | None:
  path = default_dir()
  return None if path is None else os.path.join(path, _EXECUTABLES)


# A saved executable holds the types (avals) of its arguments and results, pickled; the arrays a
# loaded executable returns carry those unpickled types. JAX compares some parts of a type by
# identity: jax 0.12's `AutoLayout` (every array's default layout) is a module-level singleton
# without a pickle reduction, so it came back as a second instance, and every later trace over a
# loaded program's results (e.g. the train step's gradient over a loaded init's params) failed
# with "Expected cotangent type float32[1] but got float32[1]". Pickled by reference, it comes
# back as itself. A jax whose types still do not come back equal from pickle gets no executables
# saved or loaded (JAX's own compilation cache still serves the compile): see
# _types_survive_pickling.


def _pickle_singletons_by_reference() -> None:
  import copyreg  # pylint: disable=g-import-not-at-top
  try:
    from jax._src import layout  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  cls = getattr(layout, "AutoLayoutSingleton", None)
  if cls is not None and isinstance(getattr(layout, "AutoLayout", None), cls) and (
      cls not in copyreg.dispatch_table):
    # A string from a reducer means "the module-level object of that name".
    copyreg.pickle(cls, lambda obj: "AutoLayout")


@functools.lru_cache(maxsize=1)
def _types_survive_pickling() -> bool:
  """Whether an array's type comes back from pickle equal to itself (as the types held in a saved
  executable must, for a loaded executable to behave as a compiled one)."""
  import pickle  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  _pickle_singletons_by_reference()
  try:
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    x = jax.device_put(np.zeros((2,), np.float32), NamedSharding(mesh, PartitionSpec()))
    aval = jax.typeof(x) if hasattr(jax, "typeof") else x.aval
    same = pickle.loads(pickle.dumps(aval)) == aval
  except Exception as e:  # pylint: disable=broad-except
    logging.info("Could not check how array types pickle (%s: %s).", type(e).__name__, e)
    same = False
  if not same:
    logging.info("Saved executables are not used with jax %s (its array types do not survive "
                 "pickling); programs are compiled, with JAX's compilation cache.",
                 jax.__version__)
  return same


def _load(path: str, devices) -> Any | None:
  import pickle  # pylint: disable=g-import-not-at-top
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      blob, in_tree, out_tree = pickle.load(f)
    compiled = serialize_executable.deserialize_and_load(
        blob, in_tree, out_tree, execution_devices=devices)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Ignoring the saved executable %s (%s: %s); compiling instead.", path,
                    type(e).__name__, e)
    return None
  try:
    os.utime(path)  # most recently used
  except OSError:
    pass
  return compiled


def _accepts(compiled, args: tuple) -> bool:
  """Whether `compiled` takes arguments of exactly these types (shapes, dtypes, shardings)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten((tuple(args), {}))
  if compiled.in_tree != treedef:
    return False
  avals = jax.tree.leaves(compiled.in_avals)
  shardings = jax.tree.leaves(compiled.input_shardings, is_leaf=lambda x: x is None)
  if not len(avals) == len(shardings) == len(leaves):
    return False
  for x, aval, sharding in zip(leaves, avals, shardings):
    if tuple(x.shape) != tuple(aval.shape) or x.dtype != aval.dtype:
      return False
    if sharding is not None and not sharding.is_equivalent_to(x.sharding, len(x.shape)):
      return False
  return True


def _save(path: str, compiled) -> None:
  import pickle  # pylint: disable=g-import-not-at-top
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  try:
    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        pickle.dump((blob, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
      os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves no partial file behind
      try:
        os.remove(tmp)
      except OSError:
        pass
      raise
  except Exception as e:  # pylint: disable=broad-except
    # A cache that cannot be written (read-only home, full disk, a backend that cannot serialise)
    # costs the next run its start-up time, nothing else.
    logging.info("Could not save the executable %s (%s: %s).", path, type(e).__name__, e)
    return
  _evict(os.path.dirname(path))


def _evict(directory: str) -> None:
  try:
    entries = sorted((os.path.getmtime(p), p) for p in
                     (os.path.join(directory, n) for n in os.listdir(directory))
                     if p.endswith(".bin"))
    for _, p in entries[:-MAX_EXECUTABLES]:
      os.remove(p)
  except OSError:
    pass


# XLA:CPU (jax 0.10 and 0.12) cannot re-serialise an executable that JAX loaded from its own
# cache: the copy saved from it fails at run time ("Function ... not found"). So an executable is
# saved here only when it was really compiled; one that came from JAX's cache (the same program
# compiled by an earlier run under another key, e.g. another log_every) is used but not saved.
_JAX_CACHE_HITS = [0]
_LISTENING = []


def _count_jax_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    _JAX_CACHE_HITS[0] += 1


# The runtime executables of this process that came from JAX's cache (by id; kept alive here so
# an id is never reused): JAX's in-memory cache hands the same one out again for the same program.
_FROM_JAX_CACHE: dict[int, Any] = {}


def _compile(lowered) -> tuple[Any, bool]:
  """(the executable, whether it was compiled here rather than loaded from JAX's cache)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not _LISTENING:
    jax.monitoring.register_event_listener(_count_jax_cache_hits)
    _LISTENING.append(True)
  hits = _JAX_CACHE_HITS[0]
  compiled = lowered.compile()
  runtime = compiled.runtime_executable()
  if _JAX_CACHE_HITS[0] != hits:
    _FROM_JAX_CACHE[id(runtime)] = runtime
  return compiled, id(runtime) not in _FROM_JAX_CACHE


# Executables this process compiled or loaded, by key: a repeated run in the same process (a
# test, `sami_jax.compare`) neither traces nor reads the file again.
_IN_MEMORY: dict[str, Any] = {}


class Pending:
  """A program's executable, being read from disk in a background thread (XLA releases the GIL
  while it loads, so the caller's own start-up work runs alongside): `begin(...).result(...)`.

  The thread must not outlive the caller's use of it: an interpreter that exits while XLA is still
  deserialising into a backend that JAX's exit handler is tearing down crashes (a segmentation
  fault after the run's own error). So `result` and `close` join it, every exit path of a caller
  calls one of them, and the thread is not a daemon: an exit that misses both still waits for the
  load (seconds at most) before JAX's exit handlers run.
  """

  def __init__(self, name: str, key: str | None, devices):
    self.name, self.key, self.devices = name, key, devices
    self._loaded = None
    self._thread = None
    path = self.path
    if key is not None and key not in _IN_MEMORY and path and os.path.exists(path):
      self._thread = threading.Thread(target=self._load, args=(path,), daemon=False,
                                      name=f"load {name}")
      self._thread.start()

  def close(self) -> None:
    """Waits for the load, if one is running, and drops what it loaded (for a caller that stops
    before it needs the executable). Idempotent; a `result` after it compiles."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    self._loaded = None
    self.key = None

  @property
  def path(self) -> str | None:
    directory = _executables_dir()
    return None if directory is None or self.key is None else os.path.join(
        directory, self.key + ".bin")

  def _load(self, path: str) -> None:
    self._loaded = _load(path, self.devices)

  def result(self, make_jitted, args: tuple):
    """The executable, loaded, or compiled (and saved) if there was none or it does not take
    `args`' types.

    Args:
      make_jitted: returns the `jax.jit`-wrapped function (with its shardings and donation);
        only called when the executable has to be compiled.
      args: its arguments, or `jax.ShapeDtypeStruct`s with their shapes, dtypes and shardings.
    Returns:
      A `jax.stages.Compiled`, called like the jitted function.
    """
    if self.key is None:  # disabled, or a multi-process run: compile as usual
      return make_jitted().lower(*args).compile()
    loaded = None
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      loaded, self._loaded = self._loaded, None
    compiled = _IN_MEMORY.get(self.key)
    if compiled is None and loaded is not None:
      compiled = loaded
      logging.info("Loaded the compiled %s from %s.", self.name, self.path)
    if compiled is not None and not _accepts(compiled, args):
      logging.warning("The saved %s takes other argument types; compiling it again.", self.name)
      compiled = None
    if compiled is None:
      compiled, fresh = _compile(make_jitted().lower(*args))
      if fresh:
        _save(self.path, compiled)
    _IN_MEMORY[self.key] = compiled
    return compiled


def begin(name: str, description: str, key_args, devices) -> Pending:
  """Starts loading the executable saved for this program, if there is one.

  Args:
    name: a short name for the file (e.g. "train_step").
    description: everything, besides the types of `key_args`, that the traced program depends on
      (e.g. the config as JSON).
    key_args: arguments (or `jax.ShapeDtypeStruct`s) whose types go into the key; the types of
      the arguments `result` gets are checked against the loaded executable in any case.
    devices: the devices the program runs on, in the order of its mesh.
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = list(devices)
  key = None
  if (_executables_dir() is not None and jax.process_count() == 1
      and _types_survive_pickling()):
    key = executable_key(name, description, key_args, devices)
  return Pending(name, key, devices)


def load_or_compile(make_jitted, args: tuple, *, name: str, description: str, devices):
  """`make_jitted().lower(*args).compile()`, or the same executable loaded from disk: `begin`
  and `Pending.result` in one call. Multi-process runs, and a disabled cache, compile as usual
  (nothing is read or written)."""
  return begin(name, description, args, devices).result(make_jitted, args)
