"""Figures for the evaluation report, drawn with PIL (no plotting library): a line chart and a
labelled heat map, each returned as uint8 RGB [H, W, 3]."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def font(size: int = 12):
  """PIL's default font at `size` (the fixed bitmap font on Pillow < 10.1)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def line_plot(x: np.ndarray, series: dict[str, np.ndarray], *, xlabel: str, ylabel: str,
              title: str, log_y: bool = False, size: tuple[int, int] = (640, 420)
              ) -> np.ndarray:
  """A line chart of several series over the same x, as uint8 RGB [H, W, 3].

  Axes with 5 ticks each, markers at the data points, a legend; log10 y axis if `log_y`
  (all values must then be > 0). Non-finite points are skipped.
  """
  w, h = size
  left, right, top, bottom = 80, 20, 56, 60
  img = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(img)
  small = font(12)
  x = np.asarray(x, np.float64)
  ys = {k: np.asarray(v, np.float64) for k, v in series.items()}
  tr = (lambda y: np.log10(y)) if log_y else (lambda y: y)
  all_y = np.concatenate([tr(v)[np.isfinite(tr(v))] for v in ys.values()] or [np.zeros(1)])
  if all_y.size == 0:
    all_y = np.zeros(1)
  y_lo, y_hi = float(all_y.min()), float(all_y.max())
  if y_hi - y_lo < 1e-12:
    y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
  pad = 0.05 * (y_hi - y_lo)
  y_lo, y_hi = y_lo - pad, y_hi + pad
  x_lo, x_hi = float(x.min()), float(x.max())
  if x_hi - x_lo < 1e-12:
    x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

  def px(xv, yv):
    return (left + (xv - x_lo) / (x_hi - x_lo) * (w - left - right),
            h - bottom - (yv - y_lo) / (y_hi - y_lo) * (h - top - bottom))

  draw.rectangle([left, top, w - right, h - bottom], outline="black")
  for i in range(5):
    xv = x_lo + (x_hi - x_lo) * i / 4
    xp, _ = px(xv, y_lo)
    draw.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
    draw.text((xp - 12, h - bottom + 6), f"{xv:.2f}", fill="black", font=small)
    yv = y_lo + (y_hi - y_lo) * i / 4
    _, yp = px(x_lo, yv)
    draw.line([left - 4, yp, left, yp], fill="black")
    label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
    draw.text((4, yp - 7), label, fill="black", font=small)
  draw.text((left, 8), title, fill="black", font=font(14))
  draw.text(((w - left - right) // 2 + left - 40, h - 22), xlabel, fill="black", font=small)
  draw.text((4, top - 22), ylabel + (" (log scale)" if log_y else ""), fill="black", font=small)
  for i, (name, y) in enumerate(ys.items()):
    color = _PALETTE[i % len(_PALETTE)]
    ty = tr(y)
    pts = [px(a, b) for a, b in zip(x, ty) if np.isfinite(b)]
    if len(pts) > 1:
      draw.line(pts, fill=color, width=2)
    for p in pts:
      draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
    ly = top + 8 + 16 * i
    draw.line([w - right - 200, ly + 6, w - right - 180, ly + 6], fill=color, width=2)
    draw.text((w - right - 175, ly), name, fill="black", font=small)
  return np.asarray(img)


def heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], title: str,
            *, cell: tuple[int, int] = (90, 32)) -> np.ndarray:
  """A [R, C] matrix of values in [0, 1] as a labelled colour grid, uint8 RGB [H, W, 3].

  White (0) to dark blue (1); each cell also prints its value.
  """
  m = np.clip(np.nan_to_num(np.asarray(matrix, np.float64)), 0.0, 1.0)
  rows, cols = m.shape
  cw, ch = cell
  left, top = 130, 56
  img = Image.new("RGB", (left + cols * cw + 10, top + rows * ch + 10), "white")
  draw = ImageDraw.Draw(img)
  small = font(12)
  draw.text((6, 6), title, fill="black", font=font(14))
  for j, name in enumerate(col_labels):
    draw.text((left + j * cw + 6, top - 20), str(name)[:12], fill="black", font=small)
  for i in range(rows):
    draw.text((6, top + i * ch + 9), str(row_labels[i])[:20], fill="black", font=small)
    for j in range(cols):
      v = m[i, j]
      color = tuple(int(round(255 + (c - 255) * v)) for c in (8, 48, 107))
      x0, y0 = left + j * cw, top + i * ch
      draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], fill=color, outline="gray")
      draw.text((x0 + cw // 2 - 14, y0 + 9), f"{v:.2f}", fill="white" if v > 0.5 else "black",
                font=small)
  return np.asarray(img)
