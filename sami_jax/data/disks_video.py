"""Disks video: sequences of disk frames whose factors move smoothly (TFDS builder "disks_video").

Each example is a sequence of F frames, image uint8 [F, H, W, 1] with factors float32 [F, K]
(same names, units and ranges as `disks.py`; rendered by the same renderer).

Trajectories: every factor moves on a straight line at constant speed from a start value to an end
value, both inside the factor's range (which is convex, so every frame is valid and the disk stays
inside the image). The start is uniform in the range; the end is uniform within a window around
the start, clipped to the range, so motion is slow:
  x, y        travel at most half the centre range over the sequence (32x32, 16 frames:
              <= 0.65 px per frame per coordinate);
  background  changes by at most 0.1 (of full scale) over the sequence;
  radius, foreground  change by at most a quarter of their range.
Ground-truth trajectories are therefore straight in factor space, which is what the straightness
measure (curvature of latent trajectories) compares against.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sami_jax.data import base
from sami_jax.data import disks

# Largest change of each factor over a whole sequence, as a fraction of its range.
MAX_TRAVEL_FRACTION = {"x": 0.5, "y": 0.5, "background": 0.2, "radius": 0.25,
                       "foreground": 0.25}


def sample_trajectories(rng: np.random.Generator, n: int, num_frames: int, factor_set: str,
                        image_size: int) -> np.ndarray:
  """Draws n straight, constant-speed factor trajectories.

  Returns:
    float32 [n, num_frames, K], columns in `disks.factor_names(factor_set)` order.
  """
  ranges = disks.factor_ranges(factor_set, image_size)
  lo = np.array([r[0] for r in ranges.values()])
  hi = np.array([r[1] for r in ranges.values()])
  travel = np.array([MAX_TRAVEL_FRACTION[k] for k in ranges]) * (hi - lo)
  start = lo + (hi - lo) * rng.random((n, len(ranges)))
  end_lo = np.maximum(lo, start - travel)
  end_hi = np.minimum(hi, start + travel)
  end = end_lo + (end_hi - end_lo) * rng.random((n, len(ranges)))
  frac = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
  traj = start[:, None, :] + (end - start)[:, None, :] * frac[None, :, None]
  return traj.astype(np.float32)


@dataclasses.dataclass
class DisksVideoConfig(tfds.core.BuilderConfig):
  """Settings of a disks video dataset; `name` encodes them.

  Attributes:
    image_size: H = W in pixels.
    factors: factor set, "xy_bg" or "xy_bg_r_fg".
    video_frames: frames per sequence.
    num_train, num_test: sequences per split.
  """
  image_size: int = 32
  factors: str = "xy_bg"
  video_frames: int = 16
  num_train: int = 20000
  num_test: int = 2000

  @classmethod
  def make(cls, image_size: int = 32, factors: str = "xy_bg", video_frames: int = 16,
           num_train: int = 20000, num_test: int = 2000) -> "DisksVideoConfig":
    disks.factor_names(factors)  # Validates the factor set.
    if video_frames < 2:
      raise ValueError(f"disks_video needs at least 2 frames per sequence, got {video_frames} "
                       "(config.data.video_frames).")
    if num_train < 1 or num_test < 1:
      raise ValueError(f"disks_video needs num_train >= 1 and num_test >= 1, got {num_train}, "
                       f"{num_test} (config.data.num_train / num_test).")
    return cls(name=f"{factors}_s{image_size}_f{video_frames}_n{num_train}_t{num_test}",
               description=f"{video_frames} frames of {image_size}x{image_size}, factors "
               f"{disks.factor_names(factors)}, {num_train} train / {num_test} test sequences.",
               image_size=image_size, factors=factors, video_frames=video_frames,
               num_train=num_train, num_test=num_test)


class DisksVideo(disks.RenderedBuilder):
  """Sequences of disk frames with smoothly moving factors.

  Features: image uint8 [F, H, W, 1]; factors float32 [F, K]; id int32, the sequence's index in
  its split (records are stored in id order).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DisksVideoConfig.make()]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    names = disks.factor_names(cfg.factors)
    s, f = cfg.image_size, cfg.video_frames
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Raw uint8 tensors: tfds.features.Video/Image would need TensorFlow to encode.
            "image": tfds.features.Tensor(shape=(f, s, s, 1), dtype=np.uint8),
            "factors": tfds.features.Tensor(shape=(f, len(names)), dtype=np.float32),
            "id": np.int32,
        }),
        metadata=tfds.core.MetadataDict(
            factor_names=names,
            factor_ranges={k: list(v) for k, v in disks.factor_ranges(cfg.factors, s).items()}),
        disable_shuffling=True,
    )

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    rng = np.random.default_rng(
        disks.split_seed(self.name, str(self.VERSION), cfg.name, split))
    traj = sample_trajectories(rng, num, cfg.video_frames, cfg.factors, cfg.image_size)
    # Render a bounded number of frames per numpy call.
    chunk = max(1, 4096 // cfg.video_frames)
    for start in range(0, num, chunk):
      part = traj[start:start + chunk]
      images = disks.render_factors(part, cfg.factors, cfg.image_size)
      for i in range(len(part)):
        yield start + i, {"image": images[i], "factors": part[i], "id": start + i}


class DisksVideoDataset(disks.DisksDataset):
  """Disk sequences with smoothly moving factors, as the pipeline reads them."""

  name = "disks_video"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    d = config.data
    self.builder_config = DisksVideoConfig.make(
        image_size=d.image_size, factors=d.factors, video_frames=d.video_frames,
        num_train=d.num_train, num_test=d.num_test)

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    return self._open_builder(
        lambda: base.make_builder(DisksVideo, self.builder_config, self.data_dir))
