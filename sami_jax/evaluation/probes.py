"""Probes: how much of each ground-truth factor can be read off the latents.

A factor is "recovered" when a simple regressor fitted on (latent, factor) pairs from a training
set predicts it on held-out data. Two regressors bracket what "simple" means: a linear regression
(the factor is a linear function of the latents) and a k-nearest-neighbours regressor (the factor
is any smooth function of the latents). Both see latents standardised with train statistics, so
the kNN distance does not depend on the arbitrary scale of each latent dimension.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor

# Dimensions whose train standard deviation is below this are left unscaled (divided by 1):
# a collapsed latent carries no information and must not be blown up into noise.
_MIN_STD = 1e-8


def as_2d(name: str, x, *, dtype=np.float64) -> np.ndarray:
  """Converts `x` (numpy, JAX or list) to a finite 2-D numpy array [N, D] or raises ValueError.

  A 1-D input is read as N samples of one dimension.
  """
  x = np.asarray(x, dtype=dtype)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array [num_samples, dims]; got shape {x.shape}. "
                     "Flatten extra axes (e.g. x.reshape(len(x), -1)) before calling.")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one sample and one dim.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf values; the model that produced it has probably "
                     "diverged. Check the checkpoint or drop those samples.")
  return x


def check_same_length(**arrays: np.ndarray) -> None:
  """Raises ValueError unless all arrays have the same number of rows."""
  lengths = {k: v.shape[0] for k, v in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"These arrays must have the same number of samples (rows): {lengths}.")


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Standardises `train` and `others` ([N, D] each) with the train mean and std per column."""
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std < _MIN_STD, 1.0, std)
  return tuple((x - mean) / std for x in (train,) + others)


def factor_r2(train_z, train_f, test_z, test_f, *,
              knn_neighbors: int = 10) -> dict[str, np.ndarray]:
  """Test-set R^2 of each factor predicted from the latents by a linear and a kNN regressor.

  Args:
    train_z: [N_train, d] latents (e.g. posterior means) of the probe's training set.
    train_f: [N_train, K] ground-truth factors of the same samples (any units).
    test_z: [N_test, d] latents of held-out samples.
    test_f: [N_test, K] their factors.
    knn_neighbors: k of the kNN regressor (uniform weights, Euclidean distance on latents
      standardised with train statistics).

  Returns:
    {"linear": [K], "knn": [K]}: coefficient of determination 1 - SS_res / SS_tot on the test set,
    per factor. 1 is perfect; 0 is as good as predicting the test mean; it can be negative.
    A factor that is constant on the test set gets NaN (R^2 is undefined there).
  """
  train_z = as_2d("train_z", train_z)
  train_f = as_2d("train_f", train_f)
  test_z = as_2d("test_z", test_z)
  test_f = as_2d("test_f", test_f)
  check_same_length(train_z=train_z, train_f=train_f)
  check_same_length(test_z=test_z, test_f=test_f)
  if train_z.shape[1] != test_z.shape[1]:
    raise ValueError(f"train_z has {train_z.shape[1]} latent dims but test_z has "
                     f"{test_z.shape[1]}; encode both sets with the same model.")
  if train_f.shape[1] != test_f.shape[1]:
    raise ValueError(f"train_f has {train_f.shape[1]} factors but test_f has {test_f.shape[1]}.")
  if not 1 <= knn_neighbors <= train_z.shape[0]:
    raise ValueError(f"knn_neighbors={knn_neighbors} must be between 1 and the number of "
                     f"training samples ({train_z.shape[0]}).")

  train_zs, test_zs = standardize(train_z, test_z)
  out = {}
  for name, model in (("linear", LinearRegression()),
                      ("knn", KNeighborsRegressor(n_neighbors=knn_neighbors))):
    pred = model.fit(train_zs, train_f).predict(test_zs).reshape(test_f.shape)
    out[name] = _r2_per_column(test_f, pred)
  return out


def _r2_per_column(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """R^2 per column of [N, K] arrays; NaN where the target column is constant."""
  var = y.var(axis=0)
  r2 = np.asarray(r2_score(y, pred, multioutput="raw_values"), np.float64)
  # sklearn returns 0 or 1 for constant targets; neither means anything, so say so.
  return np.where(var > 0, r2, np.nan)
