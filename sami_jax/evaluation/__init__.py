"""Evaluation: metrics as plain functions of arrays, and a runner that feeds them a model.

The metric modules know nothing about models, checkpoints or files (except `inception`, which
loads its weights from a path the user gives):

- `probes`: R^2 of each ground-truth factor from the latents (linear and kNN regressors).
- `disentanglement`: MIG, DCI, SAP, FactorVAE score, |correlation| matrix, KL ranking of latents.
- `straightness`: curvature of latent / pixel trajectories (Henaff et al. 2019).
- `attributes`: single-latent AUROC, TAD / ATTRS, linear-probe AUROC for binary attributes.
- `fid`: Frechet distance and cached feature statistics.
- `inception`: the FID Inception-v3 feature network (imported on demand: it builds a Flax module).
- `elbo`: the terms of the variational bound in bits/dim, given a noise-prediction function.

The layer that uses a model (through `sami_jax.inference`, never the trainer):
- `runner`: `--mode=eval` (`run`), the end-of-run probe (`probe`) and the comparison all run the
  registry of report sections (`sections.SECTIONS`) on a `context.Context`.
- `sections`: one section per measure (whether it applies to a run, and how it runs).
- `plots`, `tables`: the report's figures (PIL) and its JSON / markdown output.
"""

from sami_jax.evaluation.attributes import attribute_report
from sami_jax.evaluation.attributes import linear_probe_auroc
from sami_jax.evaluation.attributes import single_latent_auroc
from sami_jax.evaluation.attributes import tad
from sami_jax.evaluation.disentanglement import correlation_matrix
from sami_jax.evaluation.disentanglement import dci
from sami_jax.evaluation.disentanglement import factorvae_score
from sami_jax.evaluation.disentanglement import factorvae_score_from_dataset
from sami_jax.evaluation.disentanglement import mig
from sami_jax.evaluation.disentanglement import rank_latents_by_kl
from sami_jax.evaluation.disentanglement import sap
from sami_jax.evaluation.fid import cached_stats
from sami_jax.evaluation.fid import fid_from_features
from sami_jax.evaluation.fid import frechet_distance
from sami_jax.evaluation.fid import load_stats
from sami_jax.evaluation.fid import save_stats
from sami_jax.evaluation.fid import stats
from sami_jax.evaluation.probes import factor_r2
from sami_jax.evaluation.straightness import curvature
from sami_jax.evaluation.straightness import trajectory_report
