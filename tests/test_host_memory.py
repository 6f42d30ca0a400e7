"""glibc malloc settings applied by `import sami_jax` (sami_jax.utils.host_memory)."""

import json
import os
import subprocess
import sys

import pytest

from sami_jax.utils import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAP_MAX, TRIM = -4, -1  # glibc's malloc.h: M_MMAP_MAX, M_TRIM_THRESHOLD
TRIM_AT = 64 * 2**20  # the documented trim threshold: 64 MB


def test_settings_asked_for_by_default_none_when_opted_out():
  assert sorted(host_memory.settings_to_apply({})) == sorted([(MMAP_MAX, 0), (TRIM, TRIM_AT)])
  for off in ("off", "0", "False", " no "):
    assert host_memory.settings_to_apply({"SAMI_JAX_HOST_MALLOC": off}) == []
  assert not host_memory.apply_process_settings({"SAMI_JAX_HOST_MALLOC": "off"})


def test_the_users_own_malloc_settings_win():
  assert host_memory.settings_to_apply({"MALLOC_MMAP_MAX_": "65536"}) == [(TRIM, TRIM_AT)]
  assert host_memory.settings_to_apply({"MALLOC_TRIM_THRESHOLD_": "0"}) == [(MMAP_MAX, 0)]
  assert host_memory.settings_to_apply(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=4096"}) == [
          (MMAP_MAX, 0)]
  assert host_memory.settings_to_apply({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}) == [
      (MMAP_MAX, 0), (TRIM, TRIM_AT)]


# A fresh process imports sami_jax, then mallocs 48 MB and 192 MB on the main thread and 24 MB on
# another thread (all above glibc's default mmap threshold), frees each, and reports glibc's counts:
# the bytes in blocks mapped on their own that each allocation added, and the arena's size after
# the free.
_PROBE = r"""
import ctypes, json, threading
import sami_jax
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
out = {}
def probe(tag, nbytes):
  before = libc.mallinfo2().hblkhd
  p = libc.malloc(nbytes)
  ctypes.memset(p, 1, nbytes)
  out[tag + "_mapped_while_held"] = libc.mallinfo2().hblkhd - before
  libc.free(p)
  out[tag + "_kept_after_free"] = libc.mallinfo2().arena
probe("main48", 48 << 20)
probe("main192", 192 << 20)
t = threading.Thread(target=probe, args=("thread", 24 << 20)); t.start(); t.join()
print(json.dumps(out))
"""


def _probe(env_extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_")
         and k not in ("GLIBC_TUNABLES", "SAMI_JAX_HOST_MALLOC", "LD_PRELOAD")}
  env.update(env_extra)
  done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=60, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


_LIBC = host_memory._glibc()  # pylint: disable=protected-access


@pytest.mark.skipif(_LIBC is None or not hasattr(_LIBC, "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_import_keeps_large_allocations_in_the_heap_and_freed_memory_for_reuse():
  on, off = _probe({}), _probe({"SAMI_JAX_HOST_MALLOC": "off"})
  mb = 1 << 20
  # glibc's defaults, as documented: a large block is its own mapping, unmapped when freed.
  assert off["main48_mapped_while_held"] >= 48 * mb and off["main48_kept_after_free"] < 48 * mb
  assert off["main192_mapped_while_held"] >= 192 * mb
  assert off["thread_mapped_while_held"] >= 24 * mb
  # With the settings: no mapping of its own (main arena and a thread's arena alike); a freed
  # block below the 64 MB trim threshold stays with the process, a larger one goes back.
  assert on["main48_mapped_while_held"] == 0 and on["main192_mapped_while_held"] == 0
  assert on["thread_mapped_while_held"] == 0
  assert on["main48_kept_after_free"] >= 48 * mb
  assert on["main192_kept_after_free"] < 192 * mb


# --- jemalloc preloaded by launch/cpu.sh ---------------------------------------------------------

LAUNCHER = os.path.join(ROOT, "launch", "cpu.sh")


def _fake_library(tmp_path, name="libjemalloc.so.2"):
  path = tmp_path / name
  path.write_bytes(b"")
  return str(path)


def test_preload_environment_names_the_library_and_keeps_freed_memory(tmp_path):
  lib = _fake_library(tmp_path)
  env = host_memory.preload_environment({"SAMI_JAX_JEMALLOC": lib})
  assert env["LD_PRELOAD"] == lib
  conf = env["MALLOC_CONF"].split(",")
  # Never purge freed pages, and no separate purge-at-once arena for large blocks.
  assert {"dirty_decay_ms:-1", "muzzy_decay_ms:-1", "oversize_threshold:0"} <= set(conf)
  # The user's preloads stay (after it); the user's MALLOC_CONF wins.
  env = host_memory.preload_environment({"SAMI_JAX_JEMALLOC": lib, "LD_PRELOAD": "/x/libfoo.so",
                                         "MALLOC_CONF": "narenas:2"})
  assert env == {"LD_PRELOAD": f"{lib}:/x/libfoo.so"}
  # Nothing to do: already preloaded, or opted out.
  assert host_memory.preload_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == {}
  assert host_memory.preload_environment({"SAMI_JAX_JEMALLOC": "off"}) == {}


def test_jemalloc_found_in_the_conda_environment_first(tmp_path):
  (tmp_path / "lib").mkdir()
  lib = _fake_library(tmp_path / "lib")
  assert host_memory.find_jemalloc({"CONDA_PREFIX": str(tmp_path)}) == lib


def test_a_bad_jemalloc_path_is_one_line_naming_the_fix(tmp_path):
  with pytest.raises(ValueError, match=r"SAMI_JAX_JEMALLOC=.*not a file.*libjemalloc.so.2.*off"):
    host_memory.find_jemalloc({"SAMI_JAX_JEMALLOC": str(tmp_path / "missing.so")})
  marker = tmp_path / "ran"
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # (the suite may run on it)
  env.update(SAMI_JAX_JEMALLOC=str(tmp_path / "missing.so"), PYTHON=sys.executable)
  done = subprocess.run(["bash", LAUNCHER, "touch", str(marker)], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=60)
  assert done.returncode == 2
  assert len(done.stderr.strip().splitlines()) == 1 and "SAMI_JAX_JEMALLOC" in done.stderr
  assert not marker.exists()  # the command did not run


_WHICH = ("import os, sys; from sami_jax.utils import host_memory as h; "
          "print(h.active_allocator(), os.environ.get('MALLOC_CONF'), "
          "h.apply_process_settings({}))")


def _launch(env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "MALLOC_CONF", "SAMI_JAX_JEMALLOC", "SAMI_JAX_HOST_MALLOC")}
  env.update(PYTHON=sys.executable, **env_extra)
  done = subprocess.run(["bash", LAUNCHER, sys.executable, "-c", _WHICH], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=60, check=True)
  return done.stdout.split(), done.stderr


def test_launcher_opted_out_runs_the_command_on_the_system_malloc():
  out, err = _launch({"SAMI_JAX_JEMALLOC": "off"})
  assert out[:2] == ["glibc" if _LIBC is not None else "other", "None"]
  assert "system malloc" in err


_JEMALLOC = host_memory.find_jemalloc({}) if sys.platform.startswith("linux") else None


@pytest.mark.skipif(_JEMALLOC is None,
                    reason="jemalloc not installed (apt-get install libjemalloc2)")
def test_launcher_preloads_jemalloc_and_the_glibc_settings_step_aside():
  out, err = _launch({})
  assert out == ["jemalloc", host_memory.JEMALLOC_CONF, "False"]
  assert f"preloading {_JEMALLOC}" in err
