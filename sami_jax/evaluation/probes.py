"""Probes: how much of each ground-truth factor can be read off the latents.

A factor is "recovered" when a simple regressor fitted on (latent, factor) pairs from a training
set predicts it on held-out data. Two regressors bracket what "simple" means: a linear regression
(the factor is a linear function of the latents) and a k-nearest-neighbours regressor (the factor
is any smooth function of the latents). Both see latents standardised with train statistics, so
the kNN distance does not depend on the arbitrary scale of each latent dimension.

A circular factor (an angle theta in radians, e.g. the polar angle of the Disks centre, see
`evaluation/factors.py`) is not regressed as a number: theta and theta + 2 pi are the same
position, and a regressor of theta itself is penalised by ~(2 pi)^2 for a prediction on the wrong
side of the cut at -pi/pi. It is regressed as the point (cos theta, sin theta) on the unit circle,
and scored with `pooled_r2`.
"""

from __future__ import annotations

from typing import Sequence

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


def factor_r2(train_z, train_f, test_z, test_f, *, knn_neighbors: int = 10,
              circular: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Test-set R^2 of each factor predicted from the latents by a linear and a kNN regressor.

  Args:
    train_z: [N_train, d] latents (e.g. posterior means) of the probe's training set.
    train_f: [N_train, K] ground-truth factors of the same samples (any units; radians for a
      circular factor).
    test_z: [N_test, d] latents of held-out samples.
    test_f: [N_test, K] their factors.
    knn_neighbors: k of the kNN regressor (uniform weights, Euclidean distance on latents
      standardised with train statistics).
    circular: [K] bools (default all False). A circular factor theta is predicted as the 2-D
      target (cos theta, sin theta) and scored with the pooled R^2 over both coordinates
      (`pooled_r2`: one R^2 of the 2-D target, 1 - total squared error / total variance), which
      does not depend on where the angle's zero is. A non-circular factor is predicted and
      scored on its own, exactly as without this argument.

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
  k = train_f.shape[1]
  if circular is None:
    flags = [False] * k
  else:
    flags = [bool(c) for c in np.asarray(circular, bool).reshape(-1)]
    if len(flags) != k:
      raise ValueError(f"circular has {len(flags)} entries but there are {k} factors; pass one "
                       "bool per factor column (True for an angle in radians).")
  train_t, cols = circular_targets(train_f, flags)
  test_t, _ = circular_targets(test_f, flags)

  train_zs, test_zs = standardize(train_z, test_z)
  out = {}
  for name, model in (("linear", LinearRegression()),
                      ("knn", KNeighborsRegressor(n_neighbors=knn_neighbors))):
    # Both regressors fit each target column independently (kNN: same neighbours, mean per
    # column), so adding the (cos, sin) columns leaves the other factors' predictions unchanged.
    pred = model.fit(train_zs, train_t).predict(test_zs).reshape(test_t.shape)
    out[name] = np.array([pooled_r2(test_t[:, c], pred[:, c]) for c in cols])
  return out


def circular_targets(f: np.ndarray, circular: Sequence[bool]) -> tuple[np.ndarray, list]:
  """Regression targets of factors [N, K]: a circular column theta becomes cos theta, sin theta.

  Returns:
    targets [N, K + number of circular columns]; for each factor, the list of its target columns.
  """
  columns, cols = [], []
  for j, is_circular in enumerate(circular):
    start = len(columns)
    if is_circular:
      columns += [np.cos(f[:, j]), np.sin(f[:, j])]
    else:
      columns.append(f[:, j])
    cols.append(list(range(start, len(columns))))
  return np.stack(columns, axis=1), cols


def pooled_r2(y, pred) -> float:
  """One R^2 of a (possibly multi-dimensional) target: 1 - sum ||y - pred||^2 / sum ||y - mean||^2.

  For a 1-D target this is the usual R^2. For the 2-D target (cos theta, sin theta) of an angle
  it is the fraction of the unit vector's total variance that the prediction explains, the same
  whichever direction is called theta = 0 (the mean of the two separate R^2 is not: it weights
  cos and sin equally even when the angle barely moves along one of them).

  Args:
    y, pred: [N] or [N, D] targets and predictions.

  Returns:
    float; NaN when y is constant (R^2 is undefined there).
  """
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  pred = np.asarray(pred, np.float64).reshape(y.shape)
  total = float(((y - y.mean(axis=0)) ** 2).sum())
  if total == 0:
    return float("nan")
  return 1.0 - float(((y - pred) ** 2).sum()) / total
