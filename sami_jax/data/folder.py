"""A user's folder of PNG/JPEG images as a dataset (TFDS builder "sami_image_folder").

Why a TFDS builder writing array_record (rather than a grain data source over the file list):
decoding, resizing and cropping arbitrary-size images is done once, when the dataset is built,
not in every epoch; unreadable files are found once, at build time; and the result goes through
exactly the same reader as every other dataset (random access, seeded order, process slices).
The build is cached per folder *state*: the builder config name holds a fingerprint of the
relative paths, sizes and modification times of the image files (and of image_size, channels),
so adding, removing or editing an image rebuilds, and an unchanged folder is reused.

Images: every *.png / *.jpg / *.jpeg (any case) under config.data.folder, recursively, sorted by
relative path. Each is EXIF-rotated, resized so its shorter side is config.data.image_size and
centre-cropped to a square (PIL ImageOps.fit, bicubic with antialiasing), and converted to
grayscale (channels 1) or RGB (channels 3): uint8 [S, S, C].

Held-out split: deterministic from the relative path: among the files whose header PIL can read
(`probe`), a file goes to "test" when crc32(relative path) mod 1000 < 50 (5%); if that leaves
"test" empty and there are at least 2 files, the file with the smallest crc32 goes there, so tiny
folders still have a test example. Files that cannot be opened or decoded are skipped; their
names are logged as a warning when the dataset is built and stored in `skipped_files.txt` next to
the dataset. A folder with no image file raises FileNotFoundError; one whose images are all
unreadable raises ValueError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zlib

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from sami_jax.data import base

EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_PER_MILLE = 50
SKIPPED_FILENAME = "skipped_files.txt"


def list_images(folder: str) -> list[str]:
  """Relative paths of the image files under `folder`, recursively, sorted."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist; set "
                            "--config.data.folder to a directory of PNG/JPEG images.")
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for f in files:
      if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
        out.append(os.path.relpath(os.path.join(root, f), folder))
  return sorted(out)


def assign_splits(relpaths: list[str]) -> dict[str, list[str]]:
  """Deterministic ~5% held-out split by crc32 of the relative path (module docstring)."""
  hashes = {p: zlib.crc32(p.encode("utf-8")) for p in relpaths}
  test = [p for p in relpaths if hashes[p] % 1000 < TEST_PER_MILLE]
  if not test and len(relpaths) >= 2:
    test = [min(relpaths, key=lambda p: (hashes[p], p))]
  test_set = set(test)
  return {"train": [p for p in relpaths if p not in test_set], "test": sorted(test)}


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """Decodes, EXIF-rotates, resizes + centre-crops one image: uint8 [S, S, channels].

  Raises:
    OSError / ValueError (from PIL) if the file cannot be decoded.
  """
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im)
    # Convert before resampling: palette / 16-bit modes cannot be resized directly.
    im = im.convert("L" if channels == 1 else "RGB")
    im = ImageOps.fit(im, (image_size, image_size), method=Image.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(im, np.uint8)
  return arr[..., None] if channels == 1 else arr


def probe(path: str) -> str:
  """'' if PIL can identify and verify the file's structure, else the error (cheap: no decode)."""
  try:
    with Image.open(path) as im:
      im.verify()
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... depending on the format.
    return f"{type(e).__name__}: {e}"
  return ""


class NoReadableImageError(ValueError):
  """Every image file of the folder failed to open."""

  def __init__(self, skipped: list[str]):
    super().__init__("No readable image; every file failed to open:\n  " + "\n  ".join(skipped))
    self.skipped = skipped


def fingerprint(folder: str, relpaths: list[str]) -> str:
  """Hex digest of the files' relative paths, sizes and modification times."""
  h = hashlib.sha1()
  for p in relpaths:
    st = os.stat(os.path.join(folder, p))
    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
  return h.hexdigest()[:12]


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """Settings of a folder dataset; the name holds the folder's fingerprint."""
  folder: str = ""
  image_size: int = 64
  channels: int = 3
  # Not in repr: TFDS logs the config, and the list can be long.
  relpaths: list[str] = dataclasses.field(default_factory=list, repr=False)

  @classmethod
  def make(cls, folder: str, image_size: int, channels: int) -> "FolderConfig":
    folder = os.path.abspath(os.path.expanduser(folder))
    relpaths = list_images(folder)
    if not relpaths:
      raise FileNotFoundError(f"Image folder {folder!r} contains no PNG/JPEG file "
                              f"(searched recursively for {', '.join(EXTENSIONS)}).")
    base = "".join(c if c.isalnum() else "_" for c in os.path.basename(folder))[:40] or "root"
    digest = hashlib.sha1(folder.encode("utf-8")).hexdigest()[:6]
    name = f"{base}_{digest}_{fingerprint(folder, relpaths)}_s{image_size}_c{channels}"
    return cls(name=name, description=f"Images of {folder}, {image_size}x{image_size}x{channels}.",
               folder=folder, image_size=image_size, channels=channels, relpaths=relpaths)


class SamiImageFolder(base.LocalBuilder):
  """Images of a folder, resized and centre-cropped; features image uint8 [S, S, C], id int32.

  `id` is the image's index in its split's sorted file list, `info.metadata["files"][split]`.
  The splits are assigned among the files whose header PIL can read (`probe`), so a split is
  not emptied by junk files; files that pass the probe but fail to decode are skipped (their id
  is then unused).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped: list[str] = []

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s, c = cfg.image_size, cfg.channels
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Raw uint8: tfds.features.Image would need TensorFlow to encode numpy arrays.
            "image": tfds.features.Tensor(shape=(s, s, c), dtype=np.uint8),
            "id": np.int32,
        }),
        metadata=tfds.core.MetadataDict(folder=cfg.folder),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    readable = []
    for rel in cfg.relpaths:
      error = probe(os.path.join(cfg.folder, rel))
      if error:
        self.skipped.append(f"{rel} ({error})")
      else:
        readable.append(rel)
    if not readable:
      raise NoReadableImageError(self.skipped)
    files = assign_splits(readable)
    # Saved with the dataset (metadata.json): maps each split's ids back to file names.
    self.info.metadata["files"] = files
    return {split: self._generate_examples(split, files[split]) for split in ("train", "test")}

  def _generate_examples(self, split: str, files: list[str]):
    del split
    cfg = self.builder_config
    for i, rel in enumerate(files):
      try:
        image = load_image(os.path.join(cfg.folder, rel), cfg.image_size, cfg.channels)
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError... per format.
        self.skipped.append(f"{rel} ({type(e).__name__}: {e})")
        continue
      yield i, {"image": image, "id": i}


class FolderDataset(base.Dataset):
  """config.data.folder as a dataset with splits train / test."""

  name = "folder"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if not config.data.folder:
      raise ValueError("The folder dataset needs --config.data.folder=/path/to/images.")
    if config.data.channels not in (1, 3):
      raise ValueError(f"folder: config.data.channels must be 1 (grayscale) or 3 (RGB), got "
                       f"{config.data.channels}.")
    if config.data.image_size < 1:
      raise ValueError(f"folder: config.data.image_size must be positive, got "
                       f"{config.data.image_size}.")
    self.builder_config = FolderConfig.make(config.data.folder, config.data.image_size,
                                            config.data.channels)

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    return self._open_builder(lambda: SamiImageFolder(
        config=self.builder_config, data_dir=self.data_dir, file_format="array_record"))

  def prepare(self) -> str:
    try:
      return super().prepare()
    except Exception as e:  # pylint: disable=broad-except
      # TFDS wraps errors raised while generating; find ours, or an empty split (every file of
      # that split passed the header probe but failed to decode).
      cause, chain = e, []
      while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
      if any(isinstance(c, NoReadableImageError) for c in chain) or (
          "No examples were yielded" in str(e)):
        raise ValueError(self._no_readable_message(self.builder.skipped)) from None
      raise

  def _after_build(self, builder: tfds.core.DatasetBuilder) -> None:
    with open(os.path.join(builder.data_dir, SKIPPED_FILENAME), "w") as f:
      f.write("".join(s + "\n" for s in builder.skipped))
    if builder.skipped:
      logging.warning("Skipped %d unreadable image(s) in %s:\n  %s", len(builder.skipped),
                      self.builder_config.folder, "\n  ".join(builder.skipped))

  def _no_readable_message(self, skipped: list[str]) -> str:
    return (f"No readable image in {self.builder_config.folder!r} (or a split has none); "
            "these files failed to decode:\n  " + "\n  ".join(skipped) + "\nPut PNG/JPEG "
            "images there (or point --config.data.folder elsewhere).")

  def files(self) -> dict[str, list[str]]:
    """{split: relative paths}; a record's `id` indexes its split's list (after prepare)."""
    return dict(self.builder.info.metadata["files"])

  def example_keys(self, split: str) -> list[str]:
    """The relative path of every record of a split, in record order (after prepare)."""
    files = self.files()[split]
    src = self.source(split)
    if len(src) == len(files):  # nothing was skipped while decoding: record i is file i
      return list(files)
    return [files[int(src[i]["id"])] for i in range(len(src))]

  def skipped_files(self) -> list[str]:
    """The files skipped as unreadable when the dataset was built (after prepare)."""
    path = os.path.join(self.builder.data_dir, SKIPPED_FILENAME)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [line.rstrip("\n") for line in f if line.strip()]

  def example(self, record, index):
    del index
    return {"image": record["image"], "id": record["id"]}
