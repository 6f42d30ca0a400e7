"""Train SAMI on a folder of your own images, then draw latent traversals with the Python API.

  python examples/train_on_folder.py --folder=/path/to/images --workdir=/tmp/my_run --steps=3000

Trains with configs/folder.py (resumes if the workdir already holds a run), loads the model with
`sami_jax.load`, and saves a figure with one row per latent dimension: the first readable image's
latent with that dimension swept over [-r, r] (r = config.sampling.traverse_range). Prints the
figure's path on the last line of its output.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_config(variant: str):
  """configs/folder.py:VARIANT (loaded by path: configs/ is not a package)."""
  path = os.path.join(_ROOT, "configs", "folder.py")
  spec = importlib.util.spec_from_file_location("sami_folder_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _first_readable_image(folder_dataset, image_size: int, channels: int) -> tuple[str, np.ndarray]:
  """(relative path, uint8 [S, S, C]) of the first image, in sorted order, that decodes."""
  from sami_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  root = folder_dataset.builder_config.folder
  for rel in folder_dataset.builder_config.relpaths:
    try:
      return rel, folder_lib.load_image(os.path.join(root, rel), image_size, channels)
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable files were already reported when the dataset was built
  raise ValueError(f"No readable image in {root}.")


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", required=True, help="folder of PNG/JPEG images (recursive)")
  parser.add_argument("--workdir", required=True, help="where checkpoints and the figure go")
  parser.add_argument("--steps", type=int, default=3000, help="training steps")
  parser.add_argument("--variant", default="cpu", help="configs/folder.py variant: cpu|gpu|test")
  parser.add_argument("--image_size", type=int, default=None, help="override data.image_size")
  parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                      help="override data.channels (1 grayscale, 3 RGB)")
  parser.add_argument("--data_dir", default=None,
                      help="where the prepared dataset is cached (default: WORKDIR/tfds)")
  parser.add_argument("--sampling_steps", type=int, default=None,
                      help="reverse diffusion steps for the figure (default: "
                      "config.sampling.steps)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}.")
  if not os.path.isdir(args.folder):
    parser.error(f"--folder {args.folder!r} is not a directory of images.")

  # Imported after argument parsing so that --help is instant.
  import sami_jax  # pylint: disable=g-import-not-at-top
  from sami_jax import train  # pylint: disable=g-import-not-at-top
  from sami_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from sami_jax.utils import images as images_lib  # pylint: disable=g-import-not-at-top

  config = _folder_config(args.variant)
  config.data.folder = os.path.abspath(args.folder)
  config.data.data_dir = args.data_dir or os.path.join(args.workdir, "tfds")
  if args.image_size is not None:
    config.data.image_size = args.image_size
  if args.channels is not None:
    config.data.channels = args.channels
  config.train.num_steps = args.steps
  config.train.ckpt_every = min(config.train.ckpt_every, args.steps)

  summary = train.train(config, args.workdir)
  print(f"Trained to step {summary['step']} in {args.workdir}.")
  dataset = pipeline.dataset_for(config)
  skipped = dataset.skipped_files()
  if skipped:
    print(f"Skipped {len(skipped)} unreadable file(s):\n  " + "\n  ".join(skipped))

  model = sami_jax.load(args.workdir)
  steps = args.sampling_steps or model.config.sampling.steps
  rel, image = _first_readable_image(dataset, model.config.data.image_size,
                                     model.config.data.channels)
  r = model.config.sampling.traverse_range
  values = np.linspace(-r, r, model.config.sampling.traverse_points)
  rows = [model.traverse(image, dim, values, steps=steps) for dim in range(model.latent_dim)]
  # One row per latent dimension: the input image, then its traversal.
  source = image.astype(np.float32) / 127.5 - 1.0
  figure = np.concatenate([np.concatenate([source[None], row]) for row in rows])
  ncol = len(values) + 1
  path = os.path.join(args.workdir, "traversals.png")
  images_lib.save_grid(path, figure, ncol=ncol)
  print(f"Traversals of {rel} (left: input; one row per latent dimension, values "
        f"{np.round(values, 2).tolist()}):")
  print(path)
  return path


if __name__ == "__main__":
  main(sys.argv[1:])
