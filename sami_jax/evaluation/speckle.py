"""Speckle: the noise a sampler leaves in the flat background of generated Disks images.

A Disks image is a uniform background with one anti-aliased disk (`sami_jax.data.disks`); the
disk's anti-aliasing ramp ends at radius + 0.5 px. So the standard deviation of the pixels whose
centre is farther than radius + margin from the disk centre measures the sampling noise of a
generated image directly, and it is exactly 0 for the data: a rendered background is one uint8
value, so 8-bit quantisation adds nothing there. (A generated image that is itself quantised to
8 bits carries at most 1/sqrt(12) grey levels of rounding noise, 0.0023 in [-1, 1] units.)

Units: images in [-1, 1] (grey level g in 0..255 is g / 127.5 - 1), so a std of 0.01 here is 1.3
grey levels. Pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5) px, as in
disks.py.

    std = speckle.background_std(images, centres=factors[:, :2], radius=32 / 6)   # known factors
    est = speckle.sample_background_std(prior_samples)        # factors unknown: estimated first
    est["std"], est["centres"], est["contrast"]

Caveat: a sampler that clips its output to [-1, 1] clips the noise too where the background is
near -1 (a Disks background of 0, black), which biases the std down; `background_stats` reports
the fraction of background pixels at the bounds ("clipped_fraction") so that can be seen.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MARGIN = 2.0


def _images(images) -> np.ndarray:
  """float64 [N, H, W, C] in [-1, 1] from float [-1, 1] or uint8 images, [N, H, W] read as C=1."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"images must be [N, H, W, C] (or [N, H, W]) with N >= 1; got shape "
                     f"{x.shape}.")
  if x.dtype == np.uint8:
    return x.astype(np.float64) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"images must be float in [-1, 1] or uint8; got dtype {x.dtype}.")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or inf; the sampler probably diverged. Drop those "
                     "samples or check the checkpoint.")
  return x


def _per_image(name: str, value, n: int) -> np.ndarray:
  """A scalar or [N] array as float64 [N]."""
  v = np.asarray(value, np.float64)
  if v.ndim == 0:
    return np.full(n, float(v))
  v = v.reshape(-1)
  if v.shape[0] != n:
    raise ValueError(f"{name} must be a scalar or have one entry per image ({n}); got shape "
                     f"{np.shape(value)}.")
  return v


def background_mask(centres, radius, image_size, margin: float = DEFAULT_MARGIN) -> np.ndarray:
  """Pixels whose centre is farther than radius + margin from the disk centre.

  Args:
    centres: [N, 2] disk centres (x, y) in pixels (disks.py convention).
    radius: scalar or [N] disk radii, pixels.
    image_size: H = W (int) or (H, W), pixels.
    margin: pixels added to the radius (the anti-aliasing ramp ends at radius + 0.5).

  Returns:
    bool [N, H, W].
  """
  c = np.asarray(centres, np.float64)
  if c.ndim != 2 or c.shape[1] != 2:
    raise ValueError(f"centres must be [N, 2] (x, y) in pixels; got shape {c.shape}.")
  h, w = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  r = _per_image("radius", radius, len(c))
  ys = np.arange(h, dtype=np.float64) + 0.5
  xs = np.arange(w, dtype=np.float64) + 0.5
  d2 = ((xs[None, None, :] - c[:, 0, None, None]) ** 2
        + (ys[None, :, None] - c[:, 1, None, None]) ** 2)
  return d2 > ((r + margin) ** 2)[:, None, None]


def background_stats(images, centres, radius, margin: float = DEFAULT_MARGIN) -> dict:
  """Per-image statistics of the background pixels (see `background_mask`).

  Args:
    images: [N, H, W, C] float in [-1, 1] (or uint8); all channels of a background pixel count.
    centres: [N, 2] disk centres (x, y), pixels.
    radius: scalar or [N], pixels.
    margin: pixels beyond the radius that still count as disk.

  Returns:
    "std": [N] sample standard deviation (ddof=1) of the background values, [-1, 1] units
      (NaN with fewer than 2 background values);
    "mean": [N] their mean; "num_pixels": [N] int, background pixels per image;
    "clipped_fraction": [N] fraction of background values at or beyond -1 or 1 (a sampler that
      clips its output to [-1, 1] leaves its clipped values exactly there).
  """
  x = _images(images)
  n, h, w, ch = x.shape
  c = np.asarray(centres, np.float64)
  if c.shape != (n, 2):
    raise ValueError(f"centres must be [N, 2] = [{n}, 2] (x, y per image); got shape {c.shape}.")
  mask = background_mask(c, radius, (h, w), margin)
  count = mask.sum(axis=(1, 2)) * ch
  m = mask[..., None]
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.where(m, x, 0.0).sum(axis=(1, 2, 3)) / count
    sq = np.where(m, (x - mean[:, None, None, None]) ** 2, 0.0).sum(axis=(1, 2, 3))
    std = np.where(count >= 2, np.sqrt(sq / (count - 1)), np.nan)
    clipped = np.where(m, np.abs(x) >= 1.0, False).sum(axis=(1, 2, 3)) / count
  return {"std": std, "mean": np.where(count > 0, mean, np.nan),
          "num_pixels": mask.sum(axis=(1, 2)), "clipped_fraction": clipped}


def background_std(images, centres, radius, margin: float = DEFAULT_MARGIN) -> np.ndarray:
  """[N] standard deviation of each image's background pixels ([-1, 1] units).

  `background_stats(...)["std"]`; see there for the arguments.
  """
  return background_stats(images, centres, radius, margin)["std"]


def estimate_disks(images) -> dict:
  """Disk centre and radius of each image, read off the image itself.

  Two stages:
  1. The background level b is the image's median (the disk covers at most ~13% of a Disks
     image) and the disk level p0 its 99th percentile (the disk covers at least ~3%). The pixels
     brighter than the half level (b + p0) / 2 are the disk sampled at the pixel centres (with
     the one-pixel linear anti-aliasing ramp, a pixel's coverage is >= 1/2 exactly when its centre
     is within the radius): their centroid c1 and sqrt(count / pi) = r1 are a first estimate,
     off by up to ~0.2 px from pixel sampling.
  2. The disk level p is the median of the pixels within r1 - 1 of c1 (fully covered; p0 if
     there are none). Each pixel within r1 + 1.5 of c1 gets the weight (value - b) / (p - b),
     its coverage for a clean render; the centre is the weighted centroid (the disk's centre of
     mass) and the radius sqrt((sum of weights - pi / 12) / pi) (a ramp-rendered disk's mass is
     pi r^2 + pi / 12). Weights are not clipped, so zero-mean noise leaves them unbiased; the
     window keeps the rest of the background's noise out.
  Noise matters once its std is a sizeable fraction of the contrast p - b; "contrast" is
  returned so a caller can drop images without a visible disk (e.g. contrast < 0.2).

  Args:
    images: [N, H, W, C] float in [-1, 1] (or uint8); channels are averaged.

  Returns:
    "centres": [N, 2] (x, y) in pixels; "radius": [N] pixels; "background": [N] the median b;
    "contrast": [N] p - b in [-1, 1] units.
  """
  x = _images(images).mean(axis=-1)
  n, h, w = x.shape
  flat = x.reshape(n, -1)
  b = np.median(flat, axis=1)
  p0 = np.percentile(flat, 99, axis=1)
  ys = (np.arange(h, dtype=np.float64) + 0.5)[None, :, None]
  xs = (np.arange(w, dtype=np.float64) + 0.5)[None, None, :]

  def centroid(weight):
    total = weight.sum(axis=(1, 2))
    safe = np.where(total != 0, total, 1.0)
    return (weight * xs).sum(axis=(1, 2)) / safe, (weight * ys).sum(axis=(1, 2)) / safe, total

  inside = (x > ((b + p0) / 2)[:, None, None]).astype(np.float64)
  cx, cy, count = centroid(inside)
  # No pixel above the half level (a flat image): the image centre, radius 0.
  cx, cy = np.where(count > 0, cx, w / 2), np.where(count > 0, cy, h / 2)
  r1 = np.sqrt(count / np.pi)
  dist = np.sqrt((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2)
  core = dist <= (r1 - 1.0)[:, None, None]
  p = np.array([np.median(x[i][core[i]]) if core[i].any() else p0[i] for i in range(n)])
  contrast = p - b
  window = dist <= (r1 + 1.5)[:, None, None]
  scale = np.where(contrast > 0, contrast, 1.0)[:, None, None]
  weight = np.where(window, (x - b[:, None, None]) / scale, 0.0)
  mx, my, mass = centroid(weight)
  ok = (count > 0) & (contrast > 0) & (mass > 0)
  centres = np.stack([np.where(ok, mx, cx), np.where(ok, my, cy)], axis=1)
  radius = np.where(ok, np.sqrt(np.maximum(mass - np.pi / 12, 0.0) / np.pi), r1)
  return {"centres": centres, "radius": radius, "background": b, "contrast": contrast}


def sample_background_std(images, *, radius=None, margin: float = DEFAULT_MARGIN) -> dict:
  """Background std of generated images whose factors are unknown (e.g. prior samples).

  The disk is located with `estimate_disks`, then the background is measured as in
  `background_stats`.

  Args:
    images: [N, H, W, C] float in [-1, 1] (or uint8).
    radius: None to use the estimated radius, or the known radius (scalar or [N], pixels; the
      "xy_bg" factor set draws every disk with radius image_size / 6).
    margin: pixels beyond the radius that still count as disk.

  Returns:
    The `background_stats` fields ("std", "mean", "num_pixels", "clipped_fraction") and the
    `estimate_disks` fields ("centres", "radius" (the one used), "background", "contrast").
  """
  est = estimate_disks(images)
  r = est["radius"] if radius is None else _per_image("radius", radius, len(est["radius"]))
  stats = background_stats(images, est["centres"], r, margin)
  return {**stats, "centres": est["centres"], "radius": r, "background": est["background"],
          "contrast": est["contrast"]}
