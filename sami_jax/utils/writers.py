"""Run logging: scalars and images to TensorBoard plus a JSON-lines file, and a progress line.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write_scalars(step, {"loss": 0.03, "kl": 1.2})   # -> workdir/tb/, workdir/metrics.jsonl
    progress = Progress(total_steps=3000, start_step=0)
    logging.info(progress.line(step, {"loss": 0.03}))
    # step 1200/3000 (40.0%) | loss 0.03 | 7.31 steps/s | ETA 4m06s
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def _to_float(value: Any) -> float:
  """A Python float from a Python/numpy/jax scalar (or size-1 array)."""
  return float(np.asarray(value).reshape(()))


class MetricWriter:
  """Writes scalars to TensorBoard (workdir/tb) and to workdir/metrics.jsonl; images to TensorBoard.

  Each metrics.jsonl line is one JSON object {"step": int, "time": unix seconds, name: value, ...};
  non-finite values are written as null so that every line stays valid JSON. The file is appended
  to, so a resumed run continues it. With `enabled=False` (processes other than 0) every method is
  a no-op.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    # Imported here so that processes that never write do not pay for it.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    workdir = os.fspath(workdir)
    self.tb_dir = os.path.join(workdir, "tb")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    os.makedirs(self.tb_dir, exist_ok=True)
    self._tb = SummaryWriter(logdir=self.tb_dir)
    # Line-buffered: each record is on disk as soon as it is written, so `tail -f metrics.jsonl`
    # (or a plotting script) follows a run live, and a killed run loses no logged line.
    self._jsonl = open(self.jsonl_path, "a", buffering=1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs named scalars (floats, numpy or jax scalars) at `step`."""
    if not self.enabled:
      return
    if self._jsonl is None:
      raise RuntimeError("MetricWriter.write_scalars called after close(); create a new writer.")
    values = {str(k): _to_float(v) for k, v in scalars.items()}
    record: dict[str, Any] = {"step": int(step), "time": time.time()}
    for name, value in values.items():
      if name in ("step", "time"):
        raise ValueError(f"Scalar name {name!r} is reserved in metrics.jsonl; rename it.")
      record[name] = value if math.isfinite(value) else None
      self._tb.add_scalar(name, value, global_step=int(step))
    self._jsonl.write(json.dumps(record) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Logs uint8 images of shape [H, W, C] (C = 1 or 3) to TensorBoard at `step`."""
    if not self.enabled:
      return
    if self._tb is None:
      raise RuntimeError("MetricWriter.write_images called after close(); create a new writer.")
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"Image {name!r} must be uint8 [H, W, 1 or 3]; got {image.dtype} "
                         f"{image.shape}. Use sami_jax.utils.images.make_grid to build one.")
      if image.shape[-1] == 1:
        self._tb.add_image(name, image[..., 0], global_step=int(step), dataformats="HW")
      else:
        self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    """Pushes buffered records to disk."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; later writes raise."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """Compact duration: 45s, 4m06s, 2h05m, 3d04h."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
  """Progress line with the step rate and ETA of a training loop.

  The rate is measured between observed (step, time) points over the last `window` intervals.
  The first point is the first observation after construction, never the construction itself,
  so the first step's compile time is excluded.
  """

  def __init__(self, total_steps: int, start_step: int = 0, *,
               clock: Callable[[], float] = time.monotonic, window: int = 10):
    if window < 1:
      raise ValueError(f"window={window} must be >= 1.")
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self._clock = clock
    self._points: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)

  def observe(self, step: int) -> None:
    """Records that `step` was reached now (repeated calls for one step keep the first time)."""
    step = int(step)
    if self._points and step <= self._points[-1][0]:
      return
    self._points.append((step, self._clock()))

  def rate(self, step: int | None = None) -> float:
    """Steps per second over the recent window; 0.0 until two steps have been observed.

    Args:
      step: if given, first records that this step was reached now.
    """
    if step is not None:
      self.observe(step)
    if len(self._points) < 2:
      return 0.0
    (s0, t0), (s1, t1) = self._points[0], self._points[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

  def eta(self, step: int) -> float | None:
    """Seconds until total_steps at the current rate (None while the rate is unknown)."""
    r = self.rate()
    return max(self.total_steps - int(step), 0) / r if r > 0 else None

  def line(self, step: int, scalars: Mapping[str, Any] | None = None) -> str:
    """One log line, e.g. `step 1200/3000 (40.0%) | loss 0.0312 kl 1.2 | 7.31 steps/s | ETA 4m06s`.

    Records `step` as reached now (see `observe`).
    """
    self.observe(step)
    pct = 100.0 * int(step) / self.total_steps if self.total_steps > 0 else 100.0
    parts = [f"step {int(step)}/{self.total_steps} ({pct:.1f}%)"]
    if scalars:
      parts.append(" ".join(f"{k} {_to_float(v):.4g}" for k, v in scalars.items()))
    r = self.rate()
    eta = self.eta(step)
    parts.append(f"{r:.2f} steps/s" if r > 0 else "-- steps/s")
    parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA --")
    return " | ".join(parts)

