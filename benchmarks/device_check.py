r"""Summaries for benchmarks/device_check.sh: a timed training slice, and the whole check.

  python benchmarks/device_check.py run_slice WORKDIR BATCH OUT.json
  python benchmarks/device_check.py summary OUT_DIR

`run_slice` reads a run's metrics.jsonl (written every train.log_every steps) and reports the
steady-state rate between the first logged step after step 1 (so compilation is excluded) and
the last: steps/s and images/s. `summary` collects every part's JSON in OUT_DIR into
OUT_DIR/device_check.json, with the headline figures (per train-step benchmark and step kind:
step time, images/s, fraction of the measured peak; for the slice: steps/s) next to each part's
exit code and duration. Standard library only: it runs wherever the check runs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def run_slice(workdir: str, batch_size: int) -> dict[str, Any]:
  """Steady-state rate of a training run from its metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {"error": f"{path} does not exist (the run failed or timed out before logging)."}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  # Step 1 is logged right after the first (compiling) step; the rate starts there.
  points = [(r["step"], r["time"]) for r in records if r["step"] > 1]
  out: dict[str, Any] = {"logged_steps": [r["step"] for r in records],
                         "last_step": records[-1]["step"] if records else 0}
  first = [r for r in records if r["step"] == 1]
  if first and points:
    (s0, t0), (s1, t1) = (1, first[0]["time"]), points[-1]
    if len(points) >= 2:
      (s0, t0) = points[0]
    if t1 > t0:
      out["steps_per_sec"] = (s1 - s0) / (t1 - t0)
      out["images_per_sec"] = out["steps_per_sec"] * batch_size
      out["measured_between_steps"] = [s0, s1]
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    with open(summary) as f:
      out["summary"] = json.load(f)
  return out


def _headline(result: dict[str, Any]) -> dict[str, Any]:
  if result.get("benchmark") != "train_step":
    return {}
  out = {"peak_flops_per_sec": result.get("peak", {}).get("flops_per_sec"),
         "device": result.get("device", {}).get("device_kind")}
  for kind in ("ddpm", "sami"):
    r = result.get(kind)
    if r:
      out[kind] = {k: r.get(k) for k in ("images_per_sec", "fraction_of_measured_peak",
                                          "paired_fraction_of_peak", "compile_s",
                                          "first_step_s", "gflops_per_step_per_device")}
      out[kind]["step_median_s"] = r["step_time"]["median_s"]
  if "sami_over_plain" in result:
    out["sami_over_plain"] = result["sami_over_plain"]
  return out


def summary(out_dir: str) -> dict[str, Any]:
  """OUT_DIR/device_check.json: every part's record and result, and the headline figures."""
  parts = []
  parts_path = os.path.join(out_dir, "parts.jsonl")
  if os.path.exists(parts_path):
    with open(parts_path) as f:
      parts = [json.loads(line) for line in f if line.strip()]
  results, headline = {}, {}
  for part in parts:
    path = os.path.join(out_dir, part["name"] + ".json")
    if os.path.exists(path):
      try:
        with open(path) as f:
          results[part["name"]] = json.load(f)
      except json.JSONDecodeError:
        results[part["name"]] = {"error": f"{path} is not valid JSON"}
      headline[part["name"]] = (_headline(results[part["name"]])
                                if part["name"].startswith("train_step")
                                else {k: results[part["name"]].get(k) for k in
                                      ("steps_per_sec", "images_per_sec", "last_step")})
  out = {"parts": parts, "ok": bool(parts) and all(p["rc"] == 0 for p in parts),
         "headline": headline, "results": results}
  with open(os.path.join(out_dir, "device_check.json"), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out


def main(argv: list[str]) -> int:
  if len(argv) == 5 and argv[1] == "run_slice":
    with open(argv[4], "w") as f:
      json.dump(run_slice(argv[2], int(argv[3])), f, indent=2, sort_keys=True)
    return 0
  if len(argv) == 3 and argv[1] == "summary":
    out = summary(argv[2])
    print(json.dumps({"ok": out["ok"], "headline": out["headline"]}, indent=2, sort_keys=True))
    return 0
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
