"""The Python API on a run trained on your own images (the README's "Your own images" chapter).

  python examples/own_images.py --workdir=workdirs/digits --folder=data/digits

Loads the run, encodes a batch of PNG files from the folder, reconstructs them, traverses one
latent of the first image and exports the latents of the test split; prints what it did and
writes two figures into the workdir. Its last line is the path of the exported latents.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def load_some(folder: str, n: int, size: int, channels: int) -> tuple[list[str], np.ndarray]:
  """Up to n images spread over the folder's sub-folders (round robin over them), decoded,
  resized and cropped as the dataset was built: (paths, uint8 [n, size, size, channels]).
  Files that do not decode are passed over (the run listed them when it built the dataset)."""
  from sami_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  relpaths, _ = folder_lib.scan_folder(folder)
  by_dir: dict[str, list[str]] = {}
  for rel in relpaths:
    by_dir.setdefault(os.path.dirname(rel), []).append(rel)
  order = [v[k] for k in range(max(map(len, by_dir.values()))) for v in by_dir.values()
           if k < len(v)]
  paths, images = [], []
  for rel in order:
    if len(paths) == n:
      break
    try:
      images.append(folder_lib.load_image(os.path.join(folder, rel), size, channels))
    except Exception:  # pylint: disable=broad-except
      continue
    paths.append(os.path.join(folder, rel))
  return paths, np.stack(images)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--folder", required=True, help="the image folder it was trained on")
  parser.add_argument("--num_images", type=int, default=8, help="images to encode")
  args = parser.parse_args(argv)

  import sami_jax  # pylint: disable=g-import-not-at-top
  from sami_jax import export  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import images as images_lib  # pylint: disable=g-import-not-at-top

  # 1. Load the newest checkpoint (the run's config and EMA params).
  model = sami_jax.load(args.workdir)
  print(model)
  size, channels = model.config.data.image_size, model.config.data.channels

  # 2. Encode a batch of PNG files, decoded, resized and cropped as the dataset was built.
  paths, batch = load_some(args.folder, args.num_images, size, channels)  # uint8 NHWC
  mean, std = model.encode(batch)
  print(f"encoded {len(paths)} images {list(batch.shape)} -> latent means {list(mean.shape)}")
  print("  first image's latent mean:", [round(float(v), 3) for v in mean[0]])
  if std is not None:
    print("  its posterior std:        ", [round(float(v), 3) for v in std[0]])

  # 3. Reconstruct them (with the run's sampling settings, config.sampling).
  recon = model.reconstruct(batch, seed=0)
  x = batch.astype(np.float32) / 127.5 - 1.0
  mse = float(np.mean((recon - x) ** 2))
  grid = images_lib.save_grid(os.path.join(args.workdir, "example_reconstructions.png"),
                              np.concatenate([x, recon]), ncol=len(paths))
  print(f"reconstructions: MSE {mse:.4f} (images in [-1, 1]) -> {grid}")

  # 4. Traverse latent 0 of the first image over config.sampling.traverse_range.
  row = model.traverse(batch[0], dim=0, seed=0)
  trav = images_lib.save_grid(os.path.join(args.workdir, "example_traversal.png"), row,
                              ncol=len(row))
  print(f"traversal of latent 0: {len(row)} images -> {trav}")

  # 5. Export the latents of a whole split (what --mode=export writes).
  config = model.config
  config.eval.export_split = "test"
  path = export.run(config, args.workdir)
  with np.load(path) as f:
    print(f"exported {f['mean'].shape[0]} test latents, arrays {sorted(f.files)}")
  print(path)
  return path


if __name__ == "__main__":
  main()
