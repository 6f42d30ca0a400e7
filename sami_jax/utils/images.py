"""Image grids: a batch of images tiled into one uint8 picture, saved as PNG.

Small images (a 16x16 Disks sample) make a grid too small to see, so `make_grid` enlarges it by
an integer factor (nearest neighbour: every pixel becomes a block of identical pixels, nothing is
interpolated) until each cell is at least `min_cell` pixels on its shorter side, 64 by default.
Pass `min_cell=0` for the grid at the images' own resolution; `upscale_nearest` enlarges any
array.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] to uint8 [0, 255] (-1 -> 0, 1 -> 255); uint8 passes through.

  Values outside [-1, 1] are clipped and NaNs become 0 (black), so a diverged sample still
  produces a viewable picture.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"Images must be float in [-1, 1] or uint8; got dtype {images.dtype}.")
  x = np.nan_to_num(images.astype(np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


# Smallest cell side, in screen pixels, of a grid from make_grid / save_grid unless told otherwise.
DEFAULT_MIN_CELL = 64


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
  """Enlarges images by an integer factor, each pixel repeated into a factor x factor block.

  Args:
    image: [..., H, W, C] (any leading axes, any dtype).
    factor: integer >= 1.

  Returns:
    [..., H * factor, W * factor, C], same dtype; out[..., i, j, :] = image[..., i // factor,
    j // factor, :].
  """
  image = np.asarray(image)
  if image.ndim < 3:
    raise ValueError(f"upscale_nearest expects [..., H, W, C]; got shape {image.shape} (add a "
                     "channel axis with image[..., None]).")
  if int(factor) != factor or factor < 1:
    raise ValueError(f"upscale_nearest needs an integer factor >= 1; got {factor}.")
  factor = int(factor)
  if factor == 1:
    return image
  return np.repeat(np.repeat(image, factor, axis=-3), factor, axis=-2)


def cell_scale(height: int, width: int, min_cell: int) -> int:
  """Smallest integer factor that makes an H x W cell at least `min_cell` px on both sides (>= 1)."""
  if min_cell < 0:
    raise ValueError(f"min_cell must be >= 0; got {min_cell}.")
  return max(1, -(-int(min_cell) // max(1, min(int(height), int(width)))))


def make_grid(images: np.ndarray, ncol: int, pad: int = 1, pad_value: int = 0, *,
              min_cell: int = DEFAULT_MIN_CELL) -> np.ndarray:
  """Tiles a batch of images row by row into one picture, enlarged until it can be seen.

  Args:
    images: [N, H, W, C] (C = 1 or 3) float in [-1, 1] or uint8; [N, H, W] is taken as C = 1.
    ncol: images per row (capped at N); the last row is left blank where images run out.
    pad: pixels of `pad_value` around and between the images (before enlarging).
    pad_value: uint8 value of the padding.
    min_cell: the grid is enlarged by s = cell_scale(H, W, min_cell) (nearest neighbour, padding
      included) so each image cell is at least min_cell px on its shorter side; 0 (or anything
      <= min(H, W)) keeps the images' own resolution (s = 1).

  Returns:
    uint8 [s * (nrow * H + (nrow + 1) * pad), s * (ncol * W + (ncol + 1) * pad), C],
    nrow = ceil(N / ncol).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"make_grid expects images [N, H, W, C] with C = 1 or 3; got shape "
                     f"{images.shape}.")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("make_grid got an empty batch (N = 0); pass at least one image.")
  if int(ncol) < 1 or int(pad) < 0:
    raise ValueError(f"make_grid needs ncol >= 1 and pad >= 0; got ncol={ncol}, pad={pad}.")
  ncol = min(int(ncol), n)
  nrow = math.ceil(n / ncol)
  images = to_uint8(images)
  grid = np.full((nrow * h + (nrow + 1) * pad, ncol * w + (ncol + 1) * pad, c), pad_value,
                 dtype=np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return upscale_nearest(grid, cell_scale(h, w, min_cell))


def save_png(path: str | os.PathLike, grid: np.ndarray) -> str:
  """Writes a uint8 [H, W, C] (C = 1 or 3) or [H, W] image as PNG (grayscale as mode 'L').

  Creates the parent directory if needed. Returns the path.
  """
  grid = np.asarray(grid)
  if grid.dtype != np.uint8:
    raise ValueError(f"save_png expects uint8 pixels; got {grid.dtype} (use make_grid or "
                     "to_uint8 first).")
  if grid.ndim == 3 and grid.shape[-1] == 1:
    grid = grid[..., 0]
  if not (grid.ndim == 2 or (grid.ndim == 3 and grid.shape[-1] == 3)):
    raise ValueError(f"save_png expects [H, W], [H, W, 1] or [H, W, 3]; got shape {grid.shape}.")
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  # PIL infers 'L' from uint8 [H, W] and 'RGB' from uint8 [H, W, 3].
  Image.fromarray(grid).save(path, format="PNG")
  return path


def save_grid(path: str | os.PathLike, images: np.ndarray, ncol: int, pad: int = 1, *,
              min_cell: int = DEFAULT_MIN_CELL) -> str:
  """`save_png(path, make_grid(images, ncol, pad, min_cell=min_cell))`; returns the path."""
  return save_png(path, make_grid(images, ncol, pad=pad, min_cell=min_cell))
