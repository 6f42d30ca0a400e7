"""Disks: a procedurally rendered dataset with known generative factors (TFDS builder "disks").

Each image is a single bright, anti-aliased disk on a uniform darker background, uint8 [H, W, 1].
Nothing is downloaded: images are rendered with numpy from factors drawn uniformly and
independently, so the dataset is a pure function of (builder version, builder config, split).

Coordinates and units (stored with every example as `factors`, float32 [K]):
  x           disk centre, column direction, in pixels; pixel (row i, column j) covers
              [j, j + 1) x [i, i + 1), so its centre is at (j + 0.5, i + 0.5).
  y           disk centre, row direction (downwards), in pixels.
  background  background intensity, fraction of full scale (1.0 = 255), in [0, 0.5].
  radius      disk radius in pixels (factor set "xy_bg_r_fg" only; else image_size / 6).
  foreground  disk intensity, fraction of full scale, in [0.75, 1.0] ("xy_bg_r_fg" only; else 1).

Factor sets: "xy_bg" -> (x, y, background); "xy_bg_r_fg" -> (x, y, background, radius,
foreground). The names are also in the builder's metadata (`info.metadata["factor_names"]`) with
their ranges (`info.metadata["factor_ranges"]`).

The centre range is the same for every radius (it is computed for the largest radius), so all
factors are independent, and the disk (including its one-pixel anti-aliasing ramp) stays inside
the image.

Anti-aliasing uses the analytic coverage approximation coverage = clip(r - d + 0.5, 0, 1), d the
distance from a pixel centre to the disk centre: a linear ramp one pixel wide. Its integral over
the plane is pi r^2 + pi / 12, i.e. the rendered disk's mass matches a disk of radius r.

The renderer is shared with `disks_video.py`. `DisksDataset` is what the pipeline reads.
"""

from __future__ import annotations

import dataclasses
import zlib

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sami_jax.data import base

FACTOR_SETS: dict[str, tuple[str, ...]] = {
    "xy_bg": ("x", "y", "background"),
    "xy_bg_r_fg": ("x", "y", "background", "radius", "foreground"),
}
BACKGROUND_RANGE = (0.0, 0.5)
FOREGROUND_RANGE = (0.75, 1.0)
DEFAULT_FOREGROUND = 1.0
# Radius range as fractions of image_size, for the factor set with a radius factor.
RADIUS_FRACTION_RANGE = (0.1, 0.2)
DEFAULT_RADIUS_FRACTION = 1.0 / 6.0
# Space kept between the disk's edge and the image border, in pixels: the anti-aliasing ramp
# reaches r + 0.5, plus half a pixel of headroom.
EDGE_MARGIN = 1.0
# Images rendered per numpy call: bounds the float32 coverage buffer to ~chunk * H * W * 4 bytes.
_RENDER_CHUNK = 4096


def factor_names(factor_set: str) -> list[str]:
  """The ordered names of a factor set's factors (the columns of `factors`)."""
  if factor_set not in FACTOR_SETS:
    raise ValueError(f"Unknown disks factor set {factor_set!r}; use one of "
                     f"{sorted(FACTOR_SETS)} (config.data.factors).")
  return list(FACTOR_SETS[factor_set])


def radius_range(factor_set: str, image_size: int) -> tuple[float, float]:
  """(min, max) disk radius in pixels; min == max when the radius is not a factor."""
  if "radius" in factor_names(factor_set):
    return (RADIUS_FRACTION_RANGE[0] * image_size, RADIUS_FRACTION_RANGE[1] * image_size)
  r = DEFAULT_RADIUS_FRACTION * image_size
  return (r, r)


def factor_ranges(factor_set: str, image_size: int) -> dict[str, tuple[float, float]]:
  """Closed range [lo, hi] of each factor, in the units of the module docstring."""
  if image_size < 8:
    raise ValueError(f"Disks need image_size >= 8 pixels, got {image_size} "
                     "(config.data.image_size).")
  r_lo, r_hi = radius_range(factor_set, image_size)
  # The centre range is computed for the largest radius so that x, y and radius are independent.
  c_lo, c_hi = r_hi + EDGE_MARGIN, image_size - r_hi - EDGE_MARGIN
  ranges = {"x": (c_lo, c_hi), "y": (c_lo, c_hi), "background": BACKGROUND_RANGE,
            "radius": (r_lo, r_hi), "foreground": FOREGROUND_RANGE}
  return {name: ranges[name] for name in factor_names(factor_set)}


def sample_factors(rng: np.random.Generator, n: int, factor_set: str,
                   image_size: int) -> np.ndarray:
  """Draws n factor vectors, each factor uniform and independent in its range.

  Returns:
    float32 [n, K], columns in `factor_names(factor_set)` order.
  """
  ranges = factor_ranges(factor_set, image_size)
  lo = np.array([r[0] for r in ranges.values()])
  hi = np.array([r[1] for r in ranges.values()])
  return (lo + (hi - lo) * rng.random((n, len(ranges)))).astype(np.float32)


def render_params(factors: np.ndarray, factor_set: str, image_size: int) -> dict[str, np.ndarray]:
  """Maps factor vectors [..., K] to the renderer's arguments (each [...]), filling defaults."""
  names = factor_names(factor_set)
  factors = np.asarray(factors, np.float64)
  if factors.shape[-1] != len(names):
    raise ValueError(f"factors have {factors.shape[-1]} columns, factor set {factor_set!r} has "
                     f"{len(names)} ({names}).")
  col = {name: factors[..., i] for i, name in enumerate(names)}
  shape = factors.shape[:-1]
  return dict(
      centre_x=col["x"], centre_y=col["y"], background=col["background"],
      radius=col.get("radius", np.full(shape, DEFAULT_RADIUS_FRACTION * image_size)),
      foreground=col.get("foreground", np.full(shape, DEFAULT_FOREGROUND)))


def render_disks(centre_x: np.ndarray, centre_y: np.ndarray, radius: np.ndarray,
                 background: np.ndarray, foreground: np.ndarray, image_size: int) -> np.ndarray:
  """Renders one anti-aliased disk per image, vectorised over images.

  Args:
    centre_x, centre_y: disk centres in pixels, [N] (see the module docstring's coordinates).
    radius: radii in pixels, [N].
    background, foreground: intensities as fractions of full scale, [N].
    image_size: H = W, pixels.

  Returns:
    uint8 [N, H, W, 1]: round(255 * (bg + (fg - bg) * coverage)).
  """
  args = [np.asarray(a, np.float32).reshape(-1)
          for a in (centre_x, centre_y, radius, background, foreground)]
  n = args[0].shape[0]
  if any(a.shape[0] != n for a in args):
    raise ValueError(f"render_disks: arguments have different lengths {[a.shape for a in args]}.")
  centres = np.arange(image_size, dtype=np.float32) + 0.5
  out = np.empty((n, image_size, image_size, 1), np.uint8)
  for start in range(0, n, _RENDER_CHUNK):
    cx, cy, r, bg, fg = (a[start:start + _RENDER_CHUNK, None, None] for a in args)
    dist = np.sqrt((centres[None, None, :] - cx) ** 2 + (centres[None, :, None] - cy) ** 2)
    coverage = np.clip(r - dist + 0.5, 0.0, 1.0)
    value = bg + (fg - bg) * coverage
    out[start:start + _RENDER_CHUNK, ..., 0] = np.rint(255.0 * np.clip(value, 0.0, 1.0))
  return out


def render_factors(factors: np.ndarray, factor_set: str, image_size: int) -> np.ndarray:
  """Renders factor vectors [..., K] into uint8 images [..., H, W, 1]."""
  factors = np.asarray(factors)
  p = render_params(factors.reshape(-1, factors.shape[-1]), factor_set, image_size)
  images = render_disks(image_size=image_size, **p)
  return images.reshape(factors.shape[:-1] + images.shape[1:])


def split_seed(builder_name: str, version: str, config_name: str,
               split: str) -> np.random.SeedSequence:
  """A seed that is a stable function of (builder, version, config, split): crc32, not hash()."""
  words = [zlib.crc32(s.encode()) for s in (builder_name, version, config_name, split)]
  return np.random.SeedSequence(words)


@dataclasses.dataclass
class DisksConfig(tfds.core.BuilderConfig):
  """Settings of a disks dataset; `name` encodes them so each setting caches separately.

  Attributes:
    image_size: H = W in pixels.
    factors: factor set, "xy_bg" or "xy_bg_r_fg".
    num_train, num_test: examples per split.
  """
  image_size: int = 32
  factors: str = "xy_bg"
  num_train: int = 20000
  num_test: int = 2000

  @classmethod
  def make(cls, image_size: int = 32, factors: str = "xy_bg", num_train: int = 20000,
           num_test: int = 2000) -> "DisksConfig":
    factor_names(factors)  # Validates the factor set.
    if num_train < 1 or num_test < 1:
      raise ValueError(f"Disks need num_train >= 1 and num_test >= 1, got {num_train}, "
                       f"{num_test} (config.data.num_train / num_test).")
    return cls(name=f"{factors}_s{image_size}_n{num_train}_t{num_test}",
               description=f"{image_size}x{image_size}, factors {factor_names(factors)}, "
               f"{num_train} train / {num_test} test.",
               image_size=image_size, factors=factors, num_train=num_train, num_test=num_test)


class RenderedBuilder(base.LocalBuilder):
  """A procedurally rendered dataset: train and test splits of config.num_train / num_test
  examples from `_generate_examples(split, num)`; nothing to download."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}


class Disks(RenderedBuilder):
  """Single anti-aliased disk on a uniform background, with its ground-truth factors.

  Features: image uint8 [H, W, 1]; factors float32 [K] (see the module docstring for names and
  units; also `info.metadata`); id int32, the example's index in its split (records are stored in
  id order).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DisksConfig.make()]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    names = factor_names(cfg.factors)
    s = cfg.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Tensor, not tfds.features.Image: Image encodes PNG with TensorFlow, which is not
            # installed; raw uint8 is also smaller to decode than PNG at this size.
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            "factors": tfds.features.Tensor(shape=(len(names),), dtype=np.float32),
            "id": np.int32,
        }),
        metadata=tfds.core.MetadataDict(
            factor_names=names,
            factor_ranges={k: list(v) for k, v in factor_ranges(cfg.factors, s).items()}),
        # Records are written in id order so the record index equals `id`.
        disable_shuffling=True,
    )

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    rng = np.random.default_rng(split_seed(self.name, str(self.VERSION), cfg.name, split))
    factors = sample_factors(rng, num, cfg.factors, cfg.image_size)
    for start in range(0, num, _RENDER_CHUNK):
      chunk = factors[start:start + _RENDER_CHUNK]
      images = render_factors(chunk, cfg.factors, cfg.image_size)
      for i in range(len(chunk)):
        yield start + i, {"image": images[i], "factors": chunk[i], "id": start + i}


class DisksDataset(base.Dataset):
  """The procedurally rendered disks, as the pipeline reads them."""

  name = "disks"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.data.channels != 1:
      raise ValueError(f"{self.name} images are grayscale: set --config.data.channels=1 "
                       f"(it is {config.data.channels}).")
    d = config.data
    self.builder_config = DisksConfig.make(
        image_size=d.image_size, factors=d.factors, num_train=d.num_train, num_test=d.num_test)

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    return self._open_builder(
        lambda: base.make_builder(Disks, self.builder_config, self.data_dir))

  def example(self, record, index):
    del index
    return {"image": record["image"], "factors": record["factors"], "id": record["id"]}

  def factor_names(self) -> list[str]:
    return factor_names(self.config.data.factors)
