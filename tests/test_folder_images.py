"""Image folders: high-bit-depth images are scaled (not clipped) to 8 bits, every format PIL reads
is used (first frame of animations), unusable names and links are skipped and listed, link loops
end, and a folder too small for a train and a test split says how many images are needed.

Expected pixel values are computed here from the values written (v * 255 / white, rounded).
"""

from __future__ import annotations

import os
import signal
import zlib

import numpy as np
from PIL import Image
import pytest

from sami_jax import configlib
from sami_jax.data import folder
from sami_jax.data import pipeline


@pytest.fixture(autouse=True)
def _fresh_cache():
  pipeline.clear_cache()
  yield
  pipeline.clear_cache()


@pytest.fixture
def time_limit():
  """Fails the test (instead of hanging the suite) if it runs past 60 s."""

  def on_alarm(signum, frame):
    raise TimeoutError("took more than 60 s (a symbolic link loop followed forever?)")

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(60)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def _config(data_dir, **data):
  c = configlib.default_config()
  c.data.name = "folder"
  c.data.data_dir = str(data_dir)
  c.train.batch_size = 2
  for k, v in data.items():
    c.data[k] = v
  return c


# A 4x4 grid of 16-bit levels: black, white, mid-grey, and values that are not multiples of 257.
_LEVELS_16 = np.array([[0, 65535, 32768, 1000],
                       [257, 514, 12345, 65000],
                       [40000, 128, 129, 385],
                       [255, 256, 60000, 7]], np.uint16)


def _expected_8bit(values: np.ndarray, white: float) -> np.ndarray:
  return np.clip(np.round(values.astype(np.float64) * 255.0 / white), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_grayscale_is_scaled_to_8_bits(tmp_path, ext):
  path = str(tmp_path / f"g16{ext}")
  Image.fromarray(_LEVELS_16).save(path)
  assert Image.open(path).mode == "I;16"  # what this test is about
  want = _expected_8bit(_LEVELS_16, 65535.0)
  assert want[0, 1] == 255 and want[0, 0] == 0 and want[0, 2] == 128 and want[0, 3] == 4
  # image_size = the image's size: ImageOps.fit does not resample, so the pixels are exact.
  gray = folder.load_image(path, 4, 1)
  assert gray.shape == (4, 4, 1) and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray[..., 0], want)
  rgb = folder.load_image(path, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], want)


def test_32bit_integer_and_float_images_are_scaled(tmp_path):
  # 16-bit data in a 32-bit integer image: white is 65535.
  as_int = _LEVELS_16.astype(np.int32)
  Image.fromarray(as_int).save(tmp_path / "i16.tif")
  np.testing.assert_array_equal(folder.load_image(str(tmp_path / "i16.tif"), 4, 1)[..., 0],
                                _expected_8bit(as_int, 65535.0))
  # Values beyond 16 bits: the full positive int32 range.
  wide = np.array([[0, 2**31 - 1], [2**30, 123456789]], np.int32)
  Image.fromarray(wide).save(tmp_path / "i32.tif")
  np.testing.assert_array_equal(folder.load_image(str(tmp_path / "i32.tif"), 2, 1)[..., 0],
                                _expected_8bit(wide, 2.0**31 - 1))
  # Float in [0, 1]; float in [0, 255] (values above 1); negatives and NaN are black.
  unit = np.array([[0.0, 1.0], [0.5, 0.2]], np.float32)
  Image.fromarray(unit).save(tmp_path / "f1.tif")
  np.testing.assert_array_equal(folder.load_image(str(tmp_path / "f1.tif"), 2, 1)[..., 0],
                                _expected_8bit(unit, 1.0))
  byte_range = np.array([[0.0, 200.0], [-5.0, np.nan]], np.float32)
  Image.fromarray(byte_range).save(tmp_path / "f255.tif")
  np.testing.assert_array_equal(folder.load_image(str(tmp_path / "f255.tif"), 2, 1)[..., 0],
                                [[0, 200], [0, 0]])


def _write_formats(root) -> dict[str, tuple[int, int, int]]:
  """One small image per format, each one solid colour (exact in these lossless formats)."""
  colours = {"a.gif": (200, 10, 10), "b.tif": (10, 200, 10), "c.bmp": (10, 10, 200),
             "d.webp": (90, 90, 90), "e.TGA": (30, 60, 90), "f.ppm": (250, 250, 0)}
  for name, colour in colours.items():
    image = Image.new("RGB", (6, 6), colour)
    if name.endswith(".gif"):  # animated: the second frame must not be used
      image.save(root / name, save_all=True, append_images=[Image.new("RGB", (6, 6), (0, 0, 0))])
    elif name.endswith(".webp"):
      image.save(root / name, lossless=True)
    else:
      image.save(root / name)
  return colours


def test_every_format_pil_reads_is_listed_and_decoded(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  colours = _write_formats(root)
  (root / "notes.txt").write_text("not an image")
  assert folder.list_images(str(root)) == sorted(colours)
  for name, colour in colours.items():
    np.testing.assert_array_equal(folder.load_image(str(root / name), 6, 3),
                                  np.broadcast_to(np.array(colour, np.uint8), (6, 6, 3)), name)


def _non_utf8_name(directory) -> str:
  """Creates a file whose name is not valid UTF-8; returns how os.listdir spells it."""
  raw = os.fsencode(str(directory)) + b"/caf\xe9.png"
  with open(raw, "wb") as f:
    f.write(b"whatever")
  return os.fsdecode(b"caf\xe9.png")


def test_unusable_names_and_links_are_skipped_and_listed(tmp_path, time_limit):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  for name in ("a.png", "sub/b.png"):
    Image.new("L", (4, 4), 100).save(root / name)
  (root / "gone.png").symlink_to(tmp_path / "deleted.png")  # dangling
  (root / "loop1.png").symlink_to(root / "loop2.png")  # a loop of two file links
  (root / "loop2.png").symlink_to(root / "loop1.png")
  (root / "sub" / "up").symlink_to(root)  # a directory link back to the top
  outside = tmp_path / "outside"
  outside.mkdir()
  Image.new("L", (4, 4), 200).save(outside / "c.png")
  (root / "linked").symlink_to(outside)  # a linked directory of images: used
  bad = _non_utf8_name(root)

  found, skipped = folder.scan_folder(str(root))
  assert found == ["a.png", "linked/c.png", "sub/b.png"]
  assert skipped == sorted([
      "caf\\xe9.png (the file name is not valid UTF-8: rename it)",
      f"gone.png (broken symbolic link to {str(tmp_path / 'deleted.png')!r})",
      "loop1.png (symbolic link loop)",
      "loop2.png (symbolic link loop)",
      "sub/up/ (a symbolic link to a directory already included; not read twice)",
  ]), skipped
  assert folder.list_images(str(root)) == found
  assert bad in os.listdir(root)

  # The dataset builds from the usable files and reports the others with their reasons.
  c = _config(tmp_path / "tfds", folder=str(root), image_size=4, channels=1)
  pipeline.prepare(c)
  ds = pipeline.dataset_for(c)
  assert sorted(ds.files()["train"] + ds.files()["test"]) == found
  assert ds.skipped_files() == skipped


def test_one_image_folder_says_how_many_are_needed(tmp_path):
  root = tmp_path / "one"
  root.mkdir()
  Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "only.png")
  c = _config(tmp_path / "tfds", folder=str(root), image_size=8, channels=3)
  with pytest.raises(ValueError) as info:
    pipeline.prepare(c)
  message = str(info.value)
  assert f"Image folder {str(root)!r} has 1 readable image (only.png); at least 2 are needed: " \
         "one to train on and one held out for the test split." in message, message

  # Two files of which one is unreadable: found when the dataset is built; the broken one is named.
  (root / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError) as info:
    pipeline.prepare(c)
  message = str(info.value)
  assert "has 1 readable image (only.png); at least 2 are needed" in message, message
  assert "broken.png (UnidentifiedImageError" in message, message


def test_splits_are_never_empty(tmp_path):
  # Names that crc32 would both send to "test" (the test-split rule of the module docstring).
  held_out = [n for n in (f"img{i}.png" for i in range(5000))
              if zlib.crc32(n.encode("utf-8")) % 1000 < folder.TEST_PER_MILLE][:2]
  assert len(held_out) == 2
  splits = folder.assign_splits(sorted(held_out))
  first = min(held_out, key=lambda n: zlib.crc32(n.encode("utf-8")))
  assert splits == {"train": [n for n in sorted(held_out) if n != first], "test": [first]}


def test_hidden_image_files_are_skipped_and_listed_with_the_reason(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for name in ("a.png", ".hidden.png", "._a.png"):
    Image.new("L", (4, 4), 100).save(root / name, format="PNG")
  (root / ".DS_Store").write_bytes(b"not an image, not listed")
  found, skipped = folder.scan_folder(str(root))
  assert found == ["a.png"]
  assert skipped == [
      "._a.png (a macOS metadata file (._name), not an image)",
      ".hidden.png (a hidden file: remove the leading '.' from its name to use it)",
  ], skipped
