"""Disentanglement metrics against known ground-truth factors (MIG, DCI, SAP, FactorVAE score).

Definitions follow disentanglement_lib (Locatello et al. 2019), re-implemented here (that package
does not import on current Python/TensorFlow). Conventions shared by every function:

- Latents `z` are [N, d] (posterior means, as in disentanglement_lib), factors [N, K].
- Factors may be continuous (the Disks centre, radius, intensities). Where a metric needs discrete
  factors, each factor column is discretised with `discretize_factors`: a column with at most
  `num_bins` distinct values keeps them as classes; otherwise it is cut into `num_bins` equal-width
  bins over its (train) range, which is what disentanglement_lib does to latents
  (`_histogram_discretize`). disentanglement_lib's datasets have discrete factors only, so for
  those the two agree exactly.
- A factor may be circular (an angle in radians, e.g. the polar angle of the Disks centre, see
  `evaluation/factors.py`): pass `circular` ([K] bools). A circular column is wrapped to
  [-pi, pi) and cut into `num_bins` equal-width bins over the whole circle (`circular_bin_edges`),
  never over its observed min/max, so -pi and pi are the same bin.
- Each function returns a dict: the headline score(s) as Python floats plus the matrices behind
  them, so a report can show where a score comes from.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.metrics import mutual_info_score
from sklearn.svm import LinearSVC

from sami_jax.evaluation.probes import as_2d, check_same_length, pooled_r2

# -------------------------------------------------------------------------------- discretisation


def _bin_edges(column: np.ndarray, num_bins: int) -> np.ndarray:
  """Interior edges that map `column`'s values to labels 0..num_bins-1 with np.digitize."""
  values = np.unique(column)
  if len(values) <= num_bins:
    # Midpoints between distinct values: each value gets its own label, and an unseen value
    # (in a test split) goes to the nearest one.
    return (values[1:] + values[:-1]) / 2
  return np.histogram(column, bins=num_bins)[1][1:-1]


def circular_bin_edges(num_bins: int) -> np.ndarray:
  """Interior edges [num_bins - 1] of `num_bins` equal-width bins over [-pi, pi), in radians.

  With np.digitize, an angle wrapped to [-pi, pi) gets label j in 0..num_bins-1 when it lies in
  [-pi + j w, -pi + (j + 1) w), w = 2 pi / num_bins.
  """
  if num_bins < 2:
    raise ValueError(f"num_bins={num_bins} must be at least 2.")
  return -np.pi + 2 * np.pi * np.arange(1, num_bins) / num_bins


def _wrap(theta: np.ndarray) -> np.ndarray:
  """Angles in radians wrapped to [-pi, pi)."""
  return np.mod(theta + np.pi, 2 * np.pi) - np.pi


def check_circular(circular: Sequence[bool] | None, num_factors: int) -> np.ndarray:
  """`circular` as a bool array [K] (all False for None); ValueError on a length mismatch."""
  if circular is None:
    return np.zeros(num_factors, bool)
  flags = np.asarray(circular, bool).reshape(-1)
  if flags.shape[0] != num_factors:
    raise ValueError(f"circular has {flags.shape[0]} entries but there are {num_factors} "
                     "factors; pass one bool per factor column (True for an angle in radians).")
  return flags


def discretize_factors(train_f, *others, num_bins: int = 20,
                       circular: Sequence[bool] | None = None) -> tuple[np.ndarray, ...]:
  """Integer labels [N, K] for factors, with bins derived from `train_f` applied to all arrays.

  Args:
    train_f: [N, K] factors defining the bins.
    *others: more [M, K] factor arrays (e.g. a test split) labelled with the same bins.
    num_bins: columns with more distinct values than this are cut into this many equal-width
      bins over the train range.
    circular: [K] bools; a True column is an angle in radians, wrapped to [-pi, pi) and cut into
      `num_bins` equal-width bins over the whole circle (`circular_bin_edges`), whatever values
      it takes.

  Returns:
    A tuple of int arrays with labels in 0..num_bins-1, one per input, same shapes.
  """
  if num_bins < 2:
    raise ValueError(f"num_bins={num_bins} must be at least 2.")
  arrays = (as_2d("factors", train_f),) + tuple(as_2d("factors", o) for o in others)
  k = arrays[0].shape[1]
  for a in arrays[1:]:
    if a.shape[1] != k:
      raise ValueError(f"All factor arrays must have the same number of factors; got {k} and "
                       f"{a.shape[1]}.")
  flags = check_circular(circular, k)
  edges = [circular_bin_edges(num_bins) if flags[j] else _bin_edges(arrays[0][:, j], num_bins)
           for j in range(k)]
  return tuple(
      np.stack([np.digitize(_wrap(a[:, j]) if flags[j] else a[:, j], edges[j])
                for j in range(k)], axis=1)
      for a in arrays)


def _histogram_discretize(z: np.ndarray, num_bins: int) -> np.ndarray:
  """Equal-width bins per latent column ([N, d] -> int [N, d]), as disentanglement_lib does."""
  return np.stack([np.digitize(z[:, i], np.histogram(z[:, i], bins=num_bins)[1][1:-1])
                   for i in range(z.shape[1])], axis=1)


def _entropy(p: np.ndarray, base: float, axis: int = 0) -> np.ndarray:
  """Shannon entropy of the (unnormalised, non-negative) distributions along `axis`.

  A distribution with zero total mass gets entropy `log(base)` in units of log base (1: maximally
  uncertain), so it scores 0 in the DCI "1 - entropy" scores.
  """
  total = p.sum(axis=axis, keepdims=True)
  q = np.divide(p, total, out=np.full_like(p, 1.0 / p.shape[axis], dtype=np.float64),
                where=total > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(q > 0, q * np.log(q), 0.0)
  return -terms.sum(axis=axis) / np.log(base)


def _top_two_gap(score: np.ndarray) -> np.ndarray:
  """score [d, K] -> [K]: the largest minus the second largest entry of each column."""
  s = np.sort(score, axis=0)
  return s[-1] - s[-2]


def _require_two_latents(z: np.ndarray, metric: str) -> None:
  if z.shape[1] < 2:
    raise ValueError(f"{metric} compares the best latent with the second best, so it needs at "
                     f"least 2 latent dimensions; got {z.shape[1]}.")


# -------------------------------------------------------------------------------- MIG


def mig(z, factors, num_bins: int = 20, *, circular: Sequence[bool] | None = None) -> dict:
  """Mutual Information Gap (Chen et al. 2018), disentanglement_lib's discretised estimator.

  Latents and factors are discretised (`num_bins` equal-width bins per latent; factors as in
  `discretize_factors`, circular ones over the whole circle); I(z_i; f_k) is the plug-in mutual
  information of the discrete labels.

      MIG = mean_k [ (I(z_(1); f_k) - I(z_(2); f_k)) / H(f_k) ]

  where z_(1), z_(2) are the two latents with the most information about f_k.

  Args:
    z: [N, d] latents, d >= 2.
    factors: [N, K] ground-truth factors.
    num_bins: bins per latent / continuous factor.
    circular: [K] bools, True for a factor that is an angle in radians (see the module docstring).

  Returns:
    "mig": float in [0, 1] (1: each factor in exactly one latent; about 0: none, though the plug-in
      estimator is biased upwards by about (num_bins - 1)^2 / (2 N) nats per pair);
    "per_factor": [K] normalised gaps (NaN for a constant factor, excluded from the mean);
    "mutual_info": [d, K] in nats; "factor_entropy": [K] in nats.
  """
  z = as_2d("z", z)
  f = as_2d("factors", factors)
  check_same_length(z=z, factors=f)
  _require_two_latents(z, "MIG")
  zd = _histogram_discretize(z, num_bins)
  (fd,) = discretize_factors(f, num_bins=num_bins, circular=circular)
  d, k = z.shape[1], f.shape[1]
  mi = np.array([[mutual_info_score(fd[:, j], zd[:, i]) for j in range(k)] for i in range(d)])
  h = np.array([mutual_info_score(fd[:, j], fd[:, j]) for j in range(k)])
  with np.errstate(divide="ignore", invalid="ignore"):
    per_factor = np.where(h > 0, _top_two_gap(mi) / np.where(h > 0, h, 1.0), np.nan)
  score = float(np.nanmean(per_factor)) if np.any(h > 0) else float("nan")
  return {"mig": score, "per_factor": per_factor, "mutual_info": mi, "factor_entropy": h}


# -------------------------------------------------------------------------------- DCI


# Settings of disentanglement_lib's DCI (`compute_importance_gbt`): sklearn's
# GradientBoostingClassifier with its default arguments.
LIBRARY_NUM_TREES = 100
LIBRARY_MAX_DEPTH = 3
LIBRARY_LEARNING_RATE = 0.1
DCI_MODES = ("classification", "regression")


def dci(z_train, f_train, z_test, f_test, *, mode: str = "classification",
        num_trees: int = LIBRARY_NUM_TREES, max_depth: int = LIBRARY_MAX_DEPTH,
        learning_rate: float = LIBRARY_LEARNING_RATE, num_bins: int = 20,
        circular: Sequence[bool] | None = None, seed: int = 0) -> dict:
  """Disentanglement, Completeness, Informativeness (Eastwood & Williams 2018).

  The defaults reproduce disentanglement_lib's DCI (`dci.py`, `compute_importance_gbt`):

  - For each factor k, a GradientBoostingClassifier with sklearn's default settings (100 boosting
    stages of depth-3 regression trees, learning rate 0.1, every sample and every latent at each
    split) is fitted on the train split to predict the factor's class from all d latents (raw
    values; trees do not care about the scale of a latent).
  - Column k of the importance matrix R [d, K] is |feature_importances_| of that model:
    sklearn's impurity-based importances, which sum to 1 over the latents (0 if the model never
    split). R is not normalised further.
  - From R (`dci_from_importance`):

        disentanglement = sum_i rho_i (1 - H_K(P_i)),  P_i = R[i, :] / R[i, :].sum(),
        completeness    = sum_k rho_k (1 - H_d(Q_k)),  Q_k = R[:, k] / R[:, k].sum(),

    where rho_i = R[i, :].sum() / R.sum(), rho_k = R[:, k].sum() / R.sum(), and the entropies
    are in base K (resp. d), so both scores are in [0, 1].
  - informativeness = mean over factors of the classifier's accuracy on the test split
    (disentanglement_lib's "informativeness_test"; "informativeness_train" on the train split).

  Where this differs from disentanglement_lib, and why:
  - Continuous factors are discretised first (`discretize_factors`, bins from the train split;
    circular factors over the whole circle). disentanglement_lib's datasets only have discrete
    factors, which are kept as they are here too (a column with <= num_bins distinct values).
  - random_state=seed, where disentanglement_lib leaves it unset: with all features considered
    at every split it only breaks ties between equally good splits, and fixing it makes the
    score reproducible.
  - disentanglement_lib adds 1e-11 to R before the entropies; that moves a score by about 1e-10
    per zero entry of R and is not done here. With K = 1 (or d = 1) the entropy base is 1, which disentanglement_lib
    turns into NaN; here that score is defined as 1 (see `dci_from_importance`).

  Fewer trees are not a faithful shortcut: the importances of 10 stages differ from those of 100,
  e.g. on latents that rotate the factors (measured on 800 samples of 3 uniform factors mixed by a
  random rotation, 5 bins: disentanglement 0.262 with 10 stages, 0.177 with 100, and 0.176 from
  the library's recipe run directly: sklearn's GradientBoostingClassifier() and scipy entropies).
  Cost: one tree per class per stage, so about num_bins * 100 trees per factor; measured on a
  2-core CPU, 2,000 train + 2,000 test samples, d = 10, K = 3 continuous factors, 20 bins: 85 s
  (mode="regression" on the same arrays: 2.3 s).

  mode="regression" is NOT part of disentanglement_lib; it is an extension for continuous factors
  (no binning): a GradientBoostingRegressor (squared error, same num_trees / max_depth /
  learning_rate) per factor, importances and D / C as above, and informativeness is the mean
  test R^2 (1 - SS_res / SS_tot) instead of an accuracy. A circular factor is fitted as two
  regressors, on cos(theta) and sin(theta); its importance column is the mean of the two
  (still summing to 1) and its R^2 is the pooled R^2 over both targets (`probes.pooled_r2`).
  Its D and C are not comparable with published DCI numbers (on the arrays of the timing above:
  disentanglement 0.52 in regression mode, 0.14 in classification mode), and its
  informativeness is not comparable with classification accuracy.

  Args:
    z_train, f_train: [N, d] latents and [N, K] factors used to fit the trees.
    z_test, f_test: [M, d], [M, K] held-out pairs for informativeness.
    mode: "classification" (disentanglement_lib) or "regression" (see above).
    num_trees: boosting stages per factor (disentanglement_lib: 100).
    max_depth: depth of each tree (disentanglement_lib: 3).
    learning_rate: boosting shrinkage (disentanglement_lib: 0.1).
    num_bins: bins for continuous factors (classification mode).
    circular: [K] bools, True for a factor that is an angle in radians.
    seed: random_state of the tree ensembles.

  Returns:
    "disentanglement", "completeness", "informativeness" (test), "informativeness_train": floats;
    "importance": [d, K]; "informativeness_per_factor": [K] (test);
    "settings": dict of what was run: mode, estimator (sklearn class name), num_trees, max_depth,
      learning_rate, random_state, num_bins (None in regression mode), circular ([K] bools),
      informativeness_measure ("test accuracy" or "test R^2"), disentanglement_lib_settings
      (True when mode, num_trees, max_depth and learning_rate are the library's) and
      description (one line for a report).
  """
  if mode not in DCI_MODES:
    raise ValueError(f"dci mode must be one of {DCI_MODES}; got {mode!r}.")
  if num_trees < 1 or max_depth < 1 or not learning_rate > 0:
    raise ValueError(f"num_trees ({num_trees}) and max_depth ({max_depth}) must be >= 1 and "
                     f"learning_rate ({learning_rate}) > 0.")
  z_train, f_train = as_2d("z_train", z_train), as_2d("f_train", f_train)
  z_test, f_test = as_2d("z_test", z_test), as_2d("f_test", f_test)
  check_same_length(z_train=z_train, f_train=f_train)
  check_same_length(z_test=z_test, f_test=f_test)
  if z_train.shape[1] != z_test.shape[1] or f_train.shape[1] != f_test.shape[1]:
    raise ValueError(f"train and test must have the same latent and factor dims; got "
                     f"z {z_train.shape[1]} vs {z_test.shape[1]}, f {f_train.shape[1]} vs "
                     f"{f_test.shape[1]}.")
  d, k = z_train.shape[1], f_train.shape[1]
  flags = check_circular(circular, k)
  kwargs = dict(n_estimators=num_trees, max_depth=max_depth, learning_rate=learning_rate,
                random_state=seed)
  importance = np.zeros((d, k))
  info_train, info_test = np.zeros(k), np.zeros(k)
  if mode == "classification":
    y_train, y_test = discretize_factors(f_train, f_test, num_bins=num_bins, circular=flags)
    for j in range(k):
      if len(np.unique(y_train[:, j])) < 2:
        # A constant factor cannot be classified (sklearn refuses); it carries no importance and
        # is trivially "predicted".
        info_train[j] = info_test[j] = 1.0
        continue
      model = GradientBoostingClassifier(**kwargs).fit(z_train, y_train[:, j])
      importance[:, j] = np.abs(model.feature_importances_)
      info_train[j] = np.mean(model.predict(z_train) == y_train[:, j])
      info_test[j] = np.mean(model.predict(z_test) == y_test[:, j])
  else:
    for j in range(k):
      if flags[j]:
        t_train = np.stack([np.cos(f_train[:, j]), np.sin(f_train[:, j])], axis=1)
        t_test = np.stack([np.cos(f_test[:, j]), np.sin(f_test[:, j])], axis=1)
      else:
        t_train, t_test = f_train[:, j:j + 1], f_test[:, j:j + 1]
      models = [GradientBoostingRegressor(**kwargs).fit(z_train, t_train[:, c])
                for c in range(t_train.shape[1])]
      importance[:, j] = np.mean([np.abs(m.feature_importances_) for m in models], axis=0)
      info_train[j] = pooled_r2(t_train, np.stack([m.predict(z_train) for m in models], 1))
      info_test[j] = pooled_r2(t_test, np.stack([m.predict(z_test) for m in models], 1))

  disent, complete = dci_from_importance(importance)
  library = (mode == "classification" and num_trees == LIBRARY_NUM_TREES
             and max_depth == LIBRARY_MAX_DEPTH and learning_rate == LIBRARY_LEARNING_RATE)
  estimator = ("GradientBoostingClassifier" if mode == "classification"
               else "GradientBoostingRegressor")
  measure = "test accuracy" if mode == "classification" else "test R^2"
  binning = (f"continuous factors in {num_bins} equal-width bins" if mode == "classification"
             else "factors as they are, circular ones as (cos, sin)")
  settings = {
      "mode": mode, "estimator": estimator, "num_trees": int(num_trees),
      "max_depth": int(max_depth), "learning_rate": float(learning_rate), "random_state": seed,
      "num_bins": int(num_bins) if mode == "classification" else None,
      "circular": [bool(c) for c in flags], "informativeness_measure": measure,
      "disentanglement_lib_settings": library,
      "description": (f"{estimator}(n_estimators={num_trees}, max_depth={max_depth}, "
                      f"learning_rate={learning_rate}) per factor, {binning}; "
                      f"informativeness = {measure}"
                      + ("; disentanglement_lib's settings" if library
                         else "; NOT disentanglement_lib's settings")),
  }
  return {"disentanglement": disent, "completeness": complete,
          "informativeness": float(np.nanmean(info_test)),
          "informativeness_train": float(np.nanmean(info_train)),
          "importance": importance, "informativeness_per_factor": info_test,
          "settings": settings}


def dci_from_importance(importance) -> tuple[float, float]:
  """(disentanglement, completeness) of an importance matrix R [d, K] (see `dci`).

  disentanglement_lib's definition: 1 - entropy of each row (base K) / column (base d) of R
  normalised to sum 1, averaged with weights proportional to the row / column sums. An all-zero
  R gives (0, 0), as in disentanglement_lib. With K = 1 (or d = 1) the entropy base is 1 and the
  score is defined as 1 (a single factor cannot be shared, a single code cannot be split);
  disentanglement_lib returns NaN there.
  """
  r = np.abs(np.asarray(importance, np.float64))
  if r.ndim != 2:
    raise ValueError(f"importance must be [num_latents, num_factors]; got shape {r.shape}.")
  d, k = r.shape
  total = r.sum()
  if total == 0:
    return 0.0, 0.0
  per_code = 1.0 - _entropy(r, base=k, axis=1) if k > 1 else np.ones(d)
  per_factor = 1.0 - _entropy(r, base=d, axis=0) if d > 1 else np.ones(k)
  disent = float(np.sum(per_code * r.sum(axis=1) / total))
  complete = float(np.sum(per_factor * r.sum(axis=0) / total))
  return disent, complete


# -------------------------------------------------------------------------------- SAP


def sap(z_train, f_train, z_test=None, f_test=None, *, continuous_factors: bool = True,
        svm_c: float = 0.01, circular: Sequence[bool] | None = None) -> dict:
  """Separated Attribute Predictability (Kumar et al. 2018), as in disentanglement_lib.

  A score matrix S [d, K] says how well each single latent predicts each factor:
    continuous_factors=True: S[i, k] = Pearson correlation^2 of z_i and f_k on the train split
      (0 for a latent with variance < 1e-12); the test split is not used.
    continuous_factors=False: S[i, k] = test accuracy of a linear SVM (C = svm_c, balanced class
      weights) fitted on z_i alone to predict the discrete factor f_k.
  SAP = mean_k (largest - second largest S[:, k]).
  A circular factor (an angle in radians; continuous factors only) is scored on its 2-D target
  (cos f_k, sin f_k): S[i, k] is the pooled R^2 of the least-squares line from z_i to both,
  sum_c corr(z_i, c)^2 var(c) / sum_c var(c) (the squared correlation, for one target).

  Args:
    z_train, f_train: [N, d], [N, K].
    z_test, f_test: [M, d], [M, K]; required when continuous_factors is False.
    continuous_factors: see above.
    svm_c: SVM regularisation (discrete factors only).

  Returns:
    "sap": float in [0, 1]; "score_matrix": [d, K]; "per_factor": [K].
  """
  z_train, f_train = as_2d("z_train", z_train), as_2d("f_train", f_train)
  check_same_length(z_train=z_train, f_train=f_train)
  _require_two_latents(z_train, "SAP")
  d, k = z_train.shape[1], f_train.shape[1]
  circ = check_circular(circular, k)
  if circ.any() and not continuous_factors:
    raise ValueError("sap: circular factors are supported with continuous_factors=True only.")
  score = np.zeros((d, k))
  if continuous_factors:
    zc = z_train - z_train.mean(axis=0)
    n = z_train.shape[0]
    var_z = (zc ** 2).sum(axis=0) / (n - 1)

    def r2_with(column: np.ndarray) -> tuple[np.ndarray, float]:
      """(squared correlation of each latent with `column` [d], variance of the column)."""
      fc = column - column.mean()
      cov = zc.T @ fc / (n - 1)
      var_f = float((fc ** 2).sum() / (n - 1))
      ok = (var_z > 1e-12) & (var_f > 0)
      with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, cov ** 2 / (var_z * var_f), 0.0), var_f

    for j in range(k):
      if circ[j]:
        (r_cos, v_cos), (r_sin, v_sin) = (r2_with(np.cos(f_train[:, j])),
                                          r2_with(np.sin(f_train[:, j])))
        total = v_cos + v_sin
        score[:, j] = (r_cos * v_cos + r_sin * v_sin) / total if total > 0 else 0.0
      else:
        score[:, j] = r2_with(f_train[:, j])[0]
  else:
    if z_test is None or f_test is None:
      raise ValueError("sap with continuous_factors=False needs z_test and f_test (the SVM "
                       "accuracies are measured on held-out data).")
    z_test, f_test = as_2d("z_test", z_test), as_2d("f_test", f_test)
    check_same_length(z_test=z_test, f_test=f_test)
    for j in range(k):
      if len(np.unique(f_train[:, j])) < 2:
        continue  # a constant factor is predicted equally well by every latent: gap 0.
      for i in range(d):
        clf = LinearSVC(C=svm_c, class_weight="balanced", random_state=0)
        clf.fit(z_train[:, i:i + 1], f_train[:, j])
        score[i, j] = np.mean(clf.predict(z_test[:, i:i + 1]) == f_test[:, j])
  per_factor = _top_two_gap(score)
  return {"sap": float(np.mean(per_factor)), "score_matrix": score, "per_factor": per_factor}


# -------------------------------------------------------------------------------- FactorVAE

FixedFactorSampler = Callable[[int, np.random.Generator], np.ndarray]


def factorvae_score(sample_fixed_factor_batch: FixedFactorSampler, num_factors: int,
                    global_z, *, num_train: int = 10000, num_eval: int = 5000,
                    prune_threshold: float = 0.05, seed: int = 0) -> dict:
  """FactorVAE score (Kim & Mnih 2018), with disentanglement_lib's protocol.

  Each "vote" fixes one factor k (chosen uniformly at random), draws a batch of samples that share
  that factor's value (everything else varies), and records the latent with the smallest variance
  across the batch, relative to its global variance. A majority-vote classifier maps each latent to
  the factor it most often "voted" for; the score is that classifier's accuracy on fresh votes.

  The caller supplies the sampling of fixed-factor batches, so this works with a ground-truth
  simulator (render images with factor k fixed, then encode) as well as with a finite dataset
  (see `factorvae_score_from_dataset`).

  Differences from disentanglement_lib, on purpose: a vote is recorded at the latent's index in
  the full latent vector (disentanglement_lib indexes by position among the active latents, which
  mislabels votes when an early latent is pruned); votes use an explicit numpy Generator.

  Args:
    sample_fixed_factor_batch: (factor_index, rng) -> [B, d] latents of B >= 2 samples that all
      share one (randomly chosen) value of factor `factor_index`.
    num_factors: K; factor indices 0..K-1 are sampled uniformly.
    global_z: [N, d] latents of random samples, for the global variances and pruning.
    num_train: votes used to build the majority-vote classifier (disentanglement_lib: 10000).
    num_eval: votes used to measure its accuracy (disentanglement_lib: 5000).
    prune_threshold: latents whose global standard deviation is below this are "collapsed" and
      never vote.
    seed: seeds the Generator passed to the sampler.

  Returns:
    "factorvae": eval accuracy in [0, 1] (1: every factor owns a latent; latents independent of
      the factors score about chance, 1/K plus a small majority-vote bias, not 0);
    "train_accuracy"; "num_active_dims"; "votes": [d, K] train vote counts.
  """
  if num_factors < 1:
    raise ValueError(f"num_factors={num_factors} must be >= 1.")
  if num_train < 1 or num_eval < 1:
    raise ValueError(f"num_train ({num_train}) and num_eval ({num_eval}) must be >= 1.")
  global_z = as_2d("global_z", global_z)
  d = global_z.shape[1]
  global_var = np.var(global_z, axis=0, ddof=1)
  active = np.sqrt(global_var) >= prune_threshold
  if not np.any(active):
    return {"factorvae": 0.0, "train_accuracy": 0.0, "num_active_dims": 0,
            "votes": np.zeros((d, num_factors), np.int64)}
  active_idx = np.flatnonzero(active)
  rng = np.random.default_rng(seed)

  def votes(n: int) -> np.ndarray:
    counts = np.zeros((d, num_factors), np.int64)
    for _ in range(n):
      k = int(rng.integers(num_factors))
      batch = np.asarray(sample_fixed_factor_batch(k, rng), np.float64)
      if batch.ndim != 2 or batch.shape[1] != d or batch.shape[0] < 2:
        raise ValueError(f"sample_fixed_factor_batch must return [B >= 2, {d}] latents; got "
                         f"shape {batch.shape}.")
      local_var = np.var(batch[:, active_idx], axis=0, ddof=1)
      counts[active_idx[np.argmin(local_var / global_var[active_idx])], k] += 1
    return counts

  train_votes = votes(num_train)
  eval_votes = votes(num_eval)
  classifier = np.argmax(train_votes, axis=1)  # latent -> factor
  rows = np.arange(d)
  train_acc = train_votes[rows, classifier].sum() / train_votes.sum()
  eval_acc = eval_votes[rows, classifier].sum() / eval_votes.sum()
  return {"factorvae": float(eval_acc), "train_accuracy": float(train_acc),
          "num_active_dims": int(active.sum()), "votes": train_votes}


def factorvae_score_from_dataset(z, factors, *, batch_size: int = 64, num_bins: int = 20,
                                 circular: Sequence[bool] | None = None, **kwargs) -> dict:
  """FactorVAE score on a finite dataset: "fixing" a factor means sharing its discretised value.

  A fixed-factor batch for factor k: pick a random sample, take its label of factor k (factors
  discretised with `discretize_factors`), and draw `batch_size` samples (without replacement when
  there are enough) among those with the same label. Continuous factors are thereby fixed up to
  the bin width; other factors vary as they do in the data.

  Args:
    z: [N, d] latents; also used for the global variances.
    factors: [N, K] ground-truth factors.
    batch_size: samples per vote (disentanglement_lib: 64).
    num_bins: bins for continuous factors.
    circular: [K] True for an angle (binned over the whole circle, see `discretize_factors`).
    **kwargs: num_train, num_eval, prune_threshold, seed (see `factorvae_score`).

  Returns:
    See `factorvae_score`.
  """
  z = as_2d("z", z)
  f = as_2d("factors", factors)
  check_same_length(z=z, factors=f)
  if batch_size < 2:
    raise ValueError(f"batch_size={batch_size} must be >= 2 (a variance needs two samples).")
  (labels,) = discretize_factors(f, num_bins=num_bins, circular=circular)
  groups = [{v: np.flatnonzero(labels[:, k] == v) for v in np.unique(labels[:, k])}
            for k in range(f.shape[1])]

  def sampler(k: int, rng: np.random.Generator) -> np.ndarray:
    members = groups[k][labels[rng.integers(len(z)), k]]
    replace = len(members) < batch_size
    return z[rng.choice(members, size=batch_size, replace=replace)]

  return factorvae_score(sampler, f.shape[1], z, **kwargs)


# -------------------------------------------------------------------------------- simple summaries


def correlation_matrix(z, factors) -> np.ndarray:
  """|Pearson correlation| between each latent and each factor.

  Args:
    z: [N, d] latents. factors: [N, K].

  Returns:
    [d, K] in [0, 1]; 0 where a latent or factor is constant.
  """
  z = as_2d("z", z)
  f = as_2d("factors", factors)
  check_same_length(z=z, factors=f)
  zc = z - z.mean(axis=0)
  fc = f - f.mean(axis=0)
  nz = np.linalg.norm(zc, axis=0)
  nf = np.linalg.norm(fc, axis=0)
  denom = nz[:, None] * nf[None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    corr = np.where(denom > 0, np.abs(zc.T @ fc) / np.where(denom > 0, denom, 1.0), 0.0)
  return np.clip(corr, 0.0, 1.0)


def rank_latents_by_kl(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """Orders latent dimensions by their average KL(q(z_i | x) || N(0, 1)) over a dataset.

  Dimensions with KL near 0 are unused ("collapsed" to the prior); traversals and reports usually
  show the highest-KL dimensions first.

  Args:
    mean: [N, d] posterior means. std: [N, d] posterior standard deviations (> 0).

  Returns:
    order: [d] int, dimension indices by decreasing KL (ties keep index order);
    kl_per_dim: [d] mean KL per dimension, nats.
  """
  mean = as_2d("mean", mean)
  std = as_2d("std", std)
  if mean.shape != std.shape:
    raise ValueError(f"mean {mean.shape} and std {std.shape} must have the same shape.")
  if np.any(std <= 0):
    raise ValueError("std must be strictly positive (pass exp(0.5 * log_var) if the encoder "
                     "returns log-variances).")
  kl = 0.5 * (mean ** 2 + std ** 2 - 1.0 - 2.0 * np.log(std))
  kl_per_dim = kl.mean(axis=0)
  order = np.argsort(-kl_per_dim, kind="stable")
  return order, kl_per_dim
