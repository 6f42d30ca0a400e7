"""Datasets (TFDS builders) and the grain input pipeline; see `pipeline.py` for the design.

Entry points (all take the project config):
  prepare(config)                       build / check the dataset; returns its folder.
  train_iterator(config, start_step=...)  infinite per-process numpy batches, a pure function
                                        of (config.seed, step).
  eval_iterator(config, split, batch_size)  one ordered, padded pass with a `mask`.
  factor_names(config), dataset_for(config), split_size(config, split).
  spread_indices(config, split, n), examples_at(config, split, indices)  fixed grid images.

Modules: `base` (the Dataset base class, builder helpers, build lock), one module per dataset
(`disks`, `disks_video`, `celeba`, `folder`), and `pipeline` (the name -> dataset table and the
grain iterators). Dataset modules import only `base`; `pipeline` imports them all.
"""

from sami_jax.data.pipeline import dataset_for
from sami_jax.data.pipeline import eval_iterator
from sami_jax.data.pipeline import examples_at
from sami_jax.data.pipeline import factor_names
from sami_jax.data.pipeline import prepare
from sami_jax.data.pipeline import split_size
from sami_jax.data.pipeline import spread_indices
from sami_jax.data.pipeline import train_iterator

__all__ = ["dataset_for", "eval_iterator", "examples_at", "factor_names", "prepare", "split_size",
           "spread_indices", "train_iterator"]
