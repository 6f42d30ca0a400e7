"""Does a model trained on scikit-learn's digits keep the digit's class? (issue: real images)

  python benchmarks/digits_class.py --folder=data/digits --workdirs=workdirs/digits_sami,... \
      [--out=digits_class.json]

The folder is the one `examples/make_digits_folder.py` writes (OUT/<digit>/<index>.png); each
workdir a run of `configs/folder.py` on it (any kind with an encoder). For every run:

- **class from the latents**: 5-fold stratified cross-validated accuracy of a logistic regression
  of the digit class on the posterior means of all images, against the same probe on the first d
  principal components of the pixels (d = the latent size; PCA fitted inside each fold), and on
  all pixels;
- **class kept by reconstruction**: the run's held-out images (the folder dataset's own test
  split, `folder.assign_splits`) reconstructed with the run's sampling settings (DDIM from the
  posterior mean) and classified by a logistic regression on pixels fitted on the training
  split's originals: the fraction whose predicted class is the true one (and, for reference, the
  same classifier's accuracy on the held-out originals).

Nothing here is tuned on the held-out images: the classifiers see only training images (or the
folds they are fitted on). Writes one JSON object per run to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _labelled_images(folder: str, image_size: int, channels: int):
  """(relative paths, uint8 images [N, H, W, C], labels [N]) of every image under folder, the
  label being the name of its first-level sub-folder."""
  from sami_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  relpaths = sorted(folder_lib.list_images(folder))
  images = np.stack([folder_lib.load_image(os.path.join(folder, p), image_size, channels)
                     for p in relpaths])
  labels = np.array([int(p.split(os.sep)[0]) for p in relpaths])
  return relpaths, images, labels


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, pca_dims: int | None,
                    seed: int) -> tuple[float, float]:
  """Mean and std of 5-fold stratified CV accuracy of a logistic regression (after an optional
  PCA to pca_dims fitted inside each fold; features standardised inside each fold)."""
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedKFold, cross_val_score  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  steps = [StandardScaler()]
  if pca_dims is not None:
    steps += [PCA(n_components=pca_dims, random_state=seed), StandardScaler()]
  steps.append(LogisticRegression(max_iter=5000))
  folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
  scores = cross_val_score(make_pipeline(*steps), features, labels, cv=folds)
  return float(np.mean(scores)), float(np.std(scores))


def measure(workdir: str, folder: str, seed: int = 0) -> dict:
  import sami_jax  # pylint: disable=g-import-not-at-top
  from sami_jax.data import folder as folder_lib  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  model = sami_jax.load(workdir)
  size, channels = model.config.data.image_size, model.config.data.channels
  relpaths, images, labels = _labelled_images(folder, size, channels)
  pixels = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0
  mean, _ = model.encode(images)
  d = int(mean.shape[1])
  latent_acc = _probe_accuracy(np.asarray(mean, np.float64), labels, None, seed)
  pca_acc = _probe_accuracy(pixels, labels, d, seed)
  pixel_acc = _probe_accuracy(pixels, labels, None, seed)

  split = folder_lib.assign_splits(relpaths)
  test = set(split["test"])
  is_test = np.array([p in test for p in relpaths])
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
  clf.fit(pixels[~is_test], labels[~is_test])
  recon = np.asarray(model.reconstruct(images[is_test], seed=seed), np.float64)
  recon_pixels = recon.reshape(len(recon), -1)
  kept = float(np.mean(clf.predict(recon_pixels) == labels[is_test]))
  originals = float(clf.score(pixels[is_test], labels[is_test]))
  mse = float(np.mean((recon_pixels - pixels[is_test]) ** 2))
  return {"workdir": workdir, "kind": model.kind, "step": int(model.step), "latent_dim": d,
          "num_images": int(len(images)), "num_held_out": int(is_test.sum()),
          "latent_probe_accuracy": latent_acc[0], "latent_probe_std": latent_acc[1],
          "pixel_pca_probe_accuracy": pca_acc[0], "pixel_pca_probe_std": pca_acc[1],
          "all_pixels_probe_accuracy": pixel_acc[0],
          "reconstruction_class_kept": kept, "held_out_originals_accuracy": originals,
          "reconstruction_mse": mse}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", required=True, help="the digits folder (one sub-folder per class)")
  parser.add_argument("--workdirs", required=True, help="comma-separated run workdirs")
  parser.add_argument("--out", default="", help="JSON file for the results")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rows = [measure(w, args.folder, args.seed) for w in args.workdirs.split(",") if w]
  print("| run | kind | latent probe (5-fold) | pixel PCA, same size | all pixels | "
        "class kept by reconstruction | held-out originals | recon MSE |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['workdir']} | {r['kind']} | {r['latent_probe_accuracy']:.3f} +- "
          f"{r['latent_probe_std']:.3f} | {r['pixel_pca_probe_accuracy']:.3f} +- "
          f"{r['pixel_pca_probe_std']:.3f} | {r['all_pixels_probe_accuracy']:.3f} | "
          f"{r['reconstruction_class_kept']:.3f} ({r['num_held_out']} images) | "
          f"{r['held_out_originals_accuracy']:.3f} | {r['reconstruction_mse']:.4f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
