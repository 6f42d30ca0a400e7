"""The input pipeline: datasets as TFDS array_record files, read by random access with grain.

Design (decided for the whole project):
  * TFDS is the dataset format and catalogue. Our own datasets (disks, disks_video, folder) are
    TFDS `GeneratorBasedBuilder`s; CelebA is TFDS's `celeb_a`. Every dataset is prepared with
    `file_format="array_record"`.
  * Reading uses grain over the TFDS array_record files (`builder.as_data_source()`): random
    access, no `tf.data`, and no TensorFlow at train time (TensorFlow is not a dependency).
    Verified with TFDS 4.9.10 and no TensorFlow installed: writing array_record works for
    `tfds.features.Tensor` features; `tfds.features.Image` can *encode* from already-encoded
    bytes (as celeb_a does) but not from numpy arrays (that calls `tf.image.encode_png`), so our
    builders store images as raw uint8 tensors; *decoding* an Image feature from a data source
    works without TensorFlow (TFDS falls back to PIL when OpenCV is absent).
  * Order is a pure function of (config.seed, step): per epoch a seeded permutation of the train
    split; the global batch at step s is elements [s*B, (s+1)*B) of the concatenated epochs, and
    process p of P reads only rows [p*B/P, (p+1)*B/P) of it. Resuming at a step, or splitting
    the batch over processes, yields exactly what one uninterrupted process yields. There is no
    iterator state to checkpoint: the step is the data position.
  * grain's `MapDataset` maps step -> per-process batch; `to_iter_dataset` prefetches
    `config.data.prefetch` batches in background threads, and `config.data.num_workers > 0`
    adds grain worker processes (`mp_prefetch`) for decode-heavy data (CelebA JPEGs).

Batches are dicts of numpy arrays (per process; train.py makes global jax.Arrays):
  image       float32 in [-1, 1], [B, H, W, C] (disks_video: [B, F, H, W, C]).
  factors     float32 [B, K] (disks) / [B, F, K] (disks_video): ground-truth factors.
  attributes  int32 [B, 40] in {0, 1} (celeba).
  id          int32 [B]: the example's index in its split (-1 on padding rows).
  mask        bool [B] (eval batches only): True on real rows, False on padding.
"""

from __future__ import annotations

import functools
import math
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from sami_jax.data import base
from sami_jax.data import celeba
from sami_jax.data import disks
from sami_jax.data import disks_video
from sami_jax.data import folder

Batch = dict[str, np.ndarray]
# Salt mixed into the epoch-permutation seed so the data order is independent of other uses of
# config.seed (parameter init, noise).
_ORDER_SALT = 0x5A41D


def _read_records(src: Sequence[Any], indices: Sequence[int]) -> list[Any]:
  """Reads several records; array_record's batched read when the source has one."""
  indices = [int(i) for i in indices]
  getitems = getattr(src, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(indices))
    except TypeError:
      # tfds.testing.mock_data's data-source mock installs a __getitems__ that cannot be called
      # as a method (TFDS 4.9.10); single reads go through its working __getitem__.
      pass
  return [src[i] for i in indices]


def _stack(ds: base.Dataset, records: Sequence[Any], indices: Sequence[int]) -> Batch:
  """Decoded records -> a batch with the documented dtypes (image scaled to [-1, 1])."""
  examples = [ds.example(r, int(i)) for r, i in zip(records, indices)]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  # uint8 [0, 255] -> [-1, 1]; done once per batch, vectorised.
  batch["image"] = batch["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  if "factors" in batch:
    batch["factors"] = batch["factors"].astype(np.float32)
  if "attributes" in batch:
    batch["attributes"] = batch["attributes"].astype(np.int32)
  batch["id"] = batch["id"].astype(np.int32)
  return batch


class _TrainBatch:
  """Step -> this process's rows of the global batch at that step (picklable for grain workers).

  Global position q (0, 1, 2, ... over the concatenated epochs) is record
  perm_e[q mod N] with e = q // N and perm_e = permutation of range(N) seeded by (seed, e).
  """

  def __init__(self, ds: base.Dataset, split: str, seed: int, global_batch: int, process_index: int,
               process_count: int):
    self.ds, self.split, self.seed = ds, split, seed
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.n = len(ds.source(split))

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([_ORDER_SALT, self.seed, epoch]))
    return rng.permutation(self.n)

  def indices(self, step: int) -> np.ndarray:
    """Record indices (into the train split) of this process's rows at `step`, [B / P]."""
    pos = step * self.global_batch + self.offset + np.arange(self.local_batch)
    epochs, within = np.divmod(pos, self.n)
    out = np.empty(self.local_batch, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.permutation(int(e))[within[sel]]
    return out

  def __call__(self, step: int) -> Batch:
    idx = self.indices(step)
    return _stack(self.ds, _read_records(self.ds.source(self.split), idx), idx)


class _EvalBatch:
  """Batch k of an ordered pass -> this process's rows, padded, with a mask."""

  def __init__(self, ds: base.Dataset, split: str, num_examples: int, global_batch: int,
               process_index: int, process_count: int):
    self.ds, self.split, self.num_examples = ds, split, num_examples
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch

  def __call__(self, k: int) -> Batch:
    pos = k * self.global_batch + self.offset + np.arange(self.local_batch)
    mask = pos < self.num_examples
    # Padding rows repeat example 0 (a valid input for the models) and are masked out.
    idx = np.where(mask, pos, 0)
    batch = _stack(self.ds, _read_records(self.ds.source(self.split), idx), idx)
    batch["id"] = np.where(mask, batch["id"], -1).astype(np.int32)
    batch["mask"] = mask
    return batch


# ---------------------------------------------------------------- datasets

# config.data.name -> the dataset class that reads it.
DATASETS: dict[str, type[base.Dataset]] = {
    "disks": disks.DisksDataset,
    "disks_video": disks_video.DisksVideoDataset,
    "celeba": celeba.CelebADataset,
    "folder": folder.FolderDataset,
}


def dataset_for(config: ml_collections.ConfigDict) -> base.Dataset:
  """The dataset named by config.data.name (one of `DATASETS`)."""
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset config.data.name={name!r}; use one of "
                     f"{list(DATASETS)}.")
  return DATASETS[name](config)


# One Dataset object per (config contents), so data sources and builders are opened once.
_CACHE: dict[str, base.Dataset] = {}


def _cached_dataset(config: ml_collections.ConfigDict) -> base.Dataset:
  key = config.data.to_json()
  if key not in _CACHE:
    _CACHE[key] = dataset_for(config)
  return _CACHE[key]


def clear_cache() -> None:
  """Forgets opened datasets (tests; or after deleting a dataset folder in a running process)."""
  _CACHE.clear()


def prepare(config: ml_collections.ConfigDict) -> str:
  """Makes the dataset ready to read; returns the folder holding its array_record files.

  Builds disks / disks_video / folder datasets on first use into the TFDS data dir
  (config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets); later calls only
  check that the files are there and readable. CelebA is never downloaded here: if it is not
  prepared, FileNotFoundError says how to prepare it. Processes on one machine that prepare the
  same dataset at once take turns (a file lock in the data dir): the first builds, the others
  find it built. On a multi-host job, call it on one process before the others read a shared
  data dir (a remote data dir is not locked).

  Raises:
    FileNotFoundError: the dataset (CelebA) or the image folder is missing.
    ValueError: the config is wrong, or the prepared files are damaged (the message says to
      delete the folder and rerun).
  """
  return _cached_dataset(config).prepare()


def factor_names(config: ml_collections.ConfigDict) -> list[str]:
  """Names of the columns of `factors` (disks, disks_video); [] for datasets without factors."""
  return dataset_for(config).factor_names()


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in a split (after prepare)."""
  return len(_cached_dataset(config).source(split))


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  prefetch = int(config.data.prefetch)  # >= 0: configlib.validate checks it
  # Elements are whole batches: `prefetch` batches are read ahead by as many threads.
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


def _iterate(config: ml_collections.ConfigDict, ds: grain.MapDataset) -> Iterator[Batch]:
  it_ds = ds.to_iter_dataset(_read_options(config))
  if config.data.num_workers > 0:
    # grain's worker processes read absl flags (its own --grain_* options); outside an
    # absl.app program (scripts, notebooks, tests) mark the flags parsed so their defaults apply.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(it_ds)


def _check_processes(batch_size: int, process_index: int, process_count: int, what: str):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the "
                     f"{process_count} processes.")


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int,
                   process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches, from step `start_step` on.

  The global batch at step s is a pure function of (config.seed, s): rows
  [s*B, (s+1)*B) of the concatenation of seeded per-epoch permutations of the train split
  (B = config.train.batch_size). This process gets rows [p*B/P, (p+1)*B/P) and reads only those
  records. Prepares the dataset if needed.

  Yields:
    dicts with image float32 [B/P, ...] in [-1, 1], id int32 [B/P], and factors / attributes
    where the dataset has them (see the module docstring).
  """
  _check_processes(config.train.batch_size, process_index, process_count,
                   "config.train.batch_size")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  ds = _cached_dataset(config)
  ds.prepare()
  n = len(ds.source(ds.train_split))
  if n == 0:
    raise ValueError(f"The {ds.train_split!r} split of {ds.name!r} is empty.")
  loader = _TrainBatch(ds, ds.train_split, int(config.seed), int(config.train.batch_size),
                       process_index, process_count)
  return _iterate(config, grain.MapDataset.range(start_step, sys.maxsize).map(loader))


def eval_iterator(config: ml_collections.ConfigDict, split: str, batch_size: int, *,
                  num_examples: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """A finite pass over the first `num_examples` examples of `split`, in stored order.

  `batch_size` is the global batch; process p gets rows [p*B/P, (p+1)*B/P) of each. Every
  batch has exactly B/P rows: the last global batch is padded (padding repeats example 0 with
  id -1) and `mask` (bool [B/P]) is True on real rows. All processes yield the same number of
  batches, ceil(num_examples / batch_size). Prepares the dataset if needed.
  """
  _check_processes(batch_size, process_index, process_count, "batch_size")
  ds = _cached_dataset(config)
  ds.prepare()
  size = len(ds.source(split))
  if num_examples is None:
    num_examples = size
  elif num_examples > size:
    logging.warning("Asked for %d examples of %s/%s, which has %d; using %d.", num_examples,
                    ds.name, split, size, size)
    num_examples = size
  if num_examples < 1:
    raise ValueError(f"Split {split!r} of {ds.name!r} has no examples to evaluate "
                     f"(num_examples={num_examples}, split size {size}).")
  loader = _EvalBatch(ds, split, num_examples, batch_size, process_index, process_count)
  num_batches = math.ceil(num_examples / batch_size)
  return _iterate(config, grain.MapDataset.range(num_batches).map(loader))


def spread_indices(config: ml_collections.ConfigDict, split: str, n: int,
                   seed: int = 0) -> np.ndarray:
  """Record indices of n examples of a split spread over all of it, for image grids. int [n].

  Each example gets a pseudo-random rank from a hash of (seed, its stable key: the file name for
  image folders, the index otherwise), and the n lowest ranks are taken, in rank order. So the
  choice is a uniform sample of the split (not its first n records, which in a folder sorted by
  path are one class), the same at every call, and does not depend on the order in which the
  records are stored. Fewer than n when the split is smaller.
  """
  ds = _cached_dataset(config)
  ds.prepare()
  return pick_spread(ds.example_keys(split), n, f"{seed}:{split}")


def pick_spread(keys: Sequence[str], n: int, salt: str) -> np.ndarray:
  """Indices into `keys` of the n keys with the lowest crc32(salt + ":" + key), in that order.

  A pure function of the set of keys: the same keys in another order give the same keys back.
  """
  prefix = (salt + ":").encode()
  ranks = [zlib.crc32(prefix + k.encode("utf-8", "surrogateescape")) for k in keys]
  order = sorted(range(len(keys)), key=lambda i: (ranks[i], keys[i]))
  return np.asarray(order[:n], np.int64)


def examples_at(config: ml_collections.ConfigDict, split: str, indices: Sequence[int]) -> Batch:
  """The records at `indices` of a split as one batch (same dtypes as the iterators)."""
  ds = _cached_dataset(config)
  ds.prepare()
  idx = np.asarray(indices, np.int64)
  return _stack(ds, _read_records(ds.source(split), idx), idx)
