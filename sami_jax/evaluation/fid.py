"""Frechet Inception Distance from feature statistics (Heusel et al. 2017).

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

between Gaussians fitted to the pool3 Inception features (`inception.py`) of two image sets.
The numerics follow pytorch-fid: float64 statistics, covariance with N - 1 normalisation, scipy's
`sqrtm`, a small diagonal offset when the product is singular, and the real part of the square
root when rounding leaves a negligible imaginary part.

Reference statistics (of a dataset) are cached as .npz files holding `mu` [D] and `sigma` [D, D]
(the format pytorch-fid also writes), so they are computed once per dataset and feature network.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from scipy import linalg

from sami_jax.evaluation.probes import as_2d


def stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features.

  Args:
    features: [N, D] features (N >= 2), e.g. [N, 2048] Inception pool3 activations.

  Returns:
    mu: [D] float64; sigma: [D, D] float64 (unbiased, N - 1 normalisation).
  """
  f = as_2d("features", features)
  if f.shape[0] < 2:
    raise ValueError(f"stats needs at least 2 feature vectors for a covariance; got {f.shape[0]}. "
                     "FID is usually computed from 10,000-50,000 images.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances (symmetric PSD).
    eps: diagonal offset added to both covariances when sqrtm(sigma1 @ sigma2) is not finite
      (a singular product, e.g. fewer samples than dimensions).

  Returns:
    The distance (squared units of the features), >= 0 up to rounding.

  Raises:
    ValueError: on shape mismatch, or if the matrix square root has a large imaginary part (the
      covariances are not PSD, e.g. corrupted statistics files).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"Shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
                     f"{mu2.shape}, sigma2 {sigma2.shape}; expected [D] and [D, D] for both sets "
                     "(were both computed with the same feature network?).")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {max_imag:.3g}; the "
                       "covariances are probably not positive semi-definite. Recompute the "
                       "statistics from the features (and delete a stale cached .npz).")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
  """FID between two feature sets ([N1, D], [N2, D])."""
  return frechet_distance(*stats(features1), *stats(features2))


def save_stats(path: str, mu, sigma) -> None:
  """Writes `mu` [D] and `sigma` [D, D] to an .npz file (parent directories are created)."""
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"mu must be [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}.")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # Write to a temporary name and rename, so an interrupted run never leaves a truncated cache.
  tmp = path + ".tmp.npz"
  np.savez(tmp, mu=mu, sigma=sigma)
  os.replace(tmp, path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu [D], sigma [D, D]) from an .npz written by `save_stats` or pytorch-fid."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No FID statistics file at {path}. Compute it from features with "
                            "fid.stats(...) and fid.save_stats(path, mu, sigma), or use "
                            "fid.cached_stats(path, compute_features).")
  with np.load(path) as data:
    if "mu" not in data or "sigma" not in data:
      raise ValueError(f"{path} is not an FID statistics file: it has keys {sorted(data.keys())}, "
                       "expected 'mu' and 'sigma'. Delete it and recompute.")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]. "
                     "Delete it and recompute.")
  return mu, sigma


def cached_stats(path: str, compute_features: Callable[[], np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reference statistics from `path` if it exists, else computed once and saved there.

  Args:
    path: .npz cache file. Its name should identify the dataset, split, resolution and feature
      network: the cache is not invalidated when any of these change.
    compute_features: called only on a cache miss; returns [N, D] features.

  Returns:
    (mu [D], sigma [D, D]).
  """
  if os.path.exists(path):
    return load_stats(path)
  mu, sigma = stats(compute_features())
  save_stats(path, mu, sigma)
  return mu, sigma
