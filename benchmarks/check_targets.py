r"""Compares a train_step.py result (or a device_check.json) with benchmarks/targets.json.

  python benchmarks/check_targets.py RESULT.json [--targets=benchmarks/targets.json] [--strict]

For every target whose "match" fields equal the result's (config and device entries), each
criterion is checked: "min_NAME" / "max_NAME" under "ddpm" or "sami" bound that step kind's NAME
(max_device_peak_mib: its device memory peak), and under "sami_over_plain" the ratio NAME.
Prints one JSON report; exits 1 with --strict when a criterion fails (never used in tests:
timings are reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _value(result: dict[str, Any], section: str, name: str) -> Any:
  part = result.get(section, {})
  if name == "device_peak_mib":
    return part.get("memory_after", {}).get("device_peak_mib_in_use")
  return part.get(name)


def check(result: dict[str, Any], targets: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (target, section, criterion) that applies to `result`."""
  rows = []
  for tname, target in targets.items():
    if tname.startswith("_"):
      continue
    match = target.get("match", {})
    if any(result.get(block, {}).get(k) != v for block, fields in match.items()
           for k, v in fields.items()):
      continue
    for section in ("ddpm", "sami", "sami_over_plain"):
      for crit, bound in target.get(section, {}).items():
        kind, name = crit.split("_", 1)
        value = _value(result, section, name)
        ok = None if value is None else (value >= bound if kind == "min" else value <= bound)
        rows.append({"target": tname, "section": section, "criterion": crit, "bound": bound,
                     "value": value, "ok": ok})
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("result")
  parser.add_argument("--targets", default=os.path.join(_HERE, "targets.json"))
  parser.add_argument("--strict", action="store_true")
  args = parser.parse_args()
  with open(args.result) as f:
    result = json.load(f)
  with open(args.targets) as f:
    targets = json.load(f)
  results = result.get("results", {"result": result})  # a device_check.json holds several
  rows = [dict(r, result=name) for name, res in results.items() if isinstance(res, dict)
          for r in check(res, targets)]
  print(json.dumps(rows, indent=2))
  return 1 if args.strict and any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
