"""Datasets (TFDS builders) and the grain input pipeline; see `pipeline.py` for the design.

Entry points (all take the project config):
  prepare(config)                       build / check the dataset; returns its folder.
  train_iterator(config, start_step=...)  infinite per-process numpy batches, a pure function
                                        of (config.seed, step).
  eval_iterator(config, split, batch_size)  one ordered, padded pass with a `mask`.
  factor_names(config), dataset_for(config), split_size(config, split).
"""

from sami_jax.data.pipeline import dataset_for
from sami_jax.data.pipeline import eval_iterator
from sami_jax.data.pipeline import factor_names
from sami_jax.data.pipeline import prepare
from sami_jax.data.pipeline import split_size
from sami_jax.data.pipeline import train_iterator

__all__ = ["dataset_for", "eval_iterator", "factor_names", "prepare", "split_size",
           "train_iterator"]
