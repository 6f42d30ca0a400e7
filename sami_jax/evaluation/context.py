"""What every evaluation section gets: the run's config and EMA params, the model's components,
cached encodings of the splits, PRNG keys per section, and where figures go."""

from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from sami_jax import inference
from sami_jax import rngs
from sami_jax.data import pipeline
from sami_jax.evaluation import disentanglement
from sami_jax.utils import images as images_lib


class Context:
  """One evaluation of one checkpoint.

  Attributes:
    config: the run's config merged with the evaluation's (configlib.for_inference).
    params: the EMA params (numpy or device arrays).
    step: the checkpoint's step.
    out_dir: where figures are written (None: figures are not written, e.g. the end-of-run probe).
    workdir: the run's workdir (where a fitted latent prior is kept), or None.
    comp: the model's inference.Components; kind: its declaration.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, step: int,
               out_dir: str | None, workdir: str | None = None):
    self.config = config
    self.params = params
    self.step = step
    self.out_dir = out_dir
    self.workdir = workdir
    self.comp = inference.components(config)
    self.kind = self.comp.kind
    self.image_shape = self.comp.image_shape
    self.num_dims = int(np.prod(self.image_shape))
    self.batch_size = int(config.eval.batch_size)
    self.figures: list[str] = []
    self._encoded: dict[str, dict[str, np.ndarray]] = {}
    self._kl_order: np.ndarray | None = None
    self._memo: dict[Any, Any] = {}

  def memo(self, key: Any, compute):
    """compute() once per key for this evaluation (e.g. reconstructions several sections use)."""
    if key not in self._memo:
      self._memo[key] = compute()
    return self._memo[key]

  def key(self, section: str) -> jax.Array:
    """The PRNG key of a section (a pure function of the run's seed and the section's name)."""
    return rngs.section_key(self.config.seed, section)

  def sampling_kwargs(self) -> dict[str, Any]:
    return inference.sampling_kwargs(self.config)

  def encoded(self, split: str) -> dict[str, np.ndarray]:
    """Posterior means/stds (+ factors/attributes) of the first eval.num_examples of a split."""
    if split not in self._encoded:
      self._encoded[split] = inference.encode_dataset(self.config, self.params, split,
                                                      self.config.eval.num_examples,
                                                      batch_size=self.batch_size)
    return self._encoded[split]

  def kl_order(self) -> np.ndarray:
    """Latent indices by decreasing KL to the prior on the test split (by decreasing spread of
    the means for a kind without a posterior)."""
    if self._kl_order is None:
      enc = self.encoded("test")
      if self.kind.has_posterior:
        self._kl_order, _ = disentanglement.rank_latents_by_kl(enc["mean"], enc["std"])
      else:  # a deterministic encoder: by how much each latent varies over the data
        self._kl_order = np.argsort(-enc["mean"].std(axis=0), kind="stable")
    return self._kl_order

  def batches(self, split: str, num_examples: int,
              config: ml_collections.ConfigDict | None = None) -> Iterator[dict[str, np.ndarray]]:
    return pipeline.eval_iterator(config or self.config, split, self.batch_size,
                                  num_examples=num_examples)

  def save_png(self, name: str, image: np.ndarray) -> str:
    """Writes a figure (process 0 only) into out_dir and records its name; returns the name."""
    if self.out_dir is not None and jax.process_index() == 0:
      images_lib.save_png(os.path.join(self.out_dir, name), image)
    self.figures.append(name)
    return name
