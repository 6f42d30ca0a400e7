"""Writing the evaluation report: strict JSON values and the markdown tables of report.md."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

Tables = list[tuple[str, list[str], list[list[Any]]]]  # (title, header, rows) for report.md


def jsonable(x: Any) -> Any:
  """numpy/JAX values -> plain JSON values; non-finite floats -> None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x


def cell(v: Any) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v):
      return "n/a"
    return f"{v:.4g}"
  return str(v).replace("|", "\\|")


def markdown(report: dict, tables: dict[str, Tables]) -> str:
  lines = [f"# SAMI evaluation: step {report['step']}", "",
           f"Run `{report['workdir']}`: {report['model_kind']} on {report['dataset']} "
           f"({'x'.join(map(str, report['image_shape']))}, latent dim {report['latent_dim']}). "
           f"Total wall time {report['wall_time_s']:.1f} s.", ""]
  for name, section in report["sections"].items():
    lines.append(f"## {name}")
    lines.append("")
    if "skipped" in section:
      lines += [f"Skipped: {section['skipped']}.", ""]
      continue
    lines += [f"Wall time {section['wall_time_s']:.1f} s.", ""]
    for title, header, rows in tables.get(name, []):
      lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
      lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
      lines.append("")
    figures = [v for k, v in section.items()
               if isinstance(v, str) and v.endswith(".png") and k != "reference_stats"]
    lines += [f"![{f}]({f})" for f in figures]
    if figures:
      lines.append("")
  return "\n".join(lines)
