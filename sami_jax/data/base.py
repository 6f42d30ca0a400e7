"""What every dataset shares: the Dataset base class, the TFDS builder helpers and the build lock.

A dataset module (disks, disks_video, celeba, folder) subclasses `Dataset` (how to open its TFDS
builder, how to turn one record into arrays) and, for our own datasets, `LocalBuilder` (a TFDS
`GeneratorBasedBuilder` that downloads nothing). `pipeline.py` holds the name -> dataset table and
the grain iterators; it imports the dataset modules, which import only this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging as std_logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds


def default_data_dir(config: ml_collections.ConfigDict) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if config.data.data_dir:
    return os.path.expanduser(config.data.data_dir)
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


@contextlib.contextmanager
def build_lock(data_dir: str, name: str):
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


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of our builders (nothing to download); works around a TFDS 4.9.10 import bug.

  TFDS's `DatasetBuilder.code_path` evaluates `importlib_resources.abc.Traversable`, and
  `importlib_resources` (a backport TFDS only declares for Python < 3.9) is not installed; the
  property is only used to find a checksums file, which builders that download nothing lack
  anyway. So it is answered from the class's source file directly.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size ...)" and
  # "Dataset ... downloaded and prepared" to stdout: untrue for a dataset generated locally.
  def _log_download_bytes(self) -> None:
    logging.info("Generating dataset %s into %s (nothing is downloaded).", self.name,
                 self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Dataset %s is ready in %s.", self.name, self.data_dir)


class _OwnConfigNotice:
  """Drops TFDS's "Using custom data configuration: ..." warning, which every build of our own
  datasets triggers (they pass a config object built from the run's settings): not news."""

  def filter(self, record) -> bool:
    try:
      return not str(record.msg).startswith("Using custom data configuration")
    except Exception:  # pylint: disable=broad-except  (a malformed record: let it through)
      return True


std_logging.getLogger("absl").addFilter(_OwnConfigNotice())  # TFDS logs through absl's logger


def make_builder(builder_cls: type[tfds.core.GeneratorBasedBuilder],
                 config: tfds.core.BuilderConfig,
                 data_dir: str | None) -> tfds.core.GeneratorBasedBuilder:
  """Instantiates `builder_cls` with `config`, writing array_record files under `data_dir`.

  TFDS refuses a custom config object named like one of the class's BUILDER_CONFIGS (it compares
  identity), so a config with a registered name is passed by name.
  """
  registered = builder_cls.builder_configs.get(config.name)
  if registered is not None and dataclasses.asdict(registered) != dataclasses.asdict(config):
    raise ValueError(f"Builder config {config.name!r} differs from the registered one.")
  return builder_cls(config=config.name if registered is not None else config,
                     data_dir=data_dir or None, file_format="array_record")


class Dataset:
  """A dataset readable by random access; subclasses adapt one TFDS builder.

  Subclasses implement `_make_builder`, `example` and the class attributes; `prepare`, `source`
  and `example_keys` are shared.
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

  def example_keys(self, split: str) -> Sequence[str]:
    """A stable name for every example of a split, in record order (after prepare).

    Used to pick grid images independently of the order records are stored in. By default the
    example's index; datasets with file names (folder) return those.
    """
    return [str(i) for i in range(len(self.source(split)))]

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
      with build_lock(self.data_dir, self.name):
        if builder.is_prepared():
          # Another process built it while this one waited for the lock: reopen the builder,
          # whose metadata was read before the build existed.
          self.__dict__.pop("builder", None)
          builder = self.builder
        else:
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
