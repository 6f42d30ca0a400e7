"""What a user sees when things go wrong: preemption, damaged checkpoints, a busy workdir, NaNs and
bad command lines. Most tests run `python -m sami_jax.main` as a real subprocess.

Subprocesses share the test session's persistent XLA compilation cache (tests/conftest.py), so
only the first run of each distinct program compiles.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sami_jax import checkpoint as ckpt_lib
from sami_jax import inference
from tests.test_config import ROOT, xla_flags

_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, str]:
  """A data dir shared by every subprocess of this module."""
  base = tmp_path_factory.mktemp("reliability")
  return {"data_dir": str(base / "tfds"), "base": str(base)}


def _env(shared: dict[str, str]) -> dict[str, str]:
  env = dict(os.environ)
  # One device: the point here is the run's life cycle, not the mesh (tests/test_train.py and
  # tests/test_scale.py cover 8 devices).
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  # The session's compilation cache (tests/conftest.py) comes with os.environ.
  return env


def _args(shared: dict[str, str], workdir: str, *extra: str,
          config: str = "configs/disks.py:test") -> list[str]:
  return [sys.executable, "-m", "sami_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={shared['data_dir']}", "--config.train.write_grids=false",
          "--config.train.probe_at_end=false", *extra]


def _run(shared, workdir, *extra, config="configs/disks.py:test", timeout=_TIMEOUT_S
         ) -> subprocess.CompletedProcess:
  return subprocess.run(_args(shared, workdir, *extra, config=config), env=_env(shared), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _steps(workdir: str) -> list[int]:
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=100)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _error_line(stderr: str) -> str:
  """The `Error: ...` line main prints for a user error (the last such line)."""
  lines = [l for l in stderr.splitlines() if l.startswith("Error:")]
  assert lines, f"no 'Error:' line in stderr:\n{stderr[-3000:]}"
  return lines[-1]


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str,
                       orbax_noise: bool = False) -> str:
  """Exit code 2, one `Error:` line containing every fragment, and no stack trace.

  orbax_noise: after reading a damaged checkpoint, Orbax/tensorstore threads may print
  "Event loop is closed" tracebacks of their own (timing-dependent, harmless); allow those, but
  still no traceback through sami_jax's code.
  """
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  if orbax_noise:
    assert "sami_jax/" not in "".join(
        line for line in proc.stderr.splitlines(True) if line.lstrip().startswith("File ")), (
            proc.stderr[-3000:])
  else:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  line = _error_line(proc.stderr)
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  return line


@pytest.fixture(scope="module")
def base_run(shared) -> str:
  """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it, never modify it)."""
  wd = os.path.join(shared["base"], "base_run")
  proc = _run(shared, wd, "--config.train.num_steps=4", "--config.train.ckpt_every=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _steps(wd) == [2, 4]
  return wd


def _restored_step(workdir: str) -> int:
  """Restores the newest intact checkpoint in this process and checks its params are finite."""
  _, params, step = inference.restore(workdir)
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.all(np.isfinite(np.asarray(l))) for l in leaves)
  return step


# ------------------------------------------------------------------------------ preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_exits_75_and_the_next_run_resumes(shared, base_run, tmp_path, sig):
  """SIGTERM (a preemption) and Ctrl-C (SIGINT) both save at the current step; the run exits
  with train.PREEMPTED_EXIT_CODE (75), not 0 like a finished run."""
  del base_run  # only for ordering: its compilation fills the cache this test starts from
  wd = str(tmp_path / "wd")
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        _args(shared, wd, "--config.train.num_steps=2000", "--config.train.ckpt_every=1000"),
        env=_env(shared), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
      # metrics.jsonl gets its first line after step 1, when the SIGTERM handler is installed.
      metrics = os.path.join(wd, "metrics.jsonl")
      deadline = time.time() + _TIMEOUT_S
      while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no step logged in time"
        time.sleep(0.2)
      proc.send_signal(sig)
      rc = proc.wait(timeout=_TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
  out = log_path.read_text()
  assert rc == 75, (rc, out[-3000:])
  assert "Traceback" not in out, out[-3000:]
  match = re.search(r"Preempted at step (\d+)", out)
  assert match, out[-3000:]
  step = int(match.group(1))
  assert 1 <= step < 2000
  assert _steps(wd)[-1] == step
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released on the way out

  second = _run(shared, wd, f"--config.train.num_steps={step + 2}",
                "--config.train.ckpt_every=1000")
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"Resumed from step {step}" in second.stderr
  assert _steps(wd)[-1] == step + 2


# ------------------------------------------------------------------------------ NaN guard


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(shared, tmp_path):
  # The workdir is given as ~/run, with HOME a test directory and the cwd another one: the same
  # run also checks that a leading ~ means the home directory (not a folder named "~").
  home = tmp_path / "home"
  home.mkdir()
  # log_every=1: the NaN is seen one step after the (asynchronous) save of step 2 started, while
  # that save is most likely still being written; the run must let it commit before exiting.
  proc = subprocess.run(
      _args(shared, "~/run", "--config.objective.test_inject_nan_step=3",
            "--config.train.ckpt_every=2", "--config.train.num_steps=6",
            "--config.train.log_every=1", config=os.path.join(ROOT, "configs", "disks.py:test")),
      env=dict(_env(shared), HOME=str(home)), cwd=str(tmp_path), capture_output=True, text=True,
      timeout=_TIMEOUT_S)
  line = _assert_user_error(proc, "step 3", "loss")
  assert "Non-finite" in line
  assert not os.path.exists(tmp_path / "~")
  wd = str(home / "run")
  # The NaN step's update was not applied and nothing was saved after it.
  assert _steps(wd) == [2]
  assert _restored_step(wd) == 2
  assert not os.path.exists(os.path.join(wd, ".lock"))


# ------------------------------------------------------------------------------ damaged checkpoint


def _truncate_state_files(step_dir: str) -> None:
  """Cuts every array data file of a checkpoint's state to 10 bytes (as a full disk would)."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  files = os.listdir(data)
  assert files
  for name in files:
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(10)


def test_damaged_latest_checkpoint_falls_back_and_keeps_the_intact_one(shared, base_run,
                                                                       tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(base_run, wd)
  _truncate_state_files(os.path.join(wd, "checkpoints", "4"))

  # 1) The resumed run restores step 2 (warning about 4) and then fails (NaN at step 3) before it
  # commits anything. With keep_ckpts=1 a pruning that ran too early would have deleted step 2:
  # it must still be there and intact.
  failed = _run(shared, wd, "--config.objective.test_inject_nan_step=3",
                "--config.train.ckpt_every=2", "--config.train.num_steps=4",
                "--config.train.keep_ckpts=1")
  _assert_user_error(failed, "step 3", orbax_noise=True)
  assert "Resumed from step 2" in failed.stderr
  assert re.search(r"[Cc]heckpoint for step 4 .*(damaged|unreadable)", failed.stderr) or (
      "skipped damaged checkpoint(s) [4]" in failed.stderr), failed.stderr[-3000:]
  assert 2 in _steps(wd)
  assert _restored_step(wd) == 2  # the newest intact one; 4 is still unreadable

  # 2) A clean rerun falls back again, trains 2 -> 4 and commits a new step 4; the damaged one is
  # moved aside, not overwritten or silently deleted.
  ok = _run(shared, wd, "--config.train.ckpt_every=2", "--config.train.num_steps=4",
            "--config.train.keep_ckpts=1")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "Resumed from step 2" in ok.stderr
  assert "skipped damaged checkpoint(s) [4]" in ok.stderr
  assert os.path.isdir(os.path.join(wd, "checkpoints", "damaged", "4"))
  assert _steps(wd) == [4]
  assert _restored_step(wd) == 4


# ------------------------------------------------------------------------------ workdir lock


def test_busy_workdir_is_refused_with_a_one_line_message(shared, tmp_path):
  wd = str(tmp_path / "wd")
  lock = ckpt_lib.WorkdirLock(wd)
  with lock:  # held by this (live) test process
    proc = _run(shared, wd, timeout=300)
    assert os.path.exists(lock.path)  # the refused run did not remove someone else's lock
  line = _assert_user_error(proc, lock.path, f"pid {os.getpid()}")
  assert "Another run" in line
  assert not os.path.exists(os.path.join(wd, "checkpoints"))  # it touched nothing


# ------------------------------------------------------------------------------ bad inputs


def test_unknown_config_field_names_it_and_suggests_the_right_one(shared, tmp_path):
  proc = _run(shared, str(tmp_path / "wd"), "--config.model.encoder.latnet_dim=4", timeout=300)
  assert proc.returncode != 0
  assert "latnet_dim" in proc.stderr and "latent_dim" in proc.stderr
  # A typo on the command line is a user error: one line, no stack trace.
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_wrong_type_names_the_flag(shared, tmp_path):
  proc = _run(shared, str(tmp_path / "wd"), "--config.train.batch_size=abc", timeout=300)
  assert proc.returncode != 0
  assert "--config.train.batch_size=abc" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_image_size_the_unet_cannot_downsample_is_refused_before_compiling(shared, tmp_path):
  # The full disks U-Net has 3 levels (downsamples by 4); 30 is not a multiple of 4.
  proc = _run(shared, str(tmp_path / "wd"), "--config.data.image_size=30", timeout=300,
              config="configs/disks.py")
  _assert_user_error(proc, "data.image_size=30", "ch_mult")


def test_missing_celeba_says_how_to_prepare_it(shared, tmp_path):
  empty = str(tmp_path / "empty_tfds")
  proc = subprocess.run(
      [sys.executable, "-m", "sami_jax.main", "--config=configs/celeba.py:test",
       f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={empty}"],
      env=_env(shared), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "python -m sami_jax.data.celeba" in proc.stderr
  assert empty in proc.stderr


def test_frozen_denoiser_from_a_missing_directory(shared, tmp_path):
  proc = _run(shared, str(tmp_path / "wd"), "--config.model.kind=sami_frozen",
              "--config.model.denoiser_checkpoint=/nonexistent")
  _assert_user_error(proc, "/nonexistent", "does not exist")


def test_frozen_denoiser_of_the_wrong_kind_or_shape_is_refused_before_compiling(
    shared, base_run, tmp_path):
  # A checkpoint without a denoiser (a beta_vae run keeps a decoder instead): written directly.
  no_denoiser = str(tmp_path / "vae")
  ckpt = ckpt_lib.Checkpointer(os.path.join(no_denoiser, "checkpoints"), keep_last=1)
  params = {"decoder": {"w": np.zeros((2, 2), np.float32)}}
  ckpt.save(1, {"params": params, "ema_params": params}, config={}, data_position={})
  ckpt.close()
  proc = _run(shared, str(tmp_path / "wd1"), "--config.model.kind=sami_frozen",
              f"--config.model.denoiser_checkpoint={no_denoiser}", timeout=300)
  _assert_user_error(proc, "holds no denoiser params", "decoder")
  # The right kind but another U-Net width: named before anything is compiled.
  proc = _run(shared, str(tmp_path / "wd2"), "--config.model.kind=sami_frozen",
              f"--config.model.denoiser_checkpoint={base_run}", "--config.model.denoiser.ch=16",
              timeout=300)
  _assert_user_error(proc, "does not match config.model.denoiser")


def test_resuming_with_changed_fields_refuses_shape_changes_and_warns_on_the_rest(
    shared, base_run, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(base_run, wd)
  proc = _run(shared, wd, "--config.train.num_steps=4", "--config.model.encoder.latent_dim=5",
              timeout=300)
  _assert_user_error(proc, "model.encoder.latent_dim: 3 -> 5", "cannot resume")
  assert _steps(wd) == [2, 4]  # nothing touched
  proc = _run(shared, wd, "--config.train.num_steps=6", "--config.optim.lr=0.0005",
              "--config.train.ckpt_every=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"differs from the checkpoint's: .*optim\.lr: 0\.0002 -> 0\.0005",
                   proc.stderr), proc.stderr[-3000:]
  assert _steps(wd)[-1] == 6


# ------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("content,fragment", [
    (None, "No such file or directory"),
    ("x = (", "SyntaxError"),
    ("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'"),
    ("A = 1\n", "defines no get_config"),
    ("dir", "Is a directory"),
])
def test_a_broken_config_file_is_one_line(shared, tmp_path, content, fragment):
  path = tmp_path / "my_config.py"
  if content == "dir":
    path.mkdir()
  elif content is not None:
    path.write_text(content)
  proc = _run(shared, str(tmp_path / "wd"), config=str(path), timeout=120)
  line = _assert_user_error(proc, f"could not load --config={path}", fragment)
  assert "get_config" in line


def test_an_unknown_variant_names_the_known_ones(shared, tmp_path):
  proc = _run(shared, str(tmp_path / "wd"), config="configs/disks.py:cpuu", timeout=120)
  _assert_user_error(proc, "Unknown variant 'cpuu'", "'cpu'")


# ------------------------------------------------------------------------------ the file system


def test_workdir_problems_are_one_line_naming_the_path(shared, tmp_path):
  afile = tmp_path / "a_file"
  afile.write_text("not a directory")
  cases = [(str(afile), "a_file"), (str(afile / "sub"), "a_file/sub"),
           (str(tmp_path / ("x" * 300)), "File name too long")]
  for workdir, fragment in cases:
    proc = _run(shared, workdir, timeout=120)
    line = _assert_user_error(proc, fragment)
    assert "(" in line and ")" in line  # the fix is named
  assert afile.read_text() == "not a directory"  # nothing lost
