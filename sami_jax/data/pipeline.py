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

import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sami_jax.data import disks
from sami_jax.data import disks_video

Batch = dict[str, np.ndarray]
# Salt mixed into the epoch-permutation seed so the data order is independent of other uses of
# config.seed (parameter init, noise).
_ORDER_SALT = 0x5A41D


def default_data_dir(config: ml_collections.ConfigDict) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if config.data.data_dir:
    return os.path.expanduser(config.data.data_dir)
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
  """Holds an exclusive lock on `data_dir/.<name>.build.lock` (a local data dir only).

  Two runs started together on one machine (a seed sweep, say) would otherwise both build the
  same dataset and race when TFDS renames the finished build into place (FileExistsError).
  Remote data dirs (gs://...) are not locked: prepare them once before a multi-host launch.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  except ImportError:
    fcntl = None
  if "://" in data_dir or fcntl is None:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.build.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class Dataset:
  """A dataset readable by random access; subclasses adapt one TFDS builder.

  Subclasses implement `_make_builder`, `example` and the class attributes; `prepare` and
  `source` are shared.
  """

  name: str = ""
  train_split: str = "train"
  splits: tuple[str, ...] = ("train", "test")
  # Whether `prepare` may generate the dataset (False: it must have been prepared by the user).
  buildable: bool = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data_dir = default_data_dir(config)

  # --------------------------------------------------------------- subclass API
  def _make_builder(self) -> tfds.core.DatasetBuilder:
    raise NotImplementedError

  def example(self, record: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    """One decoded TFDS record -> arrays; image uint8 [H, W, C] (video [F, H, W, C])."""
    raise NotImplementedError

  def factor_names(self) -> list[str]:
    return []

  def _not_prepared_error(self, builder: tfds.core.DatasetBuilder) -> Exception:
    return FileNotFoundError(f"Dataset {self.name!r} is not prepared in {builder.data_dir}; "
                             "run sami_jax.data.pipeline.prepare(config) first.")

  # --------------------------------------------------------------- shared
  @functools.cached_property
  def builder(self) -> tfds.core.DatasetBuilder:
    return self._make_builder()

  def _open_builder(self, make: Callable[[], tfds.core.DatasetBuilder]
                    ) -> tfds.core.DatasetBuilder:
    """Runs TFDS's builder constructor, which restores dataset_info.json if it exists."""
    try:
      return make()
    except Exception as e:  # pylint: disable=broad-except
      # TFDS raises protobuf ParseError, JSON errors, KeyError... on damaged metadata files.
      raise ValueError(
          f"Could not open dataset {self.name!r} under {self.data_dir} "
          f"({type(e).__name__}: {e}). If a previous preparation was interrupted or its files "
          "are damaged, delete that dataset's folder and run again.") from e

  def prepare(self) -> str:
    """Builds the dataset if needed (idempotent), checks it can be read; returns its folder."""
    builder = self.builder
    # A dataset that is not `buildable` is checked by opening it (`source` raises
    # `_not_prepared_error`); that also works under tfds.testing.mock_data.
    if self.buildable and not builder.is_prepared():
      with _build_lock(self.data_dir, self.name):
        if builder.is_prepared():
          # Another process built it while this one waited for the lock: reopen the builder,
          # whose metadata was read before the build existed.
          self.__dict__.pop("builder", None)
          builder = self.builder
        else:
          logging.info("Preparing dataset %s into %s.", self.name, builder.data_dir)
          builder.download_and_prepare()
          self._after_build(builder)
    self._check_readable()
    return os.fspath(builder.data_dir)

  def _after_build(self, builder: tfds.core.DatasetBuilder) -> None:
    """Called (under the build lock) right after this process built the dataset."""

  def _check_readable(self) -> None:
    """Reads the first and last record of each split: cheap, and catches truncated files."""
    for split in self.splits:
      src = self.source(split)
      try:
        for i in {0, len(src) - 1} if len(src) else ():
          self.example(src[i], i)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(
            f"Dataset {self.name!r} in {self.builder.data_dir} is damaged: reading split "
            f"{split!r} failed ({type(e).__name__}: {e}). Delete that folder and run again "
            "to rebuild it.") from e

  def source(self, split: str) -> Sequence[Any]:
    """A random-access TFDS data source (len, [i]) over the split's decoded records."""
    if split not in self.splits:
      raise ValueError(f"Dataset {self.name!r} has splits {list(self.splits)}, not {split!r}.")
    sources = self.__dict__.setdefault("_sources", {})
    if split not in sources:
      sources[split] = self._open_source(split)
    return sources[split]

  def _open_source(self, split: str) -> Sequence[Any]:
    builder = self.builder
    try:
      return builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      # TFDS and array_record raise assorted types (AssertionError, NotImplementedError,
      # ValueError, OSError, RuntimeError) for missing, wrong-format or truncated files.
      if not builder.is_prepared():
        raise self._not_prepared_error(builder) from e
      if "file format" in str(e).lower() or isinstance(e, NotImplementedError):
        raise ValueError(
            f"Dataset {self.name!r} in {builder.data_dir} was prepared in a format without "
            "random access; it must be array_record. Delete that folder and prepare it again "
            "with file_format='array_record'.") from e
      raise ValueError(f"Could not open split {split!r} of {self.name!r} in "
                       f"{builder.data_dir} ({e}). Delete that folder and run again.") from e


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


def _stack(ds: Dataset, records: Sequence[Any], indices: Sequence[int]) -> Batch:
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

  def __init__(self, ds: Dataset, split: str, seed: int, global_batch: int, process_index: int,
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

  def __init__(self, ds: Dataset, split: str, num_examples: int, global_batch: int,
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


class DisksDataset(Dataset):
  """The procedurally rendered disks (see disks.py)."""

  name = "disks"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.data.channels != 1:
      raise ValueError(f"{self.name} images are grayscale: set --config.data.channels=1 "
                       f"(it is {config.data.channels}).")
    d = config.data
    self.builder_config = disks.DisksConfig.make(
        image_size=d.image_size, factors=d.factors, num_train=d.num_train, num_test=d.num_test)

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    return self._open_builder(
        lambda: disks.make_builder(disks.Disks, self.builder_config, self.data_dir))

  def example(self, record, index):
    del index
    return {"image": record["image"], "factors": record["factors"], "id": record["id"]}

  def factor_names(self) -> list[str]:
    return disks.factor_names(self.config.data.factors)


class DisksVideoDataset(DisksDataset):
  """Disk sequences with smoothly moving factors (see disks_video.py)."""

  name = "disks_video"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    d = config.data
    self.builder_config = disks_video.DisksVideoConfig.make(
        image_size=d.image_size, factors=d.factors, video_frames=d.video_frames,
        num_train=d.num_train, num_test=d.num_test)

  def _make_builder(self) -> tfds.core.DatasetBuilder:
    return self._open_builder(
        lambda: disks.make_builder(disks_video.DisksVideo, self.builder_config, self.data_dir))


def dataset_for(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by config.data.name ("disks", "disks_video", "celeba", "folder")."""
  name = config.data.name
  if name == "disks":
    return DisksDataset(config)
  if name == "disks_video":
    return DisksVideoDataset(config)
  # Imported here: celeba.py and folder.py build on this module's Dataset class.
  if name == "celeba":
    from sami_jax.data import celeba  # pylint: disable=g-import-not-at-top
    return celeba.CelebADataset(config)
  if name == "folder":
    from sami_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.FolderDataset(config)
  raise ValueError(f"Unknown dataset config.data.name={name!r}; use one of "
                   "'disks', 'disks_video', 'celeba', 'folder'.")


# One Dataset object per (config contents), so data sources and builders are opened once.
_CACHE: dict[str, Dataset] = {}


def _cached_dataset(config: ml_collections.ConfigDict) -> Dataset:
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
  prefetch = int(config.data.prefetch)
  if prefetch < 0:
    raise ValueError(f"config.data.prefetch must be >= 0, got {prefetch}.")
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
