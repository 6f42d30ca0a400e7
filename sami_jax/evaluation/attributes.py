"""Binary-attribute metrics for CelebA-like data: single-latent AUROC, TAD / ATTRS, linear probe.

Definitions (as in InfoDiffusion, Wang et al. 2023, whose TAD code follows NashAE, Yeats et al.
2022; DisDiff reports the same two numbers):

- Single-latent AUROC: for attribute a_k and latent z_i, AUROC[k, i] = max(A, 1 - A) where A is
  the area under the ROC curve when z_i itself is the score (the sign of a latent is arbitrary).
  Ties count 1/2 (the Mann-Whitney statistic), as sklearn's roc_auc_score does.
- TAD (Total AUROC Difference): for each attribute, the gap between its best and second-best
  single-latent AUROC, summed over the "captured" attributes: those whose best AUROC is at least
  `auroc_threshold` (0.75) and that are not largely predictable from another attribute, i.e. whose
  entropy reduction max_{j != k} I(a_k; a_j) / H(a_k) is at most `entropy_reduction_threshold`
  (0.2). ATTRS is the number of captured attributes. Larger is better for both.
  InfoDiffusion computes them on each training fold of a 5-fold split of 10,000 CelebA images
  (latents standardised, which does not change AUROCs) and reports the mean over folds; here one
  call is one such evaluation, the caller chooses the samples.
- Linear-probe AUROC: a logistic regression per attribute fitted on train latents (standardised
  with train statistics) and scored by AUROC on test latents; reported as the mean over attributes.

Attributes are binary; {0, 1}, {-1, 1} (the raw CelebA encoding) and booleans are accepted.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from sami_jax.evaluation.probes import as_2d, check_same_length, standardize


def binary_attributes(name: str, attrs) -> np.ndarray:
  """[N, K] attributes in {0,1}, {-1,1} or bool -> bool [N, K]; ValueError for anything else."""
  a = np.asarray(attrs)
  if a.ndim == 1:
    a = a[:, None]
  if a.ndim != 2 or a.shape[0] == 0:
    raise ValueError(f"{name} must be [num_samples, num_attributes]; got shape {a.shape}.")
  if a.dtype == bool:
    return a
  values = np.unique(a)
  if not set(values.tolist()) <= {-1, 0, 1} or {-1, 0} <= set(values.tolist()):
    raise ValueError(f"{name} must be binary, coded {{0, 1}}, {{-1, 1}} or bool; found values "
                     f"{values[:10].tolist()}. Threshold or one-hot encode them first.")
  return a > 0


def single_latent_auroc(z, attrs) -> np.ndarray:
  """AUROC of each latent, used on its own as a score, for each attribute.

  Args:
    z: [N, d] latents. attrs: [N, K] binary attributes.

  Returns:
    [K, d] max(A, 1 - A) in [0.5, 1]; NaN rows for attributes that are constant over the N samples.
  """
  z = as_2d("z", z)
  a = binary_attributes("attrs", attrs)
  check_same_length(z=z, attrs=a)
  # Mann-Whitney: A = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with
  # average ranks for ties; one ranking per latent serves every attribute.
  ranks = rankdata(z, axis=0)  # [N, d]
  n_pos = a.sum(axis=0).astype(np.float64)  # [K]
  n_neg = a.shape[0] - n_pos
  rank_sums = a.T.astype(np.float64) @ ranks  # [K, d]
  denom = (n_pos * n_neg)[:, None]
  with np.errstate(divide="ignore", invalid="ignore"):
    auc = (rank_sums - (n_pos * (n_pos + 1) / 2)[:, None]) / denom
  auc = np.maximum(auc, 1.0 - auc)
  return np.where(denom > 0, auc, np.nan)


def attribute_mutual_info(attrs) -> np.ndarray:
  """Mutual information between binary attributes, nats.

  Args:
    attrs: [N, K] binary attributes.

  Returns:
    [K, K] symmetric; the diagonal holds each attribute's entropy H(a_k).
  """
  a = binary_attributes("attrs", attrs).astype(np.float64)
  n = a.shape[0]
  mi = np.zeros((a.shape[1], a.shape[1]))
  for x_val in (0.0, 1.0):
    for y_val in (0.0, 1.0):
      ax = a if x_val else 1.0 - a
      ay = a if y_val else 1.0 - a
      joint = ax.T @ ay / n  # [K, K] P(a_i = x, a_j = y)
      px = ax.mean(axis=0)[:, None]
      py = ay.mean(axis=0)[None, :]
      with np.errstate(divide="ignore", invalid="ignore"):
        mi += np.where(joint > 0, joint * np.log(joint / (px * py)), 0.0)
  return mi


def tad(z, attrs, *, auroc_threshold: float = 0.75,
        entropy_reduction_threshold: float = 0.2) -> dict:
  """TAD and ATTRS (see the module docstring for the definition).

  Args:
    z: [N, d] latents, d >= 2. attrs: [N, K] binary attributes.
    auroc_threshold: an attribute counts only if some single latent reaches this AUROC.
    entropy_reduction_threshold: an attribute counts only if no other attribute explains more than
      this fraction of its entropy.

  Returns:
    "tad": float, sum of AUROC gaps over captured attributes (0..K/2);
    "attrs": int, number of captured attributes;
    "captured": [K] bool; "auroc_gap": [K]; "best_auroc": [K]; "best_latent": [K] int;
    "entropy_reduction": [K]; "auroc": [K, d].
  """
  z = as_2d("z", z)
  if z.shape[1] < 2:
    raise ValueError(f"TAD compares the best latent with the second best; z needs >= 2 dims, got "
                     f"{z.shape[1]}.")
  auroc = single_latent_auroc(z, attrs)
  mi = attribute_mutual_info(attrs)
  k = mi.shape[0]
  entropy = np.diag(mi).copy()
  off = np.where(np.eye(k, dtype=bool), -np.inf, mi)
  max_shared = off.max(axis=1) if k > 1 else np.zeros(k)
  with np.errstate(divide="ignore", invalid="ignore"):
    ent_red = np.where(entropy > 0, max_shared / np.where(entropy > 0, entropy, 1.0), np.nan)
  valid = ~np.isnan(auroc[:, 0])
  safe = np.where(valid[:, None], auroc, 0.5)
  best_latent = np.argmax(safe, axis=1)
  top2 = np.sort(safe, axis=1)[:, -2:]
  best, gap = top2[:, 1], top2[:, 1] - top2[:, 0]
  captured = valid & (best >= auroc_threshold) & (ent_red <= entropy_reduction_threshold)
  return {"tad": float(gap[captured].sum()), "attrs": int(captured.sum()), "captured": captured,
          "auroc_gap": np.where(valid, gap, np.nan), "best_auroc": np.where(valid, best, np.nan),
          "best_latent": best_latent, "entropy_reduction": ent_red, "auroc": auroc}


def linear_probe_auroc(train_z, train_attrs, test_z, test_attrs, *, c: float = 1.0,
                       max_iter: int = 1000) -> dict:
  """Test AUROC of a logistic regression per attribute on standardised latents.

  Args:
    train_z: [N, d], train_attrs: [N, K] binary; test_z: [M, d], test_attrs: [M, K] binary.
    c: inverse L2 regularisation strength (sklearn's C; InfoDiffusion uses the default 1).
    max_iter: solver iterations.

  Returns:
    "mean_auroc": float, mean over attributes with both classes present in train and test;
    "per_attribute": [K] test AUROC (NaN where undefined).
  """
  train_z, test_z = as_2d("train_z", train_z), as_2d("test_z", test_z)
  ya = binary_attributes("train_attrs", train_attrs)
  yb = binary_attributes("test_attrs", test_attrs)
  check_same_length(train_z=train_z, train_attrs=ya)
  check_same_length(test_z=test_z, test_attrs=yb)
  if train_z.shape[1] != test_z.shape[1] or ya.shape[1] != yb.shape[1]:
    raise ValueError(f"train and test must have the same dims; got z {train_z.shape[1]} vs "
                     f"{test_z.shape[1]}, attributes {ya.shape[1]} vs {yb.shape[1]}.")
  train_s, test_s = standardize(train_z, test_z)
  out = np.full(ya.shape[1], np.nan)
  for k in range(ya.shape[1]):
    if len(np.unique(ya[:, k])) < 2 or len(np.unique(yb[:, k])) < 2:
      continue
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(train_s, ya[:, k])
    out[k] = roc_auc_score(yb[:, k], clf.decision_function(test_s))
  mean = float(np.nanmean(out)) if np.any(~np.isnan(out)) else float("nan")
  return {"mean_auroc": mean, "per_attribute": out}


def attribute_report(train_z, train_attrs, test_z, test_attrs) -> dict:
  """All attribute metrics as scalars, for logging.

  TAD / ATTRS and the single-latent AUROCs are computed on the train split (as InfoDiffusion
  does); the linear probe is fitted on train and scored on test.

  Returns:
    "tad", "attrs", "mean_best_single_latent_auroc", "linear_probe_auroc".
  """
  t = tad(train_z, train_attrs)
  probe = linear_probe_auroc(train_z, train_attrs, test_z, test_attrs)
  return {"tad": t["tad"], "attrs": t["attrs"],
          "mean_best_single_latent_auroc": float(np.nanmean(t["best_auroc"])),
          "linear_probe_auroc": probe["mean_auroc"]}
