"""--mode=export: the latents of a whole split, streamed to one file.

    python -m sami_jax.main --config=configs/disks.py --workdir=DIR --mode=export \
        [--config.eval.export_split=train] [--config.eval.export_format=parquet]

writes `DIR/export/<split>_<step>.npz` (or `.parquet`) for the newest checkpoint in DIR.

npz arrays (row i is example i of the split, in stored order):
  id            int32 [N]          the example's id in its split
  mean, std     float32 [N, d]     posterior mean and std of q(z | x) (video: [N, F, d]); a
                                   deterministic encoder (diffae) has no std array
  factors       float32 [N, K]     ground-truth factors (disks; video [N, F, K]), if any
  factor_names  str [K]            their names
  attributes    int32 [N, A]       binary attributes (celeba), if any
  attribute_names str [A]
  file          str [N]            relative path of each image (folder dataset)
  step          int64 []           the checkpoint's training step
  split         str []             the split

parquet: one row per image (video: per frame, with a `frame` column), columns id, mean_0 ..
mean_{d-1}, std_0 .., the factors under their names (factor_<name>), attributes (attr_<name>),
file; one row group per batch. The step and split are stored in the schema metadata.

Memory stays bounded by one batch: each batch is encoded and written to disk before the next is
read (npz: rows go into per-array .npy memmaps, which are then zipped chunk-wise; parquet: one row
group per batch). The model and dataset come from the config saved with the run; where the data lives
(data.data_dir, data.folder, data.num_workers, data.prefetch) and eval.* are taken from the config
given on the command line (configlib.for_inference), since those may differ on this machine.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sami_jax import api
from sami_jax import configlib
from sami_jax import inference
from sami_jax.data import pipeline

FORMATS = ("npz", "parquet")
# Rows encoded per batch; memory use is about this many images plus their latents.
DEFAULT_BATCH_SIZE = 256


def _names(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """{"factor_names": [...], "attribute_names": [...]} where the dataset has them."""
  ds = pipeline.dataset_for(config)
  out = {"factor_names": list(ds.factor_names())}
  if hasattr(ds, "attribute_names"):
    out["attribute_names"] = list(ds.attribute_names())
  return out


def _folder_files(config: ml_collections.ConfigDict, split: str) -> list[str] | None:
  ds = pipeline.dataset_for(config)
  if not hasattr(ds, "files"):
    return None
  return ds.files()[split]


def _encode_batch(model: api.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Model.encode on [B, H, W, C] or video [B, F, H, W, C] -> (mean, std) [B, (F,) d]; std is
  None for a deterministic encoder."""
  if images.ndim == 5:
    b, f = images.shape[:2]
    mean, std = model.encode(images.reshape((b * f,) + images.shape[2:]))
    return mean.reshape(b, f, -1), None if std is None else std.reshape(b, f, -1)
  return model.encode(images)


class _NpzWriter:
  """Rows into per-array .npy memmaps in a temporary folder, zipped into one .npz at the end."""

  def __init__(self, path: str, n: int, extra: dict[str, np.ndarray]):
    self.path, self.n, self.extra = path, n, extra
    self.tmp = path + ".parts"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.arrays: dict[str, np.memmap] = {}

  def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
    for key, value in rows.items():
      if key not in self.arrays:  # shapes of the trailing axes are known at the first batch
        self.arrays[key] = np.lib.format.open_memmap(
            os.path.join(self.tmp, key + ".npy"), mode="w+", dtype=value.dtype,
            shape=(self.n,) + value.shape[1:])
      self.arrays[key][start:start + len(value)] = value

  def close(self) -> None:
    for a in self.arrays.values():
      a.flush()
    partial = self.path + ".incomplete"
    # np.savez would also stream from the memmaps; writing the members ourselves makes the
    # chunking explicit (format.write_array writes a non-file stream in 16 MiB pieces).
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key, value in list(self.arrays.items()) + list(self.extra.items()):
        with zf.open(key + ".npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    self.arrays.clear()  # drop the memmaps before deleting their files
    os.replace(partial, self.path)  # a reader never sees a half-written file
    shutil.rmtree(self.tmp, ignore_errors=True)


class _ParquetWriter:
  """One parquet row group per batch (one row per image; video frames get their own rows)."""

  def __init__(self, path: str, names: dict[str, list[str]], metadata: dict[str, str]):
    self.path, self.names, self.metadata = path, names, metadata
    self.partial = path + ".incomplete"
    self.writer = None

  def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    del start
    mean = rows["mean"]
    columns: dict[str, Any] = {}
    if mean.ndim == 3:  # video: one row per (sequence, frame)
      b, f = mean.shape[:2]
      columns["id"] = np.repeat(rows["id"], f)
      columns["frame"] = np.tile(np.arange(f, dtype=np.int32), b)
      flat = {k: v.reshape((b * f,) + v.shape[2:]) for k, v in rows.items()
              if k not in ("id", "file") and v.ndim >= 2 and v.shape[1] == f}
      if "file" in rows:
        columns["file"] = np.repeat(rows["file"], f)
    else:
      columns["id"] = rows["id"]
      if "file" in rows:
        columns["file"] = rows["file"]
      flat = {k: v for k, v in rows.items() if k not in ("id", "file")}
    for key, prefix, names in (("mean", "mean_", None), ("std", "std_", None),
                               ("factors", "factor_", self.names.get("factor_names")),
                               ("attributes", "attr_", self.names.get("attribute_names"))):
      if key not in flat:
        continue
      value = flat[key]
      for j in range(value.shape[1]):
        label = names[j] if names and j < len(names) else str(j)
        columns[prefix + label] = value[:, j]
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if self.writer is None:
      schema = table.schema.with_metadata({k.encode(): v.encode()
                                           for k, v in self.metadata.items()})
      self.writer = pq.ParquetWriter(self.partial, schema)
    self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    os.replace(self.partial, self.path)


def run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE) -> str:
  """Writes the latents of config.eval.export_split for a checkpoint; returns the file's path.

  Args:
    config: the command line's config (its eval.export_* and data location are used).
    workdir: the run's workdir.
    step: the checkpoint step; None: the newest.
    batch_size: examples encoded per batch (bounds the memory use).
  Raises:
    ValueError: unknown export format or split, or a ddpm run (no encoder).
    FileNotFoundError: no checkpoint in workdir.
  """
  fmt = config.eval.export_format
  if fmt not in FORMATS:
    raise ValueError(f"config.eval.export_format={fmt!r} is not one of {list(FORMATS)}; use "
                     "--config.eval.export_format=npz (or parquet).")
  run_config, params, restored_step = inference.restore(workdir, step, given=config)
  configlib.validate(run_config)
  split = run_config.eval.export_split
  if not inference.components(run_config).kind.has_encoder:
    raise ValueError(f"{workdir} holds a model without latents (model.kind="
                     f"{run_config.model.kind!r}, an unconditional diffusion model): it has no "
                     "trained encoder, so there are no latents to export.")
  model = api.Model(run_config, params, restored_step, batch_size=batch_size)
  pipeline.prepare(run_config)
  ds = pipeline.dataset_for(run_config)
  if split not in ds.splits:
    raise ValueError(f"config.eval.export_split={split!r}: dataset {ds.name!r} has splits "
                     f"{list(ds.splits)}; use one of those.")
  n = pipeline.split_size(run_config, split)
  if n < 1:
    raise ValueError(f"Split {split!r} of {ds.name!r} is empty; nothing to export.")
  names = _names(run_config)
  files = _folder_files(run_config, split)

  out_dir = os.path.join(workdir, "export")
  path = os.path.join(out_dir, f"{split}_{restored_step}.{fmt}")
  if jax.process_index() != 0:
    # One process writes the file (the encoder is small; the data is read once).
    return path
  os.makedirs(out_dir, exist_ok=True)
  if fmt == "npz":
    extra = {"step": np.asarray(restored_step, np.int64), "split": np.asarray(split)}
    for key, value in names.items():
      if value:
        extra[key] = np.asarray(value)
    writer = _NpzWriter(path, n, extra)
  else:
    writer = _ParquetWriter(path, names, {"step": str(restored_step), "split": split,
                                          "dataset": ds.name})

  written = 0
  for batch in pipeline.eval_iterator(run_config, split, batch_size, num_examples=n):
    mask = np.asarray(batch["mask"], bool)
    mean, std = _encode_batch(model, np.asarray(batch["image"]))
    rows = {"id": np.asarray(batch["id"], np.int32)[mask], "mean": mean[mask]}
    if std is not None:
      rows["std"] = std[mask]
    if "factors" in batch:
      rows["factors"] = np.asarray(batch["factors"], np.float32)[mask]
    if "attributes" in batch:
      rows["attributes"] = np.asarray(batch["attributes"], np.int32)[mask]
    if files is not None:
      rows["file"] = np.asarray([files[i] for i in rows["id"]])
    writer.write(written, rows)
    written += int(mask.sum())
  writer.close()
  logging.info("Exported the latents of %d %s examples (step %d) to %s.", written, split,
               restored_step, path)
  return path
