"""Tests of the benchmark tooling: the device check in its tiny CPU mode, and its summaries.

No timing is asserted anywhere: the check must run end to end and produce well-formed JSON whose
figures are consistent with each other (e.g. images/s = batch / step time), not fast.
"""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import device_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_run_slice_rate_excludes_the_compiling_first_step(tmp_path):
  # Steps 1 (after compilation, at t=100), 10 at t=130, 20 at t=135, 30 at t=140: the steady rate
  # is (30 - 10) / (140 - 130) = 2 steps/s, 16 images/s at batch 8; the 30 s of step 1 -> 10 don't
  # count as they include the warm-up.
  _write_jsonl(tmp_path / "metrics.jsonl", [
      {"step": 1, "time": 100.0}, {"step": 10, "time": 130.0}, {"step": 20, "time": 135.0},
      {"step": 30, "time": 140.0}])
  out = device_check.run_slice(str(tmp_path), 8)
  assert out["steps_per_sec"] == pytest.approx(2.0)
  assert out["images_per_sec"] == pytest.approx(16.0)
  assert out["measured_between_steps"] == [10, 30]
  assert out["last_step"] == 30


def test_the_paired_matmul_is_the_second_call_after_a_step():
  # A stand-in for the matmul whose first call after a step is slow (0.3 s), the next fast.
  calls = []

  def call():
    calls.append(None)
    if len(calls) == 1:
      time.sleep(0.3)
    return 0

  seconds = common.second_call_seconds(call)
  assert len(calls) == 2
  assert seconds < 0.2, seconds


def test_recommended_xla_options_reach_the_benchmarks():
  # On CPU the project's recommended set names the YNNPACK fusion types; "recommended" must pass
  # it on (it once looked for the module where it used to live and silently passed nothing).
  opts = common.compiler_options("recommended")
  assert "xla_cpu_experimental_ynn_fusion_type" in opts
  assert "convolution" not in opts["xla_cpu_experimental_ynn_fusion_type"]
  assert common.compiler_options("jit") == {}


def test_run_slice_reports_a_missing_log(tmp_path):
  assert "error" in device_check.run_slice(str(tmp_path), 8)


def test_device_check_tiny_mode_runs_end_to_end(tmp_path):
  out = tmp_path / "check"
  # One CPU device, as on a user's machine (conftest.py gives this process 8 fake ones).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), str(out),
                         "--tiny"], env=env, capture_output=True, text=True, timeout=900)
  logs = {p.name: p.read_text()[-3000:] for p in out.glob("*.log")}
  assert proc.returncode == 0, (proc.stderr[-3000:], logs)
  summary = json.loads((out / "device_check.json").read_text())
  assert summary["ok"]
  assert [p["name"] for p in summary["parts"]] == ["train_step_disks", "train_step_celeba",
                                                   "run_slice_train", "run_slice"]
  disks = summary["results"]["train_step_disks"]
  for name, kinds in (("train_step_disks", ("ddpm", "sami")), ("train_step_celeba", ("sami",))):
    result = summary["results"][name]
    assert result["peak"]["flops_per_sec"] > 0
    for kind in kinds:
      r = result[kind]
      assert r["images_per_sec"] == pytest.approx(r["batch_size"] / r["step_time"]["median_s"])
      assert r["flops_per_step_per_device"] > 0 and r["compile_s"] > 0 and r["first_step_s"] > 0
      assert r["fraction_of_measured_peak"] == pytest.approx(
          r["achieved_flops_per_sec_per_device"] / result["peak"]["flops_per_sec"])
  # SAMI adds the encoder (twice) and a double backward pass to the same U-Net's step.
  assert disks["sami_over_plain"]["flops"] > 1.0
  run = summary["results"]["run_slice"]
  assert run["last_step"] == 3 and run["steps_per_sec"] > 0
  assert summary["headline"]["train_step_disks"]["sami"]["step_median_s"] > 0
