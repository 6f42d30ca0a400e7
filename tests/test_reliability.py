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
from tests.test_config import ROOT, load_config, xla_flags

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
  # The update from step 3 (the state after 3 updates, as checkpoint 3 would be) to step 4 is
  # the non-finite one: one numbering with the checkpoints listed next to it.
  line = _assert_user_error(proc, "update from step 3 to step 4", "loss", "are steps [2]")
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
  _assert_user_error(failed, "update from step 3 to step 4", orbax_noise=True)
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


def test_a_stray_argument_is_one_line_naming_it_and_the_fix(shared, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "sami_jax.main", "extra",
                         "--config=configs/disks.py:test", f"--workdir={tmp_path / 'wd'}"],
                        env=_env(shared), cwd=ROOT, capture_output=True, text=True, timeout=120)
  line = _assert_user_error(proc, "'extra'", "--config.SECTION.FIELD=VALUE", "'='")
  assert proc.stderr.strip() == line  # no flag help
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("argv,fix", [
    (["optim.lr=0.1"], "--config.optim.lr=0.1"),
    (["config.optim.lr=0.1"], "--config.optim.lr=0.1"),
    (["--config.train.write_grids", "false"], "--config.train.write_grids=false"),
])
def test_a_stray_argument_names_the_likely_fix(argv, fix):
  from sami_jax.utils import cli  # pylint: disable=g-import-not-at-top
  line = cli.stray_argument_line(argv[-1:], ["main.py", "--config=c.py", *argv])
  assert line.startswith("Error: ") and fix in line, line


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(shared, base_run, tmp_path):
  """SIGINT while the state's creation compiles (a model no other test builds, so it really
  compiles): no traceback, exit 130, the lock released, nothing written."""
  del base_run  # the dataset is built
  wd = tmp_path / "wd"
  proc = subprocess.Popen(_args(shared, str(wd), "--config.model.encoder.latent_dim=7"),
                          env=_env(shared), cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    lines = []
    for line in proc.stderr:  # "Mesh ..." is logged just before the state's creation starts
      lines.append(line)
      if "Mesh " in line:
        time.sleep(0.5)  # into its trace and compile (measured: tracing or lowering the init)
        proc.send_signal(signal.SIGINT)
        break
    lines += proc.stderr.readlines()
    rc = proc.wait(timeout=_TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = "".join(lines)
  assert rc == 130, (rc, err[-3000:])
  own = [l for l in err.splitlines() if l.strip() and not re.match(r"[IWEF]\d{4} ", l)]
  assert own == ["Interrupted before the first step; no checkpoint was written. Rerun the same "
                 "command to start again."], err[-3000:]
  assert not os.path.exists(wd / ".lock")
  assert not os.path.exists(wd / "checkpoints") or not os.listdir(wd / "checkpoints")


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


def test_a_refused_resume_names_the_fields_that_change_the_state_apart_from_the_rest():
  """optim.grad_clip on/off changes the optimizer state's layout; optim.lr and train.ckpt_every
  only change what the run does (a resume accepts them with a warning)."""
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  from sami_jax import train  # pylint: disable=g-import-not-at-top
  before = load_config("disks", "test")
  before.optim.lr, before.optim.grad_clip = 1e38, 1.0
  after = configlib.copy(before)
  after.optim.lr, after.optim.grad_clip, after.train.ckpt_every = 1e-3, 0.0, 5
  with pytest.raises(ValueError, match="cannot resume") as raised:
    train._check_resume_config(after, configlib.to_dict(before))
  refused, _, accepted = str(raised.value).partition("the shapes or layout")
  assert "optim.grad_clip: 1.0 -> 0.0" in refused, raised.value
  assert "optim.lr" not in refused and "train.ckpt_every" not in refused, raised.value
  assert "optim.lr: 1e+38 -> 0.001" in accepted and "train.ckpt_every: 2 -> 5" in accepted


def test_a_failure_after_the_train_steps_load_started_waits_for_it(shared, base_run, tmp_path,
                                                                    monkeypatch):
  """Every exit path of a run ends the train step's load before it leaves (here: the state's
  creation fails while the load runs)."""
  del base_run  # the dataset is built
  from sami_jax import train  # pylint: disable=g-import-not-at-top
  from sami_jax import train_state  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import compile_cache  # pylint: disable=g-import-not-at-top
  closed = []

  class Loading(compile_cache.Pending):
    def __init__(self):  # pylint: disable=super-init-not-called
      pass

    def close(self):
      closed.append(True)

  def fail(*args):
    del args
    raise ValueError("the state's creation failed")
  monkeypatch.setattr(train_state, "begin_train_step", lambda config, mesh: Loading())
  monkeypatch.setattr(train, "_restore_or_init", fail)
  config = load_config("disks", "test")
  config.data.data_dir = shared["data_dir"]
  with pytest.raises(ValueError, match="creation failed"):
    train.train(config, str(tmp_path / "wd"))
  assert closed == [True]
  assert not os.path.exists(tmp_path / "wd" / ".lock")


def test_a_refused_resume_exits_2_every_time_while_its_train_step_is_in_the_cache(
    shared, base_run, tmp_path):
  """The refused config's train step is in the executable cache (base_run saved it): a run that
  starts loading it in the background and then refuses must still exit 2, not crash at exit
  (the load ran on while the interpreter shut down: "Fatal Python error: Segmentation fault",
  exit 139, in 1 to 4 of 5 tries)."""
  del base_run  # it trained (and saved the train step of) the config the refused runs use
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  executables = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], "executables")
  assert any(n.startswith("train_step-") for n in os.listdir(executables))
  # A checkpoint of a run with 5 latents (only its config is read before the refusal).
  other = load_config("disks", "test")
  other.model.encoder.latent_dim = 5
  wd = str(tmp_path / "wd")
  ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep_last=1)
  params = {"encoder": {"w": np.zeros((2, 5), np.float32)}}
  ckpt.save(2, {"params": params, "ema_params": params}, config=configlib.to_dict(other),
            data_position={})
  ckpt.close()
  for _ in range(5):
    proc = _run(shared, wd, timeout=300)
    assert "Fatal Python error" not in proc.stderr, proc.stderr[-3000:]
    _assert_user_error(proc, "model.encoder.latent_dim: 5 -> 3", "cannot resume")
  assert _steps(wd) == [2]


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
