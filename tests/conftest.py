"""Test setup, done before JAX is imported:

- 8 fake CPU devices, so multi-device code is tested on any machine (single-device comparisons
  pick one device explicitly);
- one persistent XLA compilation cache for the whole test session, shared with every subprocess
  the tests start (`python -m sami_jax.main ...` inherits the environment): a program compiled
  once, in-process or in a subprocess, is loaded from disk by every later compile of the same
  program. A fresh directory per session (so timings do not depend on earlier sessions) unless
  SAMI_JAX_TEST_CACHE names one to reuse;
- programs compiled without LLVM's optimisations (XLA_FLAGS, inherited by subprocesses too): the
  tests check what is computed, not how fast, and three quarters of the suite's time is XLA
  compiling (measured: tests/test_kinds.py + tests/test_models.py 406 -> 280 CPU-seconds).
  SAMI_JAX_TEST_OPTIMIZE=1 runs the suite on the optimised programs users get.
"""

import gc
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("SAMI_JAX_TEST_OPTIMIZE", "").lower() not in ("1", "true", "yes"):
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  if os.environ.get("SAMI_JAX_TEST_CACHE"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SAMI_JAX_TEST_CACHE"]
  else:
    _OWN_CACHE = tempfile.mkdtemp(prefix="sami_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# Test files by their total time in this suite (`--durations`, 2-core CPU), longest first. With a
# worker per core and tests grouped by file, a long file that starts last keeps one core busy
# alone at the end; started first, the short files fill in around it. Files not listed keep their
# order after these.
_LONGEST_FIRST = ("test_kinds.py", "test_reliability.py", "test_models.py", "test_train.py",
                  "test_api.py", "test_report.py", "test_scale.py", "test_benchmarks.py",
                  "test_objective.py", "test_samplers.py", "test_latent_prior.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


def pytest_collection_finish(session):
  """Everything the tests import (JAX, Flax, TFDS, Orbax, sami_jax: ~240k objects) is imported by
  now and lives for the whole session: freezing it keeps Python's full garbage collections, which
  would otherwise walk it again and again, to the objects the tests create."""
  del session
  gc.collect()
  gc.freeze()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
