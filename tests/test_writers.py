"""Tests for sami_jax.utils.writers (metrics.jsonl, TensorBoard events, progress line) and
sami_jax.utils.images (grids, PNG)."""

import glob
import io
import json
import os
import struct
import time

import numpy as np
import pytest
from PIL import Image

from sami_jax.utils import images as images_lib
from sami_jax.utils import writers as writers_lib

# ------------------------------------------------------------------ TensorBoard event reading


def _crc32c(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli), written from the definition, to check the records."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: str) -> list:
  """Parses a TFRecord file of Event protos, checking both CRCs of every record."""
  from tensorboardX.proto import event_pb2  # the proto definition only, not the writer
  events = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked(_crc32c(header))
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == _masked(_crc32c(payload))
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    pos += 16 + length
  assert pos == len(data)
  return events


# ------------------------------------------------------------------------------ MetricWriter


def test_metrics_jsonl_and_tensorboard(tmp_path):
  t0 = time.time()
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1) * 40
  with writers_lib.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": np.float32(0.5), "kl": 2})
    writer.write_scalars(2, {"loss": float("nan"), "kl": np.array(3.25)})
    writer.write_images(2, {"recon": image, "gray": gray})
  t1 = time.time()

  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"], r["kl"]) for r in lines] == [(1, 0.5, 2.0), (2, None, 3.25)]
  assert all(t0 <= r["time"] <= t1 for r in lines)

  files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert len(files) == 1
  events = _read_events(files[0])
  scalars, imgs = {}, {}
  for e in events:
    for v in e.summary.value:
      if v.HasField("image"):
        imgs[(v.tag, e.step)] = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
      else:
        scalars[(v.tag, e.step)] = v.simple_value
  assert scalars[("loss", 1)] == 0.5 and scalars[("kl", 1)] == 2.0
  assert scalars[("kl", 2)] == 3.25 and np.isnan(scalars[("loss", 2)])
  np.testing.assert_array_equal(imgs[("recon", 2)], image)
  # tensorboardX stores a grayscale image as RGB with three equal channels.
  got_gray = imgs[("gray", 2)]
  assert got_gray.shape[:2] == (2, 3)
  for channel in np.moveaxis(got_gray.reshape(2, 3, -1), -1, 0):
    np.testing.assert_array_equal(channel, gray[..., 0])


def test_metrics_file_is_appended_on_resume(tmp_path):
  for step in (1, 2):
    writer = writers_lib.MetricWriter(tmp_path)
    writer.write_scalars(step, {"loss": step / 10})
    writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_metrics_lines_are_on_disk_before_flush_or_close(tmp_path):
  # A live run's metrics.jsonl must be readable while the run goes on (tail -f, plotting).
  writer = writers_lib.MetricWriter(tmp_path)
  writer.write_scalars(7, {"loss": 0.25})
  with open(tmp_path / "metrics.jsonl") as f:
    assert [(r["step"], r["loss"]) for r in map(json.loads, f)] == [(7, 0.25)]
  writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
  writer = writers_lib.MetricWriter(tmp_path / "w", enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  writer.flush()
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_writer_rejects_bad_images_and_names(tmp_path):
  with writers_lib.MetricWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="uint8"):
      writer.write_images(1, {"x": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(1, {"time": 1.0})


# ---------------------------------------------------------------------------------- Progress


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def test_progress_line_rate_and_eta():
  clock = FakeClock()
  progress = writers_lib.Progress(3000, 1000, clock=clock)
  clock.now = 100.0  # the first logged step includes compilation: no rate yet
  assert progress.line(1001, {"loss": 0.0312}) == (
      "step 1001/3000 (33.4%) | loss 0.0312 | -- steps/s | ETA --")
  # 199 steps at 7.31 steps/s; 1800 steps left -> 246.2 s.
  clock.now = 100.0 + 199 / 7.31
  assert progress.line(1200, {"loss": 0.0312, "kl": 1.2}) == (
      "step 1200/3000 (40.0%) | loss 0.0312 kl 1.2 | 7.31 steps/s | ETA 4m06s")
  assert progress.rate() == pytest.approx(7.31)


def test_progress_window_and_repeated_step():
  clock = FakeClock()
  progress = writers_lib.Progress(10_000, 0, clock=clock, window=2)
  for step, t in [(1, 50.0), (101, 60.0), (201, 70.0), (301, 90.0)]:
    clock.now = t
    assert progress.rate(step) >= 0.0
  # Window of 2 intervals: points (101, 60), (201, 70), (301, 90) -> 200 steps / 30 s.
  assert progress.rate() == pytest.approx(200 / 30)
  clock.now = 1000.0
  progress.line(301)  # same step again: keeps the first time, the rate is unchanged
  assert progress.rate() == pytest.approx(200 / 30)
  assert progress.eta(301) == pytest.approx((10_000 - 301) / (200 / 30))


@pytest.mark.parametrize("seconds,text", [
    (0.4, "0s"), (45, "45s"), (246.2, "4m06s"), (3725, "1h02m"), (90061, "1d01h")])
def test_format_duration(seconds, text):
  assert writers_lib.format_duration(seconds) == text


# ------------------------------------------------------------------------------------ images


def test_make_grid_geometry_and_values():
  # 5 images of 2x3 pixels, 2 per row -> 3 rows; image i is the constant v[i].
  v = np.array([-1.0, 1.0, 0.5, -0.5, 2.0], np.float32)  # 2.0 is clipped to 1
  images = np.broadcast_to(v[:, None, None, None], (5, 2, 3, 3)).copy()
  grid = images_lib.make_grid(images, ncol=2, pad=1, min_cell=0)  # the images' own resolution
  assert grid.dtype == np.uint8
  assert grid.shape == (3 * 2 + 4 * 1, 2 * 3 + 3 * 1, 3)  # (10, 9, 3)
  # (v + 1) * 127.5 rounded: -1 -> 0, 1 -> 255, 0.5 -> 191.25 -> 191, -0.5 -> 63.75 -> 64.
  expected_values = [0, 255, 191, 64, 255]
  expected = np.zeros((10, 9, 3), np.uint8)  # padding and the empty last cell stay 0
  for i, value in enumerate(expected_values):
    r, c = divmod(i, 2)
    y, x = 1 + r * 3, 1 + c * 4
    expected[y:y + 2, x:x + 3] = value
  np.testing.assert_array_equal(grid, expected)


def test_make_grid_uint8_grayscale_and_errors():
  images = np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 1)
  grid = images_lib.make_grid(images, ncol=8, pad=0, min_cell=0)  # ncol capped at N
  np.testing.assert_array_equal(grid[..., 0], np.concatenate([images[0, ..., 0],
                                                              images[1, ..., 0]], axis=1))
  with pytest.raises(ValueError, match="C = 1 or 3"):
    images_lib.make_grid(np.zeros((1, 2, 2, 2), np.float32), ncol=1)
  with pytest.raises(ValueError, match="empty"):
    images_lib.make_grid(np.zeros((0, 2, 2, 3), np.float32), ncol=1)
  with pytest.raises(ValueError, match="float"):
    images_lib.make_grid(np.zeros((1, 2, 2, 3), np.int32), ncol=1)


def test_save_png_rgb_and_grayscale(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
  gray = rgb[..., :1]
  images_lib.save_png(tmp_path / "a" / "rgb.png", rgb)
  images_lib.save_png(tmp_path / "gray.png", gray)
  with Image.open(tmp_path / "a" / "rgb.png") as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
  with Image.open(tmp_path / "gray.png") as im:
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), gray[..., 0])
  with pytest.raises(ValueError, match="uint8"):
    images_lib.save_png(tmp_path / "x.png", rgb.astype(np.float32))


def test_upscale_nearest_by_hand():
  # [1, 2, 2, 1]: [[a, b], [c, d]] -> each value becomes a 3x3 block.
  image = np.array([[10, 20], [30, 40]], np.uint8)[None, :, :, None]
  up = images_lib.upscale_nearest(image, 3)
  expected = np.array([[10, 10, 10, 20, 20, 20]] * 3 + [[30, 30, 30, 40, 40, 40]] * 3, np.uint8)
  assert up.shape == (1, 6, 6, 1) and up.dtype == np.uint8
  np.testing.assert_array_equal(up[0, ..., 0], expected)
  np.testing.assert_array_equal(images_lib.upscale_nearest(image, 1), image)
  with pytest.raises(ValueError, match="integer factor"):
    images_lib.upscale_nearest(image, 0)
  with pytest.raises(ValueError, match="H, W, C"):
    images_lib.upscale_nearest(np.zeros((2, 2)), 2)


@pytest.mark.parametrize("h,w,min_cell,scale", [
    (16, 16, 64, 4), (32, 32, 64, 2), (64, 64, 64, 1), (20, 20, 64, 4), (16, 40, 64, 4),
    (100, 100, 64, 1), (16, 16, 0, 1)])
def test_cell_scale(h, w, min_cell, scale):
  # ceil(min_cell / min(h, w)), at least 1: 64 / 20 = 3.2 -> 4 (3 would give 60 px cells).
  assert images_lib.cell_scale(h, w, min_cell) == scale


def test_make_grid_default_cells_are_at_least_64px():
  """The quick start's case: 16x16 images, 8 per row, 2 rows, pad 1 -> raw 35 x 137 px."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)
  raw = images_lib.make_grid(images, ncol=8, min_cell=0)
  assert raw.shape == (2 * 16 + 3, 8 * 16 + 9, 1)  # (35, 137, 1)
  grid = images_lib.make_grid(images, ncol=8)
  # Scale 4: every raw pixel, padding included, becomes a 4x4 block; cells are 64 px.
  assert grid.shape == (35 * 4, 137 * 4, 1)
  for i in range(16):
    r, c = divmod(i, 8)
    y, x = 4 * (1 + r * 17), 4 * (1 + c * 17)  # cell origin: (pad + r * (16 + pad)) * 4
    cell = grid[y:y + 64, x:x + 64, 0]
    # Pixel (a, b) of the 64x64 cell is pixel (a // 4, b // 4) of image i.
    a, b = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    np.testing.assert_array_equal(cell, images[i, a // 4, b // 4, 0])
  # The padding between cells is 4 px of 0 (pad_value).
  assert (grid[:4] == 0).all() and (grid[:, 4 + 64:4 + 64 + 4] == 0).all()


def test_save_grid(tmp_path):
  images = np.ones((3, 2, 2, 1), np.float32)  # all white -> 255, padding 0
  path = images_lib.save_grid(tmp_path / "g.png", images, ncol=3, min_cell=0)
  with Image.open(path) as im:
    pixels = np.asarray(im)
  assert pixels.shape == (2 + 2, 3 * 2 + 4)
  assert pixels.sum() == 3 * 4 * 255
  # Default: 2 px images are enlarged 32x (64 / 2) in the PNG, padding included.
  path = images_lib.save_grid(tmp_path / "big.png", images, ncol=3)
  with Image.open(path) as im:
    pixels = np.asarray(im)
  assert pixels.shape == (32 * 4, 32 * 10)
  assert pixels.sum() == 3 * 4 * 255 * 32 * 32
  assert (pixels[32:32 + 64, 32:32 + 64] == 255).all()  # the first cell, 64 x 64 px
