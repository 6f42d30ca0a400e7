"""A user's folder of images as a dataset (TFDS builder "sami_image_folder").

Why a TFDS builder writing array_record (rather than a grain data source over the file list):
decoding, resizing and cropping arbitrary-size images is done once, when the dataset is built,
not in every epoch; unreadable files are found once, at build time; and the result goes through
exactly the same reader as every other dataset (random access, seeded order, process slices).
The build is cached per folder *state*: the builder config name holds a fingerprint of the
relative paths, sizes and modification times of the image files (and of image_size, channels),
so adding, removing or editing an image rebuilds, and an unchanged folder is reused.

Images: every file under config.data.folder, recursively, whose extension (any case) belongs to
a format PIL can read (`EXTENSIONS`: PNG, JPEG, GIF, TIFF, BMP, WebP, PPM, TGA, ...), sorted by
relative path. Symbolic links are followed, to files and to directories (each directory is
visited once, so a link loop ends). Files that cannot be listed are skipped and reported with the
reason: a dangling symbolic link, a link loop, a file name that is not valid UTF-8 (rename it), a
directory that cannot be read, a hidden image file (".name.png"; macOS's "._name.png" metadata
files among them).

Each image is decoded from its first frame (animated GIF / WebP / PNG, multi-page TIFF),
EXIF-rotated, brought to 8 bits, resized so its shorter side is config.data.image_size and
centre-cropped to a square (PIL ImageOps.fit, bicubic with antialiasing), and converted to
grayscale (channels 1) or RGB (channels 3): uint8 [S, S, C]. Bringing to 8 bits
(`to_8bit`): 16-bit images (PIL modes "I;16*", e.g. 16-bit PNG / TIFF) map 0..65535 to 0..255,
v -> round(v * 255 / 65535); 32-bit integer images (mode "I") the same when every value is within
0..65535 (16-bit data, as some readers deliver it), else 0..2**31-1; float images (mode "F") are
taken as 0 = black, 1 = white, unless their values exceed 1, in which case the white level is
the first of 255, 65535 or the image's maximum that covers them (negative values and NaN are
black). PIL's own conversion would clip these modes at 255 instead (a 16-bit image came out all
white).

Held-out split: deterministic from the relative path: among the files whose header PIL can read
(`probe`), a file goes to "test" when crc32(relative path) mod 1000 < 50 (5%); if that leaves
"test" empty and there are at least 2 files, the file with the smallest crc32 goes there, and if
it leaves "train" empty only that file stays in "test", so tiny folders still have both splits.
Files that cannot be opened or decoded are skipped; their names and reasons are logged as a
warning when the dataset is built and stored in `skipped_files.txt` next to the dataset. A folder
with no image file raises FileNotFoundError; one with fewer than 2 readable images raises
ValueError (a train and a test split need one image each).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import zlib

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
import tensorflow_datasets as tfds

from sami_jax.data import base


# Formats PIL identifies but has no decoder for (MPEG: only the header of a video is parsed).
_UNDECODABLE_FORMATS = frozenset({"MPEG"})


def _readable_extensions() -> tuple[str, ...]:
  """Lower-case extensions of the formats this PIL can open (stub plugins excluded)."""
  Image.init()
  out = set()
  for ext, fmt in Image.registered_extensions().items():
    opener = Image.OPEN.get(fmt)
    if opener is None or fmt in _UNDECODABLE_FORMATS:
      continue
    cls = opener[0]
    if isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile):
      continue  # e.g. HDF5, GRIB: PIL identifies them but cannot decode them
    out.add(ext.lower())
  return tuple(sorted(out))


EXTENSIONS = _readable_extensions()
TEST_PER_MILLE = 50
SKIPPED_FILENAME = "skipped_files.txt"
# A train and a test split need one image each.
MIN_IMAGES = 2


def _printable(relpath: str) -> str:
  """A relative path for messages; bytes that are not UTF-8 are shown as \\xNN."""
  return os.fsencode(relpath).decode("utf-8", "backslashreplace")


# Why a hidden file with an image extension is skipped: macOS writes "._NAME" (AppleDouble: the
# metadata of NAME, not an image) next to every file it copies to a non-Mac disk.
_HIDDEN_REASON = {True: "a macOS metadata file (._name), not an image",
                  False: "a hidden file: remove the leading '.' from its name to use it"}


def scan_folder(folder: str) -> tuple[list[str], list[str]]:
  """The image files under `folder` (module docstring) and the ones that cannot be used.

  Args:
    folder: an existing directory.

  Returns:
    (relative paths of the image files, sorted; ["relpath (reason)", ...] for the files and
    directories skipped while listing, sorted).
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist; set "
                            "--config.data.folder to a directory of images.")
  found: list[str] = []
  skipped: list[str] = []
  visited: set[tuple[int, int]] = set()

  def walk(directory: str, rel: str) -> None:
    try:
      st = os.stat(directory)
    except OSError as e:
      skipped.append(f"{_printable(rel)}/ (cannot open the directory: {e.strerror})")
      return
    key = (st.st_dev, st.st_ino)
    if key in visited:
      skipped.append(f"{_printable(rel)}/ (a symbolic link to a directory already included; "
                     "not read twice)")
      return
    visited.add(key)
    try:
      with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      skipped.append(f"{_printable(rel) or '.'}/ (cannot list the directory: {e.strerror})")
      return
    for entry in entries:
      name = entry.name
      path_rel = os.path.join(rel, name) if rel else name
      try:
        is_dir = entry.is_dir(follow_symlinks=True)
      except OSError:
        is_dir = False
      if not is_dir and not name.lower().endswith(EXTENSIONS):
        continue  # not an image file
      if not is_dir and name.startswith("."):
        skipped.append(f"{_printable(path_rel)} ({_HIDDEN_REASON[name.startswith('._')]})")
        continue
      try:
        name.encode("utf-8")
      except UnicodeEncodeError:
        what = "directory" if is_dir else "file"
        skipped.append(f"{_printable(path_rel)}{'/' if is_dir else ''} (the {what} name is not "
                       "valid UTF-8: rename it)")
        continue
      if is_dir:
        walk(entry.path, path_rel)
        continue
      try:
        st = os.stat(entry.path)
      except OSError as e:
        if entry.is_symlink():
          if e.errno == errno.ELOOP:
            reason = "symbolic link loop"
          else:
            try:
              reason = f"broken symbolic link to {os.readlink(entry.path)!r}"
            except OSError:
              reason = "broken symbolic link"
        else:
          reason = f"cannot read it: {e.strerror}"
        skipped.append(f"{_printable(path_rel)} ({reason})")
        continue
      if not stat.S_ISREG(st.st_mode):
        skipped.append(f"{_printable(path_rel)} (not a regular file)")
        continue
      found.append(path_rel)

  walk(folder, "")
  return sorted(found), sorted(skipped)


def list_images(folder: str) -> list[str]:
  """Relative paths of the image files under `folder`, recursively, sorted (see scan_folder)."""
  return scan_folder(folder)[0]


def assign_splits(relpaths: list[str]) -> dict[str, list[str]]:
  """Deterministic ~5% held-out split by crc32 of the relative path (module docstring)."""
  hashes = {p: zlib.crc32(p.encode("utf-8")) for p in relpaths}
  test = [p for p in relpaths if hashes[p] % 1000 < TEST_PER_MILLE]
  if len(relpaths) >= 2 and (not test or len(test) == len(relpaths)):
    test = [min(relpaths, key=lambda p: (hashes[p], p))]
  test_set = set(test)
  return {"train": [p for p in relpaths if p not in test_set], "test": sorted(test)}


def to_8bit(im: Image.Image) -> Image.Image:
  """The image with 16-bit, 32-bit integer and float modes scaled to 8 bits (module docstring).

  Other modes are returned as they are: PIL converts them to "L"/"RGB" correctly.
  """
  if not (im.mode.startswith("I") or im.mode == "F"):
    return im
  values = np.asarray(im)
  if values.ndim != 2:  # no multi-channel mode of this kind exists in PIL today
    raise ValueError(f"unsupported image mode {im.mode!r} with shape {values.shape}")
  values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  top = float(values.max()) if values.size else 0.0
  if im.mode.startswith("I;16"):
    white = 65535.0
  elif im.mode == "I":
    white = 65535.0 if top <= 65535 else 2.0**31 - 1
  else:  # "F"
    white = next((w for w in (1.0, 255.0, 65535.0) if top <= w), top)
  scaled = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
  return Image.fromarray(scaled, mode="L")


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """Decodes, EXIF-rotates, resizes + centre-crops one image: uint8 [S, S, channels].

  Animated or multi-page files give their first frame.

  Raises:
    OSError / ValueError (from PIL) if the file cannot be decoded.
  """
  with Image.open(path) as im:
    im.seek(0)
    im = ImageOps.exif_transpose(im)
    im = to_8bit(im)
    # Convert before resampling: palette modes cannot be resized directly.
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


def _too_few_message(folder: str, readable: list[str], skipped: list[str]) -> str:
  n = len(readable)
  which = f" ({', '.join(readable)})" if readable else ""
  text = (f"Image folder {folder!r} has {n} readable image{'s' if n != 1 else ''}{which}; at "
          f"least {MIN_IMAGES} are needed: one to train on and one held out for the test split. "
          "Add images to it (or point --config.data.folder elsewhere).")
  if skipped:
    text += " Skipped:\n  " + "\n  ".join(skipped)
  return text


class TooFewImagesError(ValueError):
  """The folder has fewer than MIN_IMAGES usable images."""


class EmptySplitError(ValueError):
  """Every image assigned to one split failed to decode."""


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
  # Not in repr: TFDS logs the config, and the lists can be long.
  relpaths: list[str] = dataclasses.field(default_factory=list, repr=False)
  # Files skipped while listing ("relpath (reason)"), reported with the decoding failures.
  unlisted: list[str] = dataclasses.field(default_factory=list, repr=False)

  @classmethod
  def make(cls, folder: str, image_size: int, channels: int) -> "FolderConfig":
    folder = os.path.abspath(os.path.expanduser(folder))
    relpaths, unlisted = scan_folder(folder)
    if not relpaths:
      skipped = ("; skipped: " + "; ".join(unlisted)) if unlisted else ""
      raise FileNotFoundError(
          f"Image folder {folder!r} contains no PNG/JPEG or other image file PIL can read "
          f"(searched recursively for {', '.join(EXTENSIONS)}){skipped}.")
    if len(relpaths) < MIN_IMAGES:
      raise TooFewImagesError(_too_few_message(folder, relpaths, unlisted))
    base = "".join(c if c.isalnum() else "_" for c in os.path.basename(folder))[:40] or "root"
    digest = hashlib.sha1(folder.encode("utf-8")).hexdigest()[:6]
    name = f"{base}_{digest}_{fingerprint(folder, relpaths)}"
    if unlisted:  # so that skipped_files.txt follows changes among them too
      name += "_" + hashlib.sha1("\n".join(unlisted).encode("utf-8")).hexdigest()[:6]
    name += f"_s{image_size}_c{channels}"
    return cls(name=name, description=f"Images of {folder}, {image_size}x{image_size}x{channels}.",
               folder=folder, image_size=image_size, channels=channels, relpaths=relpaths,
               unlisted=unlisted)


class SamiImageFolder(base.LocalBuilder):
  """Images of a folder, resized and centre-cropped; features image uint8 [S, S, C], id int32.

  `id` is the image's index in its split's sorted file list, `info.metadata["files"][split]`.
  The splits are assigned among the files whose header PIL can read (`probe`), so a split is
  not emptied by junk files; files that pass the probe but fail to decode are skipped (their id
  is then unused).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "16-bit, 32-bit and float images scaled to 8 bits (were clipped at 255); every "
               "format PIL reads; files skipped while listing are reported.",
  }

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped: list[str] = list(self.builder_config.unlisted)

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
    if len(readable) < MIN_IMAGES:
      raise TooFewImagesError(_too_few_message(cfg.folder, readable, self.skipped))
    files = assign_splits(readable)
    # Saved with the dataset (metadata.json): maps each split's ids back to file names.
    self.info.metadata["files"] = files
    return {split: self._generate_examples(split, files[split]) for split in ("train", "test")}

  def _generate_examples(self, split: str, files: list[str]):
    cfg = self.builder_config
    failures = []
    for i, rel in enumerate(files):
      try:
        image = load_image(os.path.join(cfg.folder, rel), cfg.image_size, cfg.channels)
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError... per format.
        failures.append(f"{rel} ({type(e).__name__}: {e})")
        continue
      yield i, {"image": image, "id": i}
    self.skipped.extend(failures)
    if files and len(failures) == len(files):
      raise EmptySplitError(
          f"Every image of the {split!r} split of {cfg.folder!r} failed to decode, so that split "
          "would be empty:\n  " + "\n  ".join(failures) + "\nReplace or remove those files "
          f"(at least {MIN_IMAGES} readable images are needed in all).")


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
      while cause is not None and len(chain) < 50:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
      for c in chain:
        if isinstance(c, (TooFewImagesError, EmptySplitError)):
          raise ValueError(str(c)) from None
      if any(isinstance(c, NoReadableImageError) for c in chain) or (
          "No examples were yielded" in str(e)):
        raise ValueError(self._no_readable_message(self.builder.skipped)) from None
      raise

  def _after_build(self, builder: tfds.core.DatasetBuilder) -> None:
    with open(os.path.join(builder.data_dir, SKIPPED_FILENAME), "w", encoding="utf-8") as f:
      f.write("".join(s + "\n" for s in builder.skipped))
    if builder.skipped:
      logging.warning("Skipped %d file(s) in %s:\n  %s", len(builder.skipped),
                      self.builder_config.folder, "\n  ".join(builder.skipped))

  def _no_readable_message(self, skipped: list[str]) -> str:
    return (f"No readable image in {self.builder_config.folder!r} (or a split has none); "
            "these files failed to decode:\n  " + "\n  ".join(skipped) + "\nPut images there "
            "(PNG, JPEG, GIF, TIFF, BMP, WebP, ...) or point --config.data.folder elsewhere.")

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
    """The files skipped (unlistable or unreadable) when the dataset was built (after prepare)."""
    path = os.path.join(self.builder.data_dir, SKIPPED_FILENAME)
    if not os.path.exists(path):
      return []
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f if line.strip()]

  def example(self, record, index):
    del index
    return {"image": record["image"], "id": record["id"]}
