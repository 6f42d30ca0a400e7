"""How robust is a Disks recipe? Train it with several seeds and collect the factor probes.

    python benchmarks/seed_sweep.py --config=configs/disks.py:cpu --seeds=0,1,2,3,4 \
        --root=workdirs/sweep [--parallel=2] [--threshold=0.9] [--out=sweep.json] \
        [--eval=disentanglement,elbo,reconstruction,speckle] [--python=/path/to/python] \
        [--config.section.field=value ...]

Each seed is one ordinary run, `python -m sami_jax.main --config=CONFIG --workdir=ROOT/seed_N
--config.seed=N` plus the given overrides, in its own process (so a seed is exactly what a user
gets from the README command with that seed). A seed whose `summary.json` already exists is not
run again, and an interrupted one resumes from its checkpoint: rerun the same command to finish a
sweep. The result (one JSON object, printed and written to --out) has, per seed, the linear and
kNN R^2 of every factor, the wall time and the logged steps/s; and per factor the minimum and mean
over seeds, and how many seeds reach --threshold with the kNN probe on every factor.

`--eval=SECTIONS` also runs `--mode=eval` with those report sections on each finished seed (once;
ROOT/seed_N/eval/<step>/report.json) and adds their headline measures to the seed's entry: the
probes on both Disks factor sets and which one the latents align with, MIG / DCI / SAP /
FactorVAE, the bound in bits/dim, the reconstruction MSE and the background std (speckle) of
reconstructions and samples. `--python` runs the seeds with another interpreter (e.g. the
virtualenv of another jax version); its jax version is recorded.

`--parallel` runs that many seeds at once: on a 2-core CPU two runs share the cores, so it saves
little and makes every wall time longer; use it where cores are plentiful.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from typing import Any


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/disks.py:cpu")
  p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
  p.add_argument("--root", required=True, help="one workdir per seed goes under it")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--out", default=None, help="also write the JSON result here")
  p.add_argument("--eval", default="", help="report sections to run on each seed (--mode=eval)")
  p.add_argument("--python", default=sys.executable, help="interpreter that runs the seeds")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}; only --config.section.field=value overrides pass through.")
  try:
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r} must be comma-separated integers, e.g. 0,1,2.")
  if not args.seed_list:
    p.error("--seeds is empty.")
  if args.parallel < 1:
    p.error("--parallel must be >= 1.")
  return args, rest


def _steps_per_sec(workdir: str) -> float | None:
  """Median of the steps/s logged in metrics.jsonl (None if nothing was logged)."""
  rates = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        rate = json.loads(line).get("steps_per_sec")
        if rate:
          rates.append(rate)
  except FileNotFoundError:
    return None
  rates.sort()
  return rates[len(rates) // 2] if rates else None


def _jax_version(python: str) -> str:
  out = subprocess.run([python, "-c", "import jax, sys; print(jax.__version__, sys.version.split()[0])"],
                       capture_output=True, text=True, check=False)
  return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def _eval_measures(report: dict[str, Any]) -> dict[str, Any]:
  """The headline numbers of a report.json (sections that did not run are left out)."""
  sec = report.get("sections", {})
  out: dict[str, Any] = {}
  dis = sec.get("disentanglement", {})
  if "sets" in dis:
    out["aligned"] = dis.get("aligned")
    for name, st in dis["sets"].items():
      out[name] = {k: st.get(k) for k in ("factors", "linear_r2", "knn_r2", "mig", "sap",
                                          "dci_disentanglement", "dci_completeness",
                                          "dci_informativeness", "factorvae")}
  elbo = sec.get("elbo", {})
  if "total_bpd" in elbo:
    out["bound_bpd"] = elbo["total_bpd"]
    out["bound_bpd_stderr"] = elbo.get("total_bpd_stderr")
    out["bound_terms_bpd"] = elbo.get("bits_per_dim")
    out["bound_denoiser_alone_bpd"] = elbo.get("total_no_guidance_bpd")
  if "mse" in sec.get("reconstruction", {}):
    out["recon_mse"] = sec["reconstruction"]["mse"]
  sp = sec.get("speckle", {})
  for key in ("data_std", "reconstructions_std", "samples_std"):
    if key in sp:
      out[f"bg_{key}"] = sp[key]
  return out


def run_seed(config: str, seed: int, root: str, overrides: list[str], python: str = sys.executable,
             eval_sections: str = "") -> dict[str, Any]:
  workdir = os.path.join(root, f"seed_{seed}")
  summary_path = os.path.join(workdir, "summary.json")
  log_path = os.path.join(root, f"seed_{seed}.log")
  if not os.path.exists(summary_path):
    os.makedirs(workdir, exist_ok=True)
    cmd = [python, "-m", "sami_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.seed={seed}", *overrides]
    t0 = time.time()
    with open(log_path, "a") as log:
      rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not os.path.exists(summary_path):
      return {"seed": seed, "workdir": workdir, "error": f"exit code {rc}; see {log_path}",
              "elapsed_s": time.time() - t0}
  with open(summary_path) as f:
    summary = json.load(f)
  probe = summary.get("probe")
  if probe is None:
    return {"seed": seed, "workdir": workdir,
            "error": "summary.json has no probe (not a Disks run, or train.probe_at_end=False)"}
  out = {"seed": seed, "workdir": workdir, "factors": probe["factors"],
         "linear_r2": probe["linear_r2"], "knn_r2": probe["knn_r2"],
         "probe_sets": probe.get("sets"),
         "wall_time_s": summary.get("wall_time_s"), "steps_per_sec": _steps_per_sec(workdir)}
  if eval_sections:
    report_path = os.path.join(workdir, "eval", str(summary["step"]), "report.json")
    if not os.path.exists(report_path):
      cmd = [python, "-m", "sami_jax.main", f"--config={config}", f"--workdir={workdir}",
             f"--config.seed={seed}", *overrides, "--mode=eval",
             f"--config.eval.sections={eval_sections}"]
      with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
      if rc != 0 or not os.path.exists(report_path):
        out["error"] = f"--mode=eval exit code {rc}; see {log_path}"
        return out
    with open(report_path) as f:
      report = json.load(f)
    out["eval"] = _eval_measures(report)
    out["eval_wall_time_s"] = report.get("wall_time_s")
  return out


def aggregate(runs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
  """Per factor min / mean of each probe over the finished seeds; seeds passing on every factor."""
  done = [r for r in runs if "error" not in r]
  if not done:
    return {"finished_seeds": 0}
  names = done[0]["factors"]
  out: dict[str, Any] = {"finished_seeds": len(done), "factors": names}
  for probe in ("linear_r2", "knn_r2"):
    cols = list(zip(*(r[probe] for r in done)))
    out[probe] = {n: {"min": min(c), "mean": sum(c) / len(c)} for n, c in zip(names, cols)}
  passing = [r["seed"] for r in done if min(r["knn_r2"]) >= threshold]
  out["threshold"] = threshold
  out["seeds_passing_knn_on_every_factor"] = passing
  return out


def main(argv: list[str]) -> int:
  args, overrides = _parse(argv)
  os.makedirs(args.root, exist_ok=True)
  with futures.ThreadPoolExecutor(args.parallel) as pool:
    runs = list(pool.map(lambda s: run_seed(args.config, s, args.root, overrides, args.python,
                                            args.eval), args.seed_list))
  result = {"config": args.config, "overrides": overrides, "seeds": args.seed_list,
            "jax_and_python": _jax_version(args.python),
            "runs": runs, "summary": aggregate(runs, args.threshold)}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
