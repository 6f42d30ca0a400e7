"""Disks factors in Cartesian and polar coordinates, and which of the two the latents align with.

The disk position is one point; a representation may encode it as (x, y) or as (r, theta) about
the image centre, and a probe or metric only sees the one it is given. `factor_sets` gives both
views of the same factors, `factor_set_metrics` scores the latents against each, and
`aligned_coordinates` states which one the latents follow.

Conventions (those of `sami_jax.data.disks`):
  x, y    disk centre in pixels; x along columns, y along rows (downwards); pixel (row i, column j)
          covers [j, j + 1) x [i, i + 1). The image centre is (image_size / 2, image_size / 2),
          which is also the centre of the x and y ranges.
  r       distance from the image centre to the disk centre, pixels.
  theta   atan2(y - image_size / 2, x - image_size / 2) in radians, wrapped to [-pi, pi):
          0 points along +x (right), pi / 2 along +y (down, since y grows downwards). A circular
          factor: -pi and pi are the same angle. At r = 0 it is 0 by convention.
Non-position factors (background, radius, foreground) are the same in both sets and keep their
stored order after the position factors.

    sets = factors.factor_sets(f, ["x", "y", "background"], image_size=32)
    sets["polar"].names      # ("r", "theta", "background")
    sets["polar"].circular   # (False, True, False)
    m = factors.factor_set_metrics(ztr, ftr, zte, fte, names, image_size=32)
    factors.aligned_coordinates(m)["aligned"]   # "cartesian", "polar" or "undecided"
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from sami_jax.evaluation import disentanglement
from sami_jax.evaluation import probes

SET_NAMES = ("cartesian", "polar")
POSITION_NAMES = {"cartesian": ("x", "y"), "polar": ("r", "theta")}
# Gap below which two sets' scores count as equal in `aligned_coordinates`.
DEFAULT_MARGIN = 0.05
ALIGNMENT_RULE = (
    "The latents align with the set whose position factors (x, y or r, theta) have the higher "
    "mean linear-probe test R^2 (theta scored on (cos theta, sin theta)), if it is higher by at "
    "least the margin; otherwise with the set whose position factors have the higher mean MIG, "
    "if higher by at least the margin; otherwise 'undecided'. Non-position factors are the same "
    "in both sets and are left out. kNN R^2 is reported but not used: both sets describe the "
    "same position, so a nonlinear probe reads either equally well; only a linear probe asks "
    "whether the latent axes follow one coordinate system.")


@dataclasses.dataclass(frozen=True)
class FactorSet:
  """One view of the factors.

  Attributes:
    name: "cartesian" or "polar".
    values: float64 [N, K]; columns in `names` order, units in the module docstring.
    names: [K] column names.
    circular: [K] True for an angle in radians (theta), for `circular=` of the metrics.
    position: indices of the position columns (x, y or r, theta).
  """
  name: str
  values: np.ndarray
  names: tuple[str, ...]
  circular: tuple[bool, ...]
  position: tuple[int, ...]


def wrap_angle(theta) -> np.ndarray:
  """Angles in radians wrapped to [-pi, pi) (pi itself becomes -pi)."""
  theta = np.asarray(theta, np.float64)
  return np.mod(theta + np.pi, 2 * np.pi) - np.pi


def polar_from_cartesian(x, y, image_size: float) -> tuple[np.ndarray, np.ndarray]:
  """(r, theta) of disk centres (x, y) in pixels about the image centre (see module docstring).

  Args:
    x, y: [N] disk centres, pixels.
    image_size: H = W, pixels.

  Returns:
    r [N] in pixels, theta [N] in radians in [-pi, pi).
  """
  dx = np.asarray(x, np.float64) - image_size / 2
  dy = np.asarray(y, np.float64) - image_size / 2
  return np.hypot(dx, dy), wrap_angle(np.arctan2(dy, dx))


def factor_sets(factors, names: Sequence[str], image_size: int) -> dict[str, FactorSet]:
  """The Cartesian (as stored) and polar views of Disks factors.

  Args:
    factors: [N, K] factors as stored by the Disks dataset, columns named by `names`.
    names: [K] column names; must include "x" and "y" (e.g. ("x", "y", "background")).
    image_size: H = W of the images, pixels.

  Returns:
    {"cartesian": FactorSet (the stored columns, x and y first, then the others in stored order),
     "polar": FactorSet (r, theta, then the same others)}.
  """
  f = probes.as_2d("factors", factors)
  names = tuple(str(n) for n in names)
  if len(names) != f.shape[1]:
    raise ValueError(f"factors have {f.shape[1]} columns but {len(names)} names were given "
                     f"({list(names)}); pass one name per column.")
  if "x" not in names or "y" not in names:
    raise ValueError(f"factor_sets needs columns named 'x' and 'y' (the disk centre); got "
                     f"{list(names)}. Pass the dataset's factor names (data.disks.factor_names).")
  if len(set(names)) != len(names) or {"r", "theta"} & set(names):
    raise ValueError(f"factor names must be distinct and must not already contain 'r' or "
                     f"'theta'; got {list(names)}.")
  if not image_size > 0:
    raise ValueError(f"image_size must be positive; got {image_size}.")
  ix, iy = names.index("x"), names.index("y")
  others = [j for j in range(len(names)) if j not in (ix, iy)]
  rest = f[:, others]
  rest_names = tuple(names[j] for j in others)
  r, theta = polar_from_cartesian(f[:, ix], f[:, iy], image_size)
  k = 2 + len(others)
  flat = (False,) * (k - 2)
  return {
      "cartesian": FactorSet("cartesian", np.concatenate([f[:, [ix, iy]], rest], axis=1),
                             ("x", "y") + rest_names, (False, False) + flat, (0, 1)),
      "polar": FactorSet("polar", np.concatenate([np.stack([r, theta], 1), rest], axis=1),
                         ("r", "theta") + rest_names, (False, True) + flat, (0, 1)),
  }


def factor_set_metrics(z_train, f_train, z_test, f_test, names: Sequence[str], image_size: int,
                       *, knn_neighbors: int = 10, num_bins: int = 20) -> dict[str, dict]:
  """Linear / kNN probe R^2 and MIG of the latents against each view of the factors.

  Args:
    z_train, f_train: [N, d] latents and [N, K] stored factors (probe training set; MIG is
      computed on these).
    z_test, f_test: [M, d], [M, K] held-out pairs for the probes' test R^2.
    names: [K] stored factor names (must include "x" and "y").
    image_size: H = W, pixels.
    knn_neighbors: k of the kNN probe.
    num_bins: MIG bins per latent and per non-circular factor (theta: over the whole circle).

  Returns:
    {"cartesian": {...}, "polar": {...}}, each with
      "names" [K], "circular" [K] bools,
      "linear", "knn": [K] test R^2 (`probes.factor_r2`; theta on (cos, sin), pooled R^2),
      "mig": float or None (None with fewer than 2 latents), "mig_per_factor": [K] or None,
      "position_linear_r2", "position_knn_r2": mean over the two position factors,
      "position_mig": mean MIG over the two position factors, or None.
  """
  z_train = probes.as_2d("z_train", z_train)
  sets_train = factor_sets(f_train, names, image_size)
  sets_test = factor_sets(f_test, names, image_size)
  out = {}
  for key in SET_NAMES:
    tr, te = sets_train[key], sets_test[key]
    r2 = probes.factor_r2(z_train, tr.values, z_test, te.values, knn_neighbors=knn_neighbors,
                          circular=tr.circular)
    pos = list(tr.position)
    result = {"names": list(tr.names), "circular": list(tr.circular),
              "linear": r2["linear"], "knn": r2["knn"],
              "position_linear_r2": float(np.mean(r2["linear"][pos])),
              "position_knn_r2": float(np.mean(r2["knn"][pos])),
              "mig": None, "mig_per_factor": None, "position_mig": None}
    if z_train.shape[1] >= 2:  # MIG compares the best latent with the second best
      m = disentanglement.mig(z_train, tr.values, num_bins=num_bins, circular=tr.circular)
      result.update(mig=m["mig"], mig_per_factor=m["per_factor"],
                    position_mig=float(np.mean(m["per_factor"][pos])))
    out[key] = result
  return out


def aligned_coordinates(metrics: Mapping[str, Mapping], *,
                        margin: float = DEFAULT_MARGIN) -> dict:
  """Which coordinate set the latents align with, by the rule in `ALIGNMENT_RULE`.

  Args:
    metrics: {"cartesian": ..., "polar": ...}, each a mapping with "position_linear_r2" (float)
      and optionally "position_mig" (float or None), e.g. the output of `factor_set_metrics`.
    margin: smallest gap that decides (R^2 and MIG are both in [0, 1]); default 0.05.

  Returns:
    "aligned": "cartesian", "polar" or "undecided";
    "decided_by": "linear R^2", "MIG" or None;
    "position_linear_r2", "position_mig": {set name: value} as used;
    "margin": float; "rule": ALIGNMENT_RULE.
  """
  missing = [k for k in SET_NAMES if k not in metrics]
  if missing:
    raise ValueError(f"aligned_coordinates needs metrics for {list(SET_NAMES)}; missing "
                     f"{missing}. Pass the output of factor_set_metrics.")
  if not margin >= 0:
    raise ValueError(f"margin must be >= 0; got {margin}.")

  def values(field):
    v = {k: metrics[k].get(field) for k in SET_NAMES}
    return {k: (None if x is None or not np.isfinite(x) else float(x)) for k, x in v.items()}

  r2, mig = values("position_linear_r2"), values("position_mig")
  aligned, decided_by = "undecided", None
  for label, v in (("linear R^2", r2), ("MIG", mig)):
    if v["cartesian"] is None or v["polar"] is None:
      continue
    gap = v["polar"] - v["cartesian"]
    if gap != 0 and abs(gap) >= margin:
      aligned, decided_by = ("polar" if gap > 0 else "cartesian"), label
      break
  return {"aligned": aligned, "decided_by": decided_by, "position_linear_r2": r2,
          "position_mig": mig, "margin": float(margin), "rule": ALIGNMENT_RULE}
