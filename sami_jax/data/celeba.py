"""CelebA 64x64 from TFDS's `celeb_a` (prepared by the user; never downloaded at run time).

Preprocessing (as DiffAE / InfoDiffusion): the aligned 218x178 (H x W) image is centre-cropped to
140x140 (rows 39..178, columns 19..158, torchvision's CenterCrop rounding) and resized to
config.data.image_size (64) with PIL's antialiased bilinear filter (torchvision's Resize on PIL
images). Attributes: the 40 binary attributes as an int vector in {0, 1}, in
`ATTRIBUTE_NAMES` order (TFDS stores them as booleans; the raw files use -1/1).

What TFDS 4.9.10's `celeb_a` builder (version 2.1.0) needs. It downloads five files from Google
Drive, which is often refused (quota), so put them in a manual folder instead; TFDS then uses
them and checks their checksums. Names (from TFDS's checksums.tsv for celeb_a):
  img_align_celeba.zip              (1,443,490,838 bytes, the aligned & cropped JPEGs)
  list_eval_partition.txt           (train/validation/test split)
  list_attr_celeba.txt              (40 attributes)
  list_landmarks_align_celeba.txt   (landmarks)
  identity_CelebA.txt               (identities)
Prepare with (no TensorFlow needed; `tfds build` itself needs TensorFlow in TFDS 4.9.10):
  python -m sami_jax.data.celeba --data_dir=DATA_DIR --manual_dir=MANUAL_DIR
or, where TensorFlow is installed:
  tfds build celeb_a --data_dir=DATA_DIR --manual_dir=MANUAL_DIR --file_format=array_record

Reading needs no TensorFlow: the data source decodes the stored JPEG with PIL (TFDS falls back
to PIL when OpenCV is absent).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from etils import epath
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sami_jax.data import base

TFDS_NAME = "celeb_a"
SPLITS = ("train", "validation", "test")
SOURCE_SHAPE = (218, 178)  # H, W of TFDS's aligned CelebA images.
CROP = 140
MANUAL_FILES = ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                "list_landmarks_align_celeba.txt", "identity_CelebA.txt")
# The 40 attributes in the order of list_attr_celeba.txt (and TFDS's builder).
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


def prepare_instructions(data_dir: str, manual_dir: str = "") -> str:
  """How to prepare celeb_a into `data_dir`, as shown to users."""
  manual = manual_dir or "MANUAL_DIR"
  return (
      f"CelebA is not prepared in {data_dir}. sami_jax never downloads it during a run; prepare "
      "it once:\n"
      f"  python -m sami_jax.data.celeba --data_dir={data_dir} --manual_dir={manual}\n"
      f"where {manual} holds the five files of the CelebA release (Google Drive, "
      "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html): " + ", ".join(MANUAL_FILES) +
      ". Without --manual_dir, TFDS tries to download them from Google Drive, which often "
      "fails on quota. With TensorFlow installed, the equivalent is:\n"
      f"  tfds build celeb_a --data_dir={data_dir} --manual_dir={manual} "
      "--file_format=array_record\n"
      "Then run again with --config.data.data_dir pointing at the same data_dir.")


def center_crop_resize(image: np.ndarray, size: int, channels: int = 3) -> np.ndarray:
  """Aligned CelebA image uint8 [218, 178, 3] -> uint8 [size, size, channels].

  Centre crop 140x140, then PIL bilinear (antialiased) resize; channels 1 converts to luma (L).
  """
  h, w = image.shape[:2]
  top = int(round((h - CROP) / 2.0))
  left = int(round((w - CROP) / 2.0))
  pil = Image.fromarray(np.ascontiguousarray(image[top:top + CROP, left:left + CROP]))
  pil = pil.resize((size, size), Image.BILINEAR)
  if channels == 1:
    return np.asarray(pil.convert("L"))[..., None]
  return np.asarray(pil.convert("RGB"))


def attributes_vector(attributes: dict[str, object]) -> np.ndarray:
  """TFDS's attribute dict (bool per name) -> int32 [40] in {0, 1}, ATTRIBUTE_NAMES order."""
  return np.array([int(bool(attributes[k])) for k in ATTRIBUTE_NAMES], np.int32)


class CelebADataset(base.Dataset):
  """TFDS celeb_a, cropped and resized at read time; splits train / validation / test."""

  name = "celeba"
  splits = SPLITS
  buildable = False

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.data.channels not in (1, 3):
      raise ValueError(f"celeba: config.data.channels must be 3 (RGB) or 1 (grayscale), got "
                       f"{config.data.channels}.")
    if not 8 <= config.data.image_size <= CROP:
      raise ValueError(f"celeba: config.data.image_size={config.data.image_size} must be in "
                       f"[8, {CROP}] (the 140x140 centre crop is resized to it; 64 is standard).")

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    # tfds.builder only reads metadata; nothing is downloaded unless download_and_prepare runs,
    # which this module only does from its command line.
    return self._open_builder(lambda: tfds.builder(TFDS_NAME, data_dir=self.data_dir))

  def _not_prepared_error(self, builder: tfds.core.DatasetBuilder) -> Exception:
    del builder
    return FileNotFoundError(prepare_instructions(self.data_dir, self.config.data.manual_dir))

  def example(self, record, index):
    return {"image": center_crop_resize(record["image"], self.config.data.image_size,
                                        self.config.data.channels),
            "attributes": attributes_vector(record["attributes"]),
            "id": np.int32(index)}

  def attribute_names(self) -> list[str]:
    return list(ATTRIBUTE_NAMES)


@contextlib.contextmanager
def _tfds_without_tensorflow():
  """Works around two places where TFDS 4.9.10's celeb_a preparation needs missing modules.

  * `DatasetBuilder.code_path` looks up `importlib_resources` (a backport TFDS only declares for
    Python < 3.9); the standard library's `importlib.resources` provides what it uses.
  * `extractor.iter_zip` opens the archive with `tf.io.gfile.GFile`; a local file opened by
    etils' epath (which also handles gs:// etc. where its backends are installed) does the same.
  Everything else on this path (checksums, JPEG bytes into the Image feature, array_record
  writing) runs without TensorFlow.
  """
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
  from tensorflow_datasets.core.download import extractor  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def open_or_pass(path_or_fobj):
    if isinstance(path_or_fobj, epath.PathLikeCls):
      # Not closed on exit: celeb_a keeps the zip members (file objects) after iterating the
      # archive and reads them later (TF's GFile tolerates that by reopening); the file closes
      # when those members are garbage-collected.
      yield epath.Path(path_or_fobj).open("rb")
    else:
      yield path_or_fobj

  added = sys.modules.setdefault("importlib_resources", importlib.resources) is importlib.resources
  original = extractor._open_or_pass  # pylint: disable=protected-access
  extractor._open_or_pass = open_or_pass  # pylint: disable=protected-access
  try:
    yield
  finally:
    extractor._open_or_pass = original  # pylint: disable=protected-access
    if added and "tensorflow" not in sys.modules:
      sys.modules.pop("importlib_resources", None)


def build(data_dir: str, manual_dir: str = "") -> str:
  """Downloads (or takes from manual_dir) and prepares celeb_a as array_record; returns its dir.

  This is the only place that downloads CelebA; it is run by the user, not during training.
  Needs about 1.4 GB for the zip plus ~1.4 GB for the prepared files, and a few GB of RAM
  (TFDS's builder holds all JPEGs in memory while writing).
  """
  with _tfds_without_tensorflow():
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir, file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=download_config)
  return os.fspath(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Prepare TFDS celeb_a as array_record for sami_jax.")
  parser.add_argument("--data_dir", required=True, help="TFDS data dir (config.data.data_dir).")
  parser.add_argument("--manual_dir", default="",
                      help="folder holding " + ", ".join(MANUAL_FILES))
  args = parser.parse_args(argv)
  if args.manual_dir:
    missing = [f for f in MANUAL_FILES if not os.path.exists(os.path.join(args.manual_dir, f))]
    if missing:
      raise FileNotFoundError(f"{args.manual_dir} lacks {missing}; download them from the CelebA "
                              "release (Google Drive) first.")
  print(build(os.path.expanduser(args.data_dir), os.path.expanduser(args.manual_dir)))


if __name__ == "__main__":
  main()
