"""Trajectory straightness (Henaff, Goris & Simoncelli 2019, "Perceptual straightening").

A sequence of frames is a trajectory x_1..x_T in some space (pixels, or the latents of each frame).
Its discrete curvature at step t is the angle between successive displacement vectors
v_t = x_{t+1} - x_t and v_{t+1}:

    c_t = arccos( <v_t, v_{t+1}> / (|v_t| |v_{t+1}|) ),   t = 1..T-2,

0 degrees for a straight line, 180 for an exact reversal. A representation "straightens" natural
sequences when its mean curvature is lower than that of the pixel trajectories.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

# Displacements shorter than this (in the units of the trajectory) have no direction; angles that
# involve them are NaN and skipped by the means (a repeated frame is not a turn).
_MIN_NORM = 1e-12


def curvature(traj) -> dict[str, np.ndarray]:
  """Angles between successive displacement vectors of trajectories.

  Args:
    traj: [..., T, D] trajectories of T >= 3 points in a D-dimensional space (any leading batch
      axes; D is the flattened space, e.g. H*W*C for pixels).

  Returns:
    "angles": [..., T-2] curvature at each interior point, degrees in [0, 180]
      (NaN where a displacement has zero length).
    "cosines": [..., T-2] cosines of those angles.
    "mean_curvature": [...] mean angle per trajectory, degrees (NaNs skipped).
    "mean_cosine": [...] mean cosine per trajectory.
  """
  traj = np.asarray(traj, np.float64)
  if traj.ndim < 2 or traj.shape[-2] < 3:
    raise ValueError(f"traj must have shape [..., T, D] with T >= 3 points (curvature needs two "
                     f"successive displacements); got shape {traj.shape}.")
  if not np.all(np.isfinite(traj)):
    raise ValueError("traj contains NaN or inf values.")
  v = np.diff(traj, axis=-2)  # [..., T-1, D]
  norms = np.linalg.norm(v, axis=-1)
  a, b = v[..., :-1, :], v[..., 1:, :]
  na, nb = norms[..., :-1], norms[..., 1:]
  valid = (na > _MIN_NORM) & (nb > _MIN_NORM)
  dots = np.sum(a * b, axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.where(valid, dots / np.where(valid, na * nb, 1.0), np.nan)
  # Rounding can push |cos| slightly above 1 for (anti-)parallel vectors; arccos would give NaN.
  cos = np.clip(cos, -1.0, 1.0)
  angles = np.degrees(np.arccos(cos))
  with _quiet_empty_mean():
    mean_curv = np.nanmean(angles, axis=-1)
    mean_cos = np.nanmean(cos, axis=-1)
  return {"angles": angles, "cosines": cos, "mean_curvature": mean_curv, "mean_cosine": mean_cos}


def trajectory_report(latent_traj, pixel_traj) -> dict[str, float]:
  """Curvature of the same sequences in latent space and in pixel space.

  Args:
    latent_traj: [N, T, d] latents (e.g. posterior means) of each frame of N sequences.
    pixel_traj: [N, T, ...] the frames themselves (e.g. [N, T, H, W, C]); flattened per frame.

  Returns:
    Scalars (degrees for curvatures): "latent_curvature" and "pixel_curvature" (means over
    sequences of each sequence's mean curvature), their standard deviations over sequences
    ("*_curvature_std"), "curvature_reduction" = pixel - latent (positive: the latents are
    straighter), "latent_cosine" and "pixel_cosine" (mean cosine between successive displacements),
    "num_sequences" and "num_frames".
  """
  latent_traj = np.asarray(latent_traj, np.float64)
  pixel_traj = np.asarray(pixel_traj, np.float64)
  if latent_traj.ndim != 3:
    raise ValueError(f"latent_traj must be [num_sequences, num_frames, latent_dim]; got shape "
                     f"{latent_traj.shape}.")
  if pixel_traj.ndim < 3 or pixel_traj.shape[:2] != latent_traj.shape[:2]:
    raise ValueError(f"pixel_traj must be [num_sequences, num_frames, ...] with the same first two "
                     f"axes as latent_traj {latent_traj.shape[:2]}; got shape {pixel_traj.shape}.")
  n, t = latent_traj.shape[:2]
  lat = curvature(latent_traj)
  pix = curvature(pixel_traj.reshape(n, t, -1))
  with _quiet_empty_mean():
    report = {
        "latent_curvature": float(np.nanmean(lat["mean_curvature"])),
        "latent_curvature_std": float(np.nanstd(lat["mean_curvature"])),
        "pixel_curvature": float(np.nanmean(pix["mean_curvature"])),
        "pixel_curvature_std": float(np.nanstd(pix["mean_curvature"])),
        "latent_cosine": float(np.nanmean(lat["mean_cosine"])),
        "pixel_cosine": float(np.nanmean(pix["mean_cosine"])),
    }
  report["curvature_reduction"] = report["pixel_curvature"] - report["latent_curvature"]
  report["num_sequences"] = n
  report["num_frames"] = t
  return report


@contextlib.contextmanager
def _quiet_empty_mean():
  """Silences numpy's 'Mean of empty slice' warning (an all-NaN trajectory is reported as NaN)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    yield
