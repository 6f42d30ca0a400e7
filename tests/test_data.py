"""Tests of the datasets (TFDS builders) and the grain input pipeline.

Datasets are kept tiny (config.data.num_train / num_test) and built into pytest's tmp_path.
Expected values come from independent computations: pixel statistics of the rendered images, the
documented uint8 -> [-1, 1] scaling, set arithmetic on ids, and images made here with PIL.
"""

from __future__ import annotations

import glob
import math
import os
import zlib
import subprocess
import sys
import time

from absl import logging
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from sami_jax import configlib
from sami_jax.data import base
from sami_jax.data import celeba
from sami_jax.data import disks
from sami_jax.data import disks_video
from sami_jax.data import folder
from sami_jax.data import pipeline


def _config(data_dir, **data):
  c = configlib.default_config()
  c.data.data_dir = str(data_dir)
  c.data.num_train = 50
  c.data.num_test = 21
  c.train.batch_size = 8
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(autouse=True)
def _fresh_cache():
  pipeline.clear_cache()
  yield
  pipeline.clear_cache()


def _read_split(data_dir, builder_cls, cfg, split):
  b = base.make_builder(builder_cls, cfg, str(data_dir))
  b.download_and_prepare()
  src = b.as_data_source(split=split)
  recs = [src[i] for i in range(len(src))]
  return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


# --------------------------------------------------------------------------- disks


def test_disks_builder_is_deterministic(tmp_path):
  cfg = disks.DisksConfig.make(image_size=32, factors="xy_bg_r_fg", num_train=40, num_test=10)
  a = _read_split(tmp_path / "a", disks.Disks, cfg, "train")
  b = _read_split(tmp_path / "b", disks.Disks, cfg, "train")
  for k in ("image", "factors", "id"):
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(a["id"], np.arange(40))
  test = _read_split(tmp_path / "a", disks.Disks, cfg, "test")
  # Splits are seeded differently: the test factors are not a prefix of the train factors.
  assert not np.allclose(test["factors"], a["factors"][:10])


def _recover(images: np.ndarray):
  """Independent estimates from pixels: background (corner), foreground (max), centroid, area.

  images uint8 [N, H, W, 1] -> dict of [N] arrays in the units of disks.py.
  """
  img = images[..., 0].astype(np.float64) / 255.0
  bg = img[:, 0, 0]
  fg = img.max(axis=(1, 2))
  w = img - bg[:, None, None]   # Exactly 0 on background pixels (same value, same rounding).
  centres = np.arange(img.shape[1]) + 0.5
  mass = w.sum(axis=(1, 2))
  x = (w * centres[None, None, :]).sum(axis=(1, 2)) / mass
  y = (w * centres[None, :, None]).sum(axis=(1, 2)) / mass
  # Coverage = w / (fg - bg); the linear-ramp disk covers pi r^2 + pi / 12 pixels.
  area = mass / (fg - bg)
  radius = np.sqrt((area - math.pi / 12) / math.pi)
  return dict(x=x, y=y, background=bg, foreground=fg, radius=radius)


@pytest.mark.parametrize("factor_set", ["xy_bg", "xy_bg_r_fg"])
def test_disks_factors_match_pixels(tmp_path, factor_set):
  cfg = disks.DisksConfig.make(image_size=32, factors=factor_set, num_train=64, num_test=4)
  data = _read_split(tmp_path, disks.Disks, cfg, "train")
  names = disks.factor_names(factor_set)
  est = _recover(data["image"])
  stored = {n: data["factors"][:, i] for i, n in enumerate(names)}
  # Centre: the only errors are uint8 rounding (<= 0.5/255 per disk pixel, unbiased) and the
  # pixel-grid sampling of a radially symmetric profile; measured < 0.03 px. 0.1 px is far below
  # the 0.5 px a half-pixel coordinate-convention error would produce, and swapping x and y
  # would be off by pixels (the factor range is ~19 px wide).
  np.testing.assert_allclose(est["x"], stored["x"], atol=0.1)
  np.testing.assert_allclose(est["y"], stored["y"], atol=0.1)
  # Background: the corner is background; uint8 rounding is at most 0.5/255 ~= 0.002.
  np.testing.assert_allclose(est["background"], stored["background"], atol=0.5 / 255 + 1e-6)
  if "radius" in names:
    # The centre pixel is fully covered (r >= 3.2 > 0.5 + half a pixel diagonal), so the max
    # pixel is the foreground up to rounding.
    np.testing.assert_allclose(est["foreground"], stored["foreground"], atol=0.5 / 255 + 1e-6)
    # Area -> radius: rounding and grid sampling; measured < 0.03 px, 0.1 px tolerated (the
    # radius range is 3.2 px wide).
    np.testing.assert_allclose(est["radius"], stored["radius"], atol=0.1)
  else:
    np.testing.assert_allclose(est["radius"], 32 / 6, atol=0.1)
    np.testing.assert_allclose(est["foreground"], 1.0, atol=0.5 / 255 + 1e-6)
  # The disk, with its anti-aliasing ramp, never touches the border.
  border = np.concatenate([data["image"][:, 0], data["image"][:, -1], data["image"][:, :, 0],
                           data["image"][:, :, -1]], axis=1)[..., 0]
  assert (border == data["image"][:, :1, 0, 0]).all()
  # Factors vary over a wide range (uniform over the centre range, ~6.3..25.7 px at 32x32).
  assert stored["x"].max() - stored["x"].min() > 12
  assert stored["background"].max() - stored["background"].min() > 0.3


def test_disks_render_is_chunk_invariant_and_matches_hand_values():
  # Rendering is vectorised in chunks of _RENDER_CHUNK images: a batch that crosses a chunk
  # boundary renders exactly as the same images one at a time.
  n = disks._RENDER_CHUNK + 3  # pylint: disable=protected-access
  f = disks.sample_factors(np.random.default_rng(0), n, "xy_bg", 16)
  images = disks.render_factors(f, "xy_bg", 16)
  assert images.shape == (n, 16, 16, 1) and images.dtype == np.uint8
  for i in (0, disks._RENDER_CHUNK - 1, disks._RENDER_CHUNK, n - 1):  # pylint: disable=protected-access
    np.testing.assert_array_equal(images[i], disks.render_factors(f[i:i + 1], "xy_bg", 16)[0])
  # One disk by hand: centre (4.5, 6.5) px is pixel (row 6, col 4)'s centre, radius 2, bg 0.2.
  img = disks.render_disks(np.array([4.5]), np.array([6.5]), np.array([2.0]), np.array([0.2]),
                           np.array([1.0]), 16)[0, ..., 0]
  assert img[6, 4] == 255                      # distance 0: full coverage
  assert img[6, 6] == round(255 * (0.2 + 0.8 * 0.5))  # distance 2: coverage r - d + 0.5 = 0.5
  assert img[6, 8] == round(255 * 0.2)         # distance 4: background only
  assert img[0, 15] == round(255 * 0.2)


def test_disks_video_moves_smoothly(tmp_path):
  cfg = disks_video.DisksVideoConfig.make(image_size=32, factors="xy_bg", video_frames=8,
                                          num_train=6, num_test=2)
  data = _read_split(tmp_path, disks_video.DisksVideo, cfg, "train")
  assert data["image"].shape == (6, 8, 32, 32, 1)
  assert data["factors"].shape == (6, 8, 3)
  est = _recover(data["image"].reshape(-1, 32, 32, 1))
  xy = np.stack([est["x"], est["y"]], -1).reshape(6, 8, 2)
  np.testing.assert_allclose(xy, data["factors"][..., :2], atol=0.1)
  step = np.diff(xy, axis=1)                                # [6, 7, 2] pixels per frame.
  # At most half the centre range (~19.3 px) over 7 intervals: <= 1.38 px per frame (+ tol).
  assert np.abs(step).max() < 1.5
  assert np.abs(step).max() > 0.05                          # It does move.
  # Constant velocity: successive displacements agree up to the 0.1 px estimation error.
  assert np.abs(np.diff(step, axis=1)).max() < 0.2
  bg = est["background"].reshape(6, 8)
  assert np.abs(bg[:, -1] - bg[:, 0]).max() <= 0.1 + 1 / 255


# --------------------------------------------------------------------------- train iterator


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_iterator_is_a_function_of_seed_and_step(tmp_path):
  c = _config(tmp_path)
  first = _take(pipeline.train_iterator(c, start_step=0), 9)
  again = _take(pipeline.train_iterator(c, start_step=0), 9)
  for a, b in zip(first, again):
    _assert_batches_equal(a, b)
  # Resume at step 5 == steps 5.. of an uninterrupted run (crossing the epoch end at 50).
  resumed = _take(pipeline.train_iterator(c, start_step=5), 4)
  for a, b in zip(first[5:], resumed):
    _assert_batches_equal(a, b)
  # Two processes' rows, concatenated, are the single-process batch.
  p0 = _take(pipeline.train_iterator(c, start_step=0, process_index=0, process_count=2), 9)
  p1 = _take(pipeline.train_iterator(c, start_step=0, process_index=1, process_count=2), 9)
  for a, b0, b1 in zip(first, p0, p1):
    assert b0["image"].shape[0] == 4
    _assert_batches_equal(a, {k: np.concatenate([b0[k], b1[k]]) for k in a})
  # Another seed, another order.
  c2 = _config(tmp_path)
  c2.seed = 1
  other = _take(pipeline.train_iterator(c2, start_step=0), 2)
  assert not np.array_equal(other[0]["id"], first[0]["id"])

  # Epochs: the first 50 positions are each of the 50 examples once, and so are the next 50.
  ids = np.concatenate([b["id"] for b in first + resumed[4:]])
  assert sorted(ids[:50]) == list(range(50))
  assert len(set(ids[50:72])) == 22
  assert not np.array_equal(ids[:22], ids[50:72])         # Reshuffled per epoch.

  # Batch contents: the documented scaling of the stored record with that id.
  b = first[0]
  assert b["image"].dtype == np.float32 and b["image"].shape == (8, 32, 32, 1)
  assert b["factors"].dtype == np.float32 and b["factors"].shape == (8, 3)
  assert b["id"].dtype == np.int32
  src = pipeline.dataset_for(c).source("train")
  for row, i in enumerate(b["id"]):
    rec = src[int(i)]
    np.testing.assert_allclose(b["image"][row], rec["image"] / 255.0 * 2.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(b["factors"][row], rec["factors"])


def test_train_iterator_rejects_indivisible_batch(tmp_path):
  with pytest.raises(ValueError, match="multiple"):
    pipeline.train_iterator(_config(tmp_path), start_step=0, process_count=3)


def test_video_batches(tmp_path):
  c = _config(tmp_path, name="disks_video", video_frames=4, num_train=10, num_test=3)
  c.train.batch_size = 4
  b = next(pipeline.train_iterator(c, start_step=0))
  assert b["image"].shape == (4, 4, 32, 32, 1) and b["factors"].shape == (4, 4, 3)
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert pipeline.factor_names(c) == ["x", "y", "background"]


# --------------------------------------------------------------------------- eval iterator


def test_eval_iterator_covers_each_example_once(tmp_path):
  c = _config(tmp_path)
  batches = list(pipeline.eval_iterator(c, "test", 8))
  assert len(batches) == 3                                      # ceil(21 / 8)
  assert all(b["image"].shape[0] == 8 and b["mask"].dtype == bool for b in batches)
  ids = np.concatenate([b["id"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(24) < 21)
  np.testing.assert_array_equal(ids[mask], np.arange(21))      # Ordered, each once.
  assert (ids[~mask] == -1).all()
  # Two processes: their rows interleave back into the single-process batches.
  halves = [list(pipeline.eval_iterator(c, "test", 8, process_index=p, process_count=2))
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == 3
  for b, h0, h1 in zip(batches, *halves):
    _assert_batches_equal(b, {k: np.concatenate([h0[k], h1[k]]) for k in b})
  # A prefix of the split.
  part = list(pipeline.eval_iterator(c, "test", 4, num_examples=6))
  ids = np.concatenate([b["id"] for b in part])
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, 5, -1, -1])


# --------------------------------------------------------------------------- prepare


def test_prepare_is_idempotent_and_detects_damage(tmp_path):
  c = _config(tmp_path)
  path = pipeline.prepare(c)
  stamp = os.path.getmtime(os.path.join(path, "dataset_info.json"))
  pipeline.clear_cache()
  assert pipeline.prepare(c) == path
  assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == stamp  # Not rebuilt.
  # Truncate the train records: a clear error that names the folder and the fix.
  (shard,) = glob.glob(os.path.join(path, "*train.array_record*"))
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 3)
  pipeline.clear_cache()
  with pytest.raises(ValueError, match="(?i)delete"):
    pipeline.prepare(c)
  # Damaged metadata.
  with open(os.path.join(path, "dataset_info.json"), "w") as f:
    f.write("{not json")
  pipeline.clear_cache()
  with pytest.raises(ValueError, match="(?i)delete"):
    pipeline.prepare(c)


_PREPARE_AT = """
import sys, time
from sami_jax import configlib
from sami_jax.data import pipeline
c = configlib.default_config()
c.data.data_dir, c.data.image_size = sys.argv[1], 16
c.data.num_train, c.data.num_test = 3000, 500
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together, imports done
print(pipeline.prepare(c))
"""


def test_concurrent_prepares_take_turns(tmp_path):
  # Runs of a seed sweep started together on one machine all prepare the same dataset. Each
  # process waits for a common start time after its imports, so without the build lock their
  # builds overlap and all but one die renaming into the finished folder (FileExistsError).
  start_at = time.time() + 8.0
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AT, str(tmp_path), str(start_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(3)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  folders = {out.strip().splitlines()[-1] for out, _ in outs}
  assert len(folders) == 1
  # One build: a single finished version folder, no leftover incomplete ones.
  parent = os.path.dirname(folders.pop())
  assert sorted(os.listdir(parent)) == ["1.0.0"]
  pipeline.clear_cache()
  c = _config(tmp_path, image_size=16, num_train=3000, num_test=500)
  assert len(pipeline.dataset_for(c).source("train")) == 3000


def test_dataset_for_rejects_unknown_names(tmp_path):
  with pytest.raises(ValueError, match="disks_video"):
    pipeline.dataset_for(_config(tmp_path, name="mnist"))
  with pytest.raises(ValueError, match="channels=1"):
    pipeline.dataset_for(_config(tmp_path, channels=3))


# --------------------------------------------------------------------------- celeba


def test_celeba_missing_raises_with_instructions(tmp_path):
  c = _config(tmp_path / "empty", name="celeba", image_size=64, channels=3)
  with pytest.raises(FileNotFoundError) as e:
    pipeline.prepare(c)
  msg = str(e.value)
  assert f"python -m sami_jax.data.celeba --data_dir={tmp_path / 'empty'}" in msg
  assert "tfds build celeb_a" in msg and "--file_format=array_record" in msg
  assert "img_align_celeba.zip" in msg
  assert not os.path.exists(tmp_path / "empty")                # Nothing downloaded or written.


def test_celeba_batch_under_mock_data(tmp_path):
  c = _config(tmp_path, name="celeba", image_size=64, channels=3)
  c.train.batch_size = 4
  with tfds.testing.mock_data(num_examples=10):
    b = next(pipeline.train_iterator(c, start_step=0))
    ev = list(pipeline.eval_iterator(c, "validation", 4))
  assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["attributes"].shape == (4, 40) and b["attributes"].dtype == np.int32
  assert set(np.unique(b["attributes"])) <= {0, 1}
  assert len(ev) == 3 and int(sum(e["mask"].sum() for e in ev)) == 10


def test_celeba_crop_is_the_centre_140():
  # Inside the 140x140 centre crop (rows 39..178, cols 19..158) 200, outside 0: the output is
  # exactly 200 everywhere only if the crop sits there.
  img = np.zeros((218, 178, 3), np.uint8)
  img[39:179, 19:159] = 200
  out = celeba.center_crop_resize(img, 64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out, 200)
  shifted = np.zeros_like(img)
  shifted[40:180, 19:159] = 200
  assert celeba.center_crop_resize(shifted, 64).min() < 200
  attrs = {name: i % 3 == 0 for i, name in enumerate(celeba.ATTRIBUTE_NAMES)}
  np.testing.assert_array_equal(celeba.attributes_vector(attrs), [i % 3 == 0 for i in range(40)])


# --------------------------------------------------------------------------- folder


def _solid(path, size, value, mode):
  Image.new(mode, size, value).save(path)


def test_folder_dataset(tmp_path, monkeypatch):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  # Mixed sizes, formats and modes; each image one solid grey level we can look up later.
  specs = {"a.png": ((40, 30), 10, "L"), "b.jpg": ((64, 64), 60, "RGB"),
           "sub/c.PNG": ((100, 50), 110, "RGB"), "sub/d.jpeg": ((33, 77), 160, "L"),
           "e.png": ((20, 20), 210, "RGBA"), "f.png": ((90, 90), 240, "RGB")}
  for rel, (size, v, mode) in specs.items():
    _solid(root / rel, size, v if mode == "L" else (v, v, v) + ((255,) if mode == "RGBA" else ()),
           mode)
  (root / "broken.png").write_bytes(b"this is not a png")
  (root / "notes.txt").write_text("ignored")
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))

  c = _config(tmp_path / "tfds", name="folder", folder=str(root), image_size=16, channels=1)
  pipeline.prepare(c)
  assert any("broken.png" in w for w in warnings)
  ds = pipeline.dataset_for(c)
  assert [s.split(" ")[0] for s in ds.skipped_files()] == ["broken.png"]
  n_train, n_test = pipeline.split_size(c, "train"), pipeline.split_size(c, "test")
  assert n_train + n_test == 6 and n_test >= 1

  files = ds.files()
  assert sorted(files["train"] + files["test"]) == sorted(specs)
  # The held-out split is the documented function of the (readable) file names.
  assert files == folder.assign_splits(sorted(specs))
  for split in ("train", "test"):
    batches = list(pipeline.eval_iterator(c, split, 4))
    for b in batches:
      assert b["image"].shape == (4, 16, 16, 1)
      for img, i, m in zip(b["image"], b["id"], b["mask"]):
        if m:
          want = specs[files[split][i]][1]
          # Solid images stay solid through resize/crop (JPEG may shift a level by ~1).
          np.testing.assert_allclose(img, want / 255.0 * 2.0 - 1.0, atol=2.5 / 255.0)

  # RGB output from grayscale and RGBA inputs.
  c3 = _config(tmp_path / "tfds", name="folder", folder=str(root), image_size=8, channels=3)
  b = next(pipeline.train_iterator(c3, start_step=0))
  assert b["image"].shape == (8, 8, 8, 3)


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images")
  c = _config(tmp_path / "tfds", name="folder", folder=str(empty), channels=3)
  with pytest.raises(FileNotFoundError, match="no PNG/JPEG"):
    pipeline.prepare(c)
  c.data.folder = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.prepare(c)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x.jpg").write_bytes(b"garbage")
  (bad / "y.png").write_bytes(b"")
  c.data.folder = str(bad)
  with pytest.raises(ValueError, match="No readable image") as e:
    pipeline.prepare(c)
  assert "x.jpg" in str(e.value) and "y.png" in str(e.value)


def test_grid_images_are_spread_over_the_split_whatever_the_file_order():
  # 10 classes of 30 files, sorted by path as a folder dataset stores them: the first 8 records
  # are all class 0; the grid's 8 come from several classes, and the same 8 files are picked
  # from any ordering of the files.
  keys = [f"class{c}/img{i:03d}.png" for c in range(10) for i in range(30)]
  picked = [keys[i] for i in pipeline.pick_spread(keys, 8, "0:test")]
  assert len(set(picked)) == 8
  assert len({k.split("/")[0] for k in picked}) >= 4
  shuffled = list(np.random.default_rng(1).permutation(keys))
  assert [shuffled[i] for i in pipeline.pick_spread(shuffled, 8, "0:test")] == picked
  # Another seed picks other images; a split smaller than n gives all of it.
  assert [keys[i] for i in pipeline.pick_spread(keys, 8, "1:test")] != picked
  assert sorted(pipeline.pick_spread(keys[:5], 8, "0:test")) == [0, 1, 2, 3, 4]
  # Expected from the documented rule, computed here: the lowest crc32("0:test:" + key).
  ranked = sorted(keys, key=lambda k: (zlib.crc32(("0:test:" + k).encode()), k))
  assert picked == ranked[:8]
