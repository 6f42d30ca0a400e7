"""Writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) as PNG
files in one sub-folder per class: a small folder of real images to try `configs/folder.py` on.

  python examples/make_digits_folder.py --out=data/digits

Each image is the 8x8 scan (grey levels 0..16) scaled to 0..255, upscaled to --size pixels by
nearest neighbour, and saved as grayscale PNG: OUT/<digit>/<index>.png.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image


def write_digits(out: str, size: int = 16) -> int:
  """Writes the digits under `out`; returns how many files were written."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  for index, (image, label) in enumerate(zip(images, digits.target)):
    folder = os.path.join(out, str(int(label)))
    os.makedirs(folder, exist_ok=True)
    pil = Image.fromarray(image, mode="L").resize((size, size), Image.NEAREST)
    pil.save(os.path.join(folder, f"{index:04d}.png"))
  return len(images)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write (created)")
  parser.add_argument("--size", type=int, default=16, help="side of the written PNGs, pixels")
  args = parser.parse_args(argv)
  n = write_digits(args.out, args.size)
  print(f"Wrote {n} PNG files under {args.out}")


if __name__ == "__main__":
  main()
