"""The config's whole life cycle: every knob with its default, validation, JSON, and the merge of
a run's saved config with the one given at inference time.

Every file in `configs/` starts from `default_config()` and overrides fields. Because every knob
exists here, `--config.model.encoder.latnet_dim=4` (a typo) fails loudly, and a config is checked
by `validate` (the one validation every other module relies on) before anything is compiled.

    c = default_config(); ...; validate(c, num_devices)
    text = to_json(c); c2 = from_json(text)             # saved with every checkpoint
    cfg = for_inference(saved_config, given_config)     # --mode=sample|eval|export, the API
"""

from __future__ import annotations

import json
import math
import os

import ml_collections

PRIORS = ("normal", "latent_diffusion")
DATASETS = ("disks", "disks_video", "celeba", "folder")
SCHEDULES = ("cosine", "linear")
WEIGHTINGS = ("simple", "elbo")
TIME_SAMPLINGS = ("uniform", "antithetic", "high_noise", "logsnr", "mixture")
# The encoder term's draw: "shared" (the denoiser's t, eps and x_t) or a draw of its own.
ENCODER_TIME_SAMPLINGS = ("shared",) + TIME_SAMPLINGS
# What trains the denoiser of a SAMI run: the guided loss (joint, the paper's form) or the
# unconditional loss (the split objective; SAMI.md, "Who learns from which term").
DENOISER_LOSSES = ("guided", "unconditional")
GUIDANCE_WEIGHTINGS = ("constant", "sigma_power", "cutoff")
BETA_SCHEDULES = ("constant", "linear", "loglinear")
SCALE_PARAMS = ("softplus", "exp")
SAMPLERS = ("ddim", "ddpm")
POOLS = ("flatten", "mean")
STD_INPUTS = ("image", "time")
DTYPES = ("float32", "bfloat16")
LR_DECAYS = ("constant", "cosine")
UPDATE_LAYOUTS = ("auto", "flat", "tree")
DCI_MODES = ("regression", "classification")
EXPORT_FORMATS = ("npz", "parquet")
# The sections of the evaluation report (evaluation/runner.py implements one per name).
EVAL_SECTIONS = ("latents", "disentanglement", "elbo", "denoising", "reconstruction", "speckle",
                 "straightness", "attributes", "fid", "grids")


class ConfigError(ValueError):
  """A config value is wrong; the message names the field and the fix."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = d = ml_collections.ConfigDict()
  d.name = "disks"
  d.data_dir = ""            # TFDS data dir; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  d.manual_dir = ""          # where the user put CelebA's manual files (celeba only).
  d.folder = ""              # image folder (folder dataset only).
  d.image_size = 32
  d.channels = 1
  d.factors = "xy_bg"        # disks factor set: "xy_bg" or "xy_bg_r_fg" (radius, disk intensity).
  d.num_train = 20000        # disks: examples rendered into the train split.
  d.num_test = 2000
  d.video_frames = 16        # disks_video: frames per sequence.
  d.num_workers = 0          # grain worker processes (0: in the main process).
  d.prefetch = 2             # batches prefetched to the devices.

  # --------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  # sami: encoder + denoiser, z only through score guidance (joint). sami_frozen: the encoder
  # alone on a frozen denoiser from a ddpm run. ddpm: the unconditional denoiser alone.
  # beta_vae: the encoder + a conv decoder (Gaussian likelihood, KL weighted by
  # objective.vae_beta). diffae: a deterministic encoder (its mean) whose z conditions the U-Net
  # through adaptive group norm (Diffusion Autoencoders), no KL.
  m.kind = "sami"
  m.dtype = "float32"        # compute dtype; params stay float32.
  m.denoiser_checkpoint = ""  # sami_frozen: workdir (or checkpoint dir) of a trained ddpm.
  m.denoiser = u = ml_collections.ConfigDict()
  u.ch = 64
  u.ch_mult = (1, 2, 2)
  u.num_res_blocks = 2
  u.attn_resolutions = (8,)
  u.dropout = 0.0
  u.num_groups = 8
  u.remat = False
  m.decoder = dec = ml_collections.ConfigDict()  # beta_vae only.
  dec.ch = 32
  dec.ch_mult = (1, 2, 2)
  dec.num_res_blocks = 1
  dec.num_groups = 8
  dec.obs_std = 0.1          # std of the Gaussian likelihood N(x; decoder(z), obs_std^2 I).
  m.encoder = e = ml_collections.ConfigDict()
  e.ch = 32
  e.ch_mult = (1, 2, 2)
  e.num_res_blocks = 1
  e.attn_resolutions = ()
  e.num_groups = 8
  e.latent_dim = 3
  # The encoder is told the noise level: clean images at t = 0 (z ~ q(z | x0, t = 0)), noisy ones
  # at their t (the guidance). False: a noise-blind encoder, which must guess the noise level from
  # the image (SAMI.md; docs/experiments.md measured both).
  e.time_conditioning = True
  e.scale_param = "softplus"  # softplus | exp (of a log-variance); the head starts at std ~= 1.
  e.min_std = 1e-3           # floor on the posterior std: bounds the guidance score.
  e.max_std = 10.0
  e.init_std = 1.0           # the posterior std of every input at init (exactly).
  e.mean_init_scale = 0.1    # variance scale of the mean head's init (fan-in truncated normal).
  e.pool = "flatten"         # flatten | mean: how the last feature map becomes a vector.
  # What the posterior std depends on: "image" (std(x, t)) or "time" (std(t) per latent
  # dimension: no x-gradient through the std, so the guidance comes from the mean alone).
  e.std_input = "image"

  # ----------------------------------------------------------- diffusion
  c.diffusion = f = ml_collections.ConfigDict()
  f.schedule = "cosine"
  f.cosine_s = 0.008
  f.linear_beta_start = 1e-4  # linear (DDPM) schedule, in units of a T=1000 discretisation.
  f.linear_beta_end = 0.02
  f.logsnr_min = -20.0       # log-SNR is clipped to this range (cosine reaches +-inf at the ends).
  f.logsnr_max = 20.0
  f.num_timesteps = 0        # 0: continuous time; T > 0: t restricted to {1/T, ..., 1}.
  f.weighting = "simple"     # simple | elbo
  # uniform | antithetic | high_noise | logsnr (lambda uniform) | mixture (high_noise with
  # probability mixture_high_noise, else logsnr)
  f.time_sampling = "uniform"
  f.high_noise_power = 0.5   # high_noise: t = u ** power (power < 1 oversamples large t).
  f.mixture_high_noise = 0.5  # mixture: the probability of the high_noise part.
  f.importance_weighting = False  # weight t by 1 / q(t): the objective stays E_{t~U(0,1)}[...]
  f.guidance_scale = 1.0     # gamma in training (sampling.guidance_scale at sampling time).
  # gamma(t), multiplying the guidance scale in training and sampling alike: "constant" (1),
  # "sigma_power" (sigma_t ** guidance_power) or "cutoff" (0 where sigma_t < guidance_cutoff_sigma).
  f.guidance_weighting = "constant"
  f.guidance_power = 1.0
  f.guidance_cutoff_sigma = 0.0
  # The guidance's x-derivative through the posterior std: True is the exact score of q; False
  # leaves it out (the guidance from the mean alone), in training and sampling alike.
  f.guidance_std_gradient = True

  # ----------------------------------------------------------- objective
  c.objective = o = ml_collections.ConfigDict()
  o.beta_schedule = "loglinear"
  o.beta_start = 5e-6
  o.beta_end = 1e-3
  o.beta_warmup_steps = 2000  # steps over which beta goes from start to end.
  o.vae_beta = 4.0           # beta_vae: the (constant) weight of its KL term.
  # SAMI: "guided" = the denoiser and the encoder both minimise the guided loss (joint);
  # "unconditional" = the split objective: the denoiser minimises the plain diffusion loss at its
  # own draw (diffusion.*), the encoder the guided loss with eps_theta held fixed at the
  # encoder's draw below. sami_frozen always trains the split's encoder term alone.
  o.denoiser_loss = "guided"
  # The encoder term's time draw: "shared" (the denoiser's t, eps, x_t and weighting) or its own
  # (any diffusion.time_sampling value, with the fields below); only with the split objective
  # or sami_frozen (the guided objective is one loss on one draw).
  o.encoder_time_sampling = "shared"
  o.encoder_high_noise_power = 0.3
  o.encoder_mixture_high_noise = 0.5
  o.encoder_importance_weighting = False
  o.encoder_weighting = "elbo"
  o.test_inject_nan_step = -1  # testing only: make the loss NaN at this step.

  # --------------------------------------------------------------- optim
  c.optim = p = ml_collections.ConfigDict()
  p.lr = 2e-4
  p.warmup_steps = 200
  p.lr_decay = "constant"    # constant | cosine
  p.b1 = 0.9
  p.b2 = 0.99
  p.eps = 1e-8
  p.grad_clip = 1.0          # global-norm clip; 0 disables.
  p.weight_decay = 0.0
  p.ema_decay = 0.999
  p.encoder_lr_mult = 1.0
  # How Adam, the EMA and the non-finite guard see the trained params: "flat" = one vector per
  # trained subtree (a few fused kernels; ~40% less compile time on CPU, see
  # benchmarks/README.md), "tree" = one set of kernels per parameter array (what FSDP needs: it
  # shards arrays one by one), "auto" = flat unless the mesh's fsdp axis is > 1. Same math either
  # way; it changes the optimizer state's layout in checkpoints.
  p.update_layout = "auto"

  # --------------------------------------------------------------- train
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 64          # global batch.
  t.num_steps = 3000
  t.log_every = 50
  t.ckpt_every = 1000
  t.keep_ckpts = 3           # keep the last N checkpoints ...
  t.keep_every = 0           # ... and every K-th step forever (0: none).
  t.sample_every = 1000      # PNG grids every K steps (and at the end); 0: only at the end.
  t.num_sample_images = 16
  t.write_grids = True       # PNG grids at sample_every and at the end of the run.
  t.probe_at_end = True      # disks: latent -> factor R^2 summary at the end of the run.

  # ------------------------------------------------------------ sampling
  c.sampling = s = ml_collections.ConfigDict()
  s.sampler = "ddim"
  s.steps = 50
  s.eta = 0.0
  s.guidance_scale = 1.0
  s.use_mean = True          # reconstruct from the posterior mean (else a sample).
  s.traverse_range = 2.0     # traversals span [-r, r] standard deviations of the prior.
  s.traverse_points = 7
  s.prior = "normal"         # --mode=sample: z ~ N(0, I) ("normal") or the fitted latent
                             # diffusion model ("latent_diffusion", see latent_prior.*).

  # ------------------------------------------ latent prior (DiffAE-style latent diffusion)
  # A small MLP diffusion model over the encoded training latents, fitted after training (on
  # the EMA encoder) when sampling.prior == "latent_diffusion"; saved in workdir/latent_prior/.
  c.latent_prior = lp = ml_collections.ConfigDict()
  lp.num_examples = 10000    # training images encoded to fit it.
  lp.width = 256             # hidden width of the MLP denoiser.
  lp.depth = 4               # hidden layers.
  lp.num_steps = 4000        # optimisation steps.
  lp.batch_size = 256
  lp.lr = 1e-3
  lp.sampling_steps = 50     # DDIM steps when sampling latents.

  # ---------------------------------------------------------------- eval
  c.eval = v = ml_collections.ConfigDict()
  v.num_examples = 2000      # examples encoded for the probes and metrics.
  v.num_recon = 64           # images reconstructed for MSE/PSNR (and per set for the speckle).
  v.export_split = "test"    # --mode=export: the split whose latents are written.
  v.export_format = "npz"   # --mode=export: "npz" or "parquet".
  # --mode=eval (evaluation/report.py). Its eval.* and sampling.* fields come from the config
  # given at eval time, everything else from the config saved with the checkpoint.
  v.step = -1                # checkpoint step to evaluate; -1: the latest.
  v.sections = "all"         # comma-separated subset of report.SECTIONS, or "all".
  v.batch_size = 64          # examples per jitted evaluation call (the last batch is padded).
  v.num_elbo_examples = 256  # test examples in the ELBO (bits/dim) estimate.
  v.elbo_t_samples = 8       # stratified Monte Carlo samples of t per example for the ELBO.
  v.num_ablation_examples = 256  # test examples in the denoising section (eps-MSE per t).
  v.ablation_buckets = 10    # equal-width buckets of t there (with gamma 1 vs 0 for SAMI).
  v.dci_mode = "classification"  # DCI: "classification" (disentanglement_lib: boosted trees on
                             # binned factors) or "regression" (our extension, see dci()).
  v.factorvae_votes = 2000   # FactorVAE score: majority-vote training votes (half as many eval).
  v.num_video = 100          # disks_video test sequences for the straightness measure.
  v.num_interpolations = 4   # pairs of test images in the interpolation grid.
  v.num_fid = 1000           # images per set for FID (reference, reconstructions, samples).
  v.inception_weights = ""   # FID Inception .npz (see evaluation/inception.py); "": skip FID.

  # ---------------------------------------------------------------- mesh
  c.mesh = "data:-1,fsdp:1"  # axis sizes; -1 takes the remaining devices.
  c.fsdp_min_size = 2 ** 14  # params with fewer elements stay replicated under fsdp.
  c.lock()  # a field that is not defined here is an error, not a silent new knob
  return c


def use_cpu_sizes(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Model, optimizer and cadence sized to train in minutes on a 2-core CPU (the `cpu` variants).

  A small U-Net without attention, a light encoder, batch 32, a high learning rate, the "elbo"
  weighting, and four choices measured on Disks (docs/experiments.md, batches A-E):
  - a posterior std of 0.2 at init (instead of 1): the guidance scales like 1 / std^2; from std 1
    it stays too weak to pull the disk position into the latent, from 0.1 the background ends up
    in the norm of z (a curved code: kNN R^2 0.97, linear 0.02), at 0.2 it is a linear direction;
  - the KL at the ELBO's own weight (objective.beta_end = 1, reached after the warm-up): the only
    weight that kept every factor linear (R^2 >= 0.92) on seeds 0-2; at 0.1 and 0.3 seed 2 lost
    most of y, at the base's 1e-3 the latent is a rotated mixture. Its cost: the posterior is
    wide enough that DDIM reconstructions from z redraw the disk nearby (MSE 0.10-0.15 where 0.1
    gives 0.03-0.05);
  - high-noise time sampling with power 0.3 (t = u ** 0.3, 30% of the times above 0.9): the
    background intensity is worth encoding only where the noise hides it from the denoiser, at
    the very highest noise levels; with power 0.5 the latent often left it out;
  - a guidance scale of 4 at sampling time (sampling.guidance_scale; SAMI.md allows > 1 there; the
    training objective keeps gamma = 1): DDIM-25 reconstructions from z sharpen the posterior, and
    on the training split each doubling of the scale up to 4 cut their MSE by more than a quarter
    (beta 0.1: 0.086, 0.061, 0.044 at 1, 2, 4, then 0.034 at 8; beta 1: 0.209 at 1, 0.113 at 4,
    0.097 at 8).
  """
  u, e = c.model.denoiser, c.model.encoder
  u.ch, u.ch_mult, u.num_res_blocks, u.attn_resolutions = 16, (1, 2, 2), 1, ()
  e.ch, e.ch_mult, e.num_res_blocks = 16, (1, 2, 2), 1
  e.init_std = 0.2
  c.diffusion.weighting = "elbo"
  c.diffusion.time_sampling = "high_noise"
  c.diffusion.high_noise_power = 0.3
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.ckpt_every = 1000
  c.train.sample_every = 0
  c.train.num_sample_images = 8
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.objective.beta_end = 1.0
  c.objective.beta_warmup_steps = 2000
  c.sampling.steps = 25
  c.sampling.guidance_scale = 4.0
  return c


def use_frozen_denoiser(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Encoder-only SAMI on a frozen pre-trained denoiser (model.denoiser_checkpoint still to set):
  half the learning rate and high noise levels oversampled in the encoder's own draw (the settings
  SAMI.md gives this mode), measured on Disks (docs/experiments.md, batch E):
  - the encoder draws t = u ** 0.1 (65% of the times above 0.9): a pre-trained denoiser reads the
    background off x_t everywhere but at the very highest noise levels, so only there is it worth
    encoding; at u ** 0.5 and u ** 0.3 the latent kept the position and lost the background;
  - a KL weight of 1e-3 (ELBO units) whatever the joint recipe uses: the guidance gain on a fixed
    denoiser is small, and at 0.1 the posterior collapsed to the prior (std 1.0, KL 1e-4 nats).
  """
  c.model.kind = "sami_frozen"
  c.optim.lr *= 0.5
  c.objective.encoder_time_sampling = "high_noise"
  c.objective.encoder_high_noise_power = 0.1
  c.objective.encoder_weighting = c.diffusion.weighting
  c.objective.beta_end = 1e-3
  return c


def use_tiny_sizes(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The smallest graph (one resolution level, no attention, 8x8): the tests' `test` variants,
  so the many end-to-end tests compile quickly (the model tests cover downsampling/attention)."""
  u, e = c.model.denoiser, c.model.encoder
  c.data.image_size = 8
  u.ch, u.ch_mult, u.num_res_blocks, u.attn_resolutions, u.num_groups = 8, (1,), 1, (), 4
  e.ch, e.ch_mult, e.num_groups = 8, (1,), 4
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.train.sample_every = 0
  c.train.num_sample_images = 4
  c.sampling.steps = 3
  c.sampling.traverse_points = 3
  c.eval.num_examples = 64
  # disentanglement_lib's DCI fits 100 boosted trees per bin of every factor: ~12 s per call on
  # 64 examples, most of an end-to-end test's evaluation. The regression trees take ~0.1 s; the
  # classification mode has its own tests (tests/test_metrics.py).
  c.eval.dci_mode = "regression"
  c.optim.warmup_steps = 1
  return c


def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def _one_of(c, field: str, value, choices):
  del c
  if value not in choices:
    _fail(field, f"{value!r} is not one of {list(choices)}.")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """'data:-1,fsdp:2' -> {'data': num_devices // 2, 'fsdp': 2}."""
  sizes = {}
  try:
    for part in spec.split(","):
      name, size = part.split(":")
      sizes[name.strip()] = int(size)
  except ValueError:
    _fail("mesh", f"{spec!r} is not of the form 'data:N,fsdp:M' (N or M may be -1).")
  if set(sizes) != {"data", "fsdp"}:
    _fail("mesh", f"{spec!r} must name exactly the axes data and fsdp.")
  if list(sizes.values()).count(-1) > 1:
    _fail("mesh", f"{spec!r}: at most one axis may be -1.")
  fixed = 1
  for v in sizes.values():
    if v != -1:
      if v < 1:
        _fail("mesh", f"{spec!r}: axis sizes must be >= 1 or -1.")
      fixed *= v
  if num_devices % fixed:
    _fail("mesh", f"{spec!r} needs a multiple of {fixed} devices, there are {num_devices}.")
  for k, v in sizes.items():
    if v == -1:
      sizes[k] = num_devices // fixed
  if sizes["data"] * sizes["fsdp"] != num_devices:
    _fail("mesh", f"{spec!r} uses {sizes['data'] * sizes['fsdp']} devices, there are "
          f"{num_devices}; use -1 for one axis.")
  return sizes


# ------------------------------------------------------------------------------ validation
#
# One rule per field of default_config() (tests/test_config.py checks that every field has one),
# so every knob is checked before anything is compiled; cross-field checks follow in `validate`.

FACTOR_SETS = ("xy_bg", "xy_bg_r_fg")  # data/disks.py's factor sets (a test keeps them in step)


def _number(value, *, integer: bool) -> bool:
  if isinstance(value, bool):
    return False
  if integer:
    return isinstance(value, int)
  return isinstance(value, (int, float)) and math.isfinite(value)


def _rule_int(lo: int | None = None, hi: int | None = None):
  def check(field, v):
    if not _number(v, integer=True):
      _fail(field, f"must be an integer, got {v!r}.")
    if lo is not None and v < lo:
      _fail(field, f"must be positive, got {v}." if lo == 1 else f"must be >= {lo}, got {v}.")
    if hi is not None and v > hi:
      _fail(field, f"must be <= {hi}, got {v}.")
  return check


def _rule_float(lo: float | None = None, *, lo_open: bool = False, hi: float | None = None,
                hi_open: bool = False):
  if lo is not None and hi is not None:
    what = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  elif lo is not None:
    what = ("positive and finite" if lo == 0 and lo_open else
            f"{'>' if lo_open else '>='} {lo:g} and finite")
  else:
    what = "a finite number" + ("" if hi is None else f" {'<' if hi_open else '<='} {hi:g}")

  def check(field, v):
    ok = _number(v, integer=False)
    ok = ok and not (lo is not None and (v <= lo if lo_open else v < lo))
    ok = ok and not (hi is not None and (v >= hi if hi_open else v > hi))
    if not ok:
      _fail(field, f"must be {what}, got {v!r}.")
  return check


def _rule_choice(choices):
  def check(field, v):
    _one_of(None, field, v, choices)
  return check


def _rule_bool(field, v):
  if not isinstance(v, bool):
    _fail(field, f"must be true or false, got {v!r}.")


def _rule_str(field, v):
  if not isinstance(v, str):
    _fail(field, f"must be a string, got {v!r}.")


def _rule_ints(min_len: int):
  def check(field, v):
    if not isinstance(v, (tuple, list)) or len(v) < min_len or not all(
        _number(x, integer=True) and x >= 1 for x in v):
      _fail(field, f"must be a tuple of positive integers{' (at least one)' if min_len else ''}, "
            f"e.g. (1, 2, 2); got {v!r}.")
  return check


_POS_INT, _NONNEG_INT = _rule_int(1), _rule_int(0)
_POS, _NONNEG = _rule_float(0, lo_open=True), _rule_float(0)
_UNIT_OPEN = _rule_float(0, hi=1, hi_open=True)  # [0, 1)

_RULES = {
    "seed": _rule_int(0, 2 ** 31 - 1),
    "data.name": _rule_choice(DATASETS), "data.data_dir": _rule_str, "data.manual_dir": _rule_str,
    "data.folder": _rule_str, "data.image_size": _rule_int(4), "data.channels": _rule_choice((1, 3)),
    "data.factors": _rule_choice(FACTOR_SETS), "data.num_train": _POS_INT,
    "data.num_test": _rule_int(2), "data.video_frames": _rule_int(2),
    "data.num_workers": _NONNEG_INT, "data.prefetch": _NONNEG_INT,
    "model.kind": None,  # checked against kinds.KINDS in validate
    "model.dtype": _rule_choice(DTYPES), "model.denoiser_checkpoint": _rule_str,
    "model.denoiser.ch": _POS_INT, "model.denoiser.ch_mult": _rule_ints(1),
    "model.denoiser.num_res_blocks": _POS_INT, "model.denoiser.attn_resolutions": _rule_ints(0),
    "model.denoiser.dropout": _UNIT_OPEN, "model.denoiser.num_groups": _POS_INT,
    "model.denoiser.remat": _rule_bool,
    "model.decoder.ch": _POS_INT, "model.decoder.ch_mult": _rule_ints(1),
    "model.decoder.num_res_blocks": _NONNEG_INT, "model.decoder.num_groups": _POS_INT,
    "model.decoder.obs_std": _POS,
    "model.encoder.ch": _POS_INT, "model.encoder.ch_mult": _rule_ints(1),
    "model.encoder.num_res_blocks": _POS_INT, "model.encoder.attn_resolutions": _rule_ints(0),
    "model.encoder.num_groups": _POS_INT, "model.encoder.latent_dim": _POS_INT,
    "model.encoder.time_conditioning": _rule_bool,
    "model.encoder.scale_param": _rule_choice(SCALE_PARAMS), "model.encoder.min_std": _POS,
    "model.encoder.max_std": _POS, "model.encoder.init_std": _POS,
    "model.encoder.mean_init_scale": _POS, "model.encoder.pool": _rule_choice(POOLS),
    "model.encoder.std_input": _rule_choice(STD_INPUTS),
    "diffusion.schedule": _rule_choice(SCHEDULES), "diffusion.cosine_s": _POS,
    "diffusion.linear_beta_start": _POS, "diffusion.linear_beta_end": _POS,
    "diffusion.logsnr_min": _rule_float(), "diffusion.logsnr_max": _rule_float(),
    "diffusion.num_timesteps": _NONNEG_INT, "diffusion.weighting": _rule_choice(WEIGHTINGS),
    "diffusion.time_sampling": _rule_choice(TIME_SAMPLINGS),
    "diffusion.high_noise_power": _rule_float(0, lo_open=True, hi=1),
    "diffusion.guidance_scale": _NONNEG, "diffusion.importance_weighting": _rule_bool,
    "diffusion.mixture_high_noise": _rule_float(0, hi=1),
    "diffusion.guidance_weighting": _rule_choice(GUIDANCE_WEIGHTINGS),
    "diffusion.guidance_power": _POS, "diffusion.guidance_cutoff_sigma": _rule_float(0, hi=1),
    "diffusion.guidance_std_gradient": _rule_bool,
    "objective.denoiser_loss": _rule_choice(DENOISER_LOSSES),
    "objective.encoder_time_sampling": _rule_choice(ENCODER_TIME_SAMPLINGS),
    "objective.encoder_high_noise_power": _rule_float(0, lo_open=True, hi=1),
    "objective.encoder_mixture_high_noise": _rule_float(0, hi=1),
    "objective.encoder_importance_weighting": _rule_bool,
    "objective.encoder_weighting": _rule_choice(WEIGHTINGS),
    "objective.beta_schedule": _rule_choice(BETA_SCHEDULES), "objective.beta_start": _POS,
    "objective.beta_end": _NONNEG, "objective.beta_warmup_steps": _NONNEG_INT,
    "objective.vae_beta": _NONNEG, "objective.test_inject_nan_step": _rule_int(-1),
    "optim.lr": _POS, "optim.warmup_steps": _NONNEG_INT, "optim.lr_decay": _rule_choice(LR_DECAYS),
    "optim.b1": _UNIT_OPEN, "optim.b2": _UNIT_OPEN, "optim.eps": _POS, "optim.grad_clip": _NONNEG,
    "optim.weight_decay": _NONNEG, "optim.ema_decay": _UNIT_OPEN, "optim.encoder_lr_mult": _NONNEG,
    "optim.update_layout": _rule_choice(UPDATE_LAYOUTS),
    "train.batch_size": _POS_INT, "train.num_steps": _POS_INT, "train.log_every": _POS_INT,
    "train.ckpt_every": _POS_INT, "train.keep_ckpts": _POS_INT, "train.keep_every": _NONNEG_INT,
    "train.sample_every": _NONNEG_INT, "train.num_sample_images": _POS_INT,
    "train.write_grids": _rule_bool, "train.probe_at_end": _rule_bool,
    "sampling.sampler": _rule_choice(SAMPLERS), "sampling.steps": _POS_INT,
    "sampling.eta": _NONNEG, "sampling.guidance_scale": _NONNEG, "sampling.use_mean": _rule_bool,
    "sampling.traverse_range": _POS, "sampling.traverse_points": _POS_INT,
    "sampling.prior": _rule_choice(PRIORS),
    "latent_prior.num_examples": _rule_int(2), "latent_prior.width": _POS_INT,
    "latent_prior.depth": _POS_INT, "latent_prior.num_steps": _POS_INT,
    "latent_prior.batch_size": _POS_INT, "latent_prior.lr": _POS,
    "latent_prior.sampling_steps": _POS_INT,
    "eval.num_examples": _rule_int(2), "eval.num_recon": _POS_INT, "eval.export_split": _rule_str,
    "eval.export_format": _rule_choice(EXPORT_FORMATS), "eval.step": _rule_int(-1),
    "eval.sections": _rule_str, "eval.batch_size": _POS_INT, "eval.num_elbo_examples": _POS_INT,
    "eval.elbo_t_samples": _POS_INT, "eval.num_ablation_examples": _POS_INT,
    "eval.ablation_buckets": _POS_INT, "eval.dci_mode": _rule_choice(DCI_MODES),
    "eval.factorvae_votes": _POS_INT, "eval.num_video": _POS_INT,
    "eval.num_interpolations": _NONNEG_INT, "eval.num_fid": _rule_int(2),
    "eval.inception_weights": _rule_str,
    "mesh": _rule_str, "fsdp_min_size": _NONNEG_INT,
}


# Fields that say where data lives or how to evaluate and sample: they change nothing about the
# training (a resume may change them; the compiled train step does not depend on them).
NOT_TRAINING = ("data.data_dir", "data.manual_dir", "data.num_workers", "data.prefetch", "eval.",
                "sampling.", "latent_prior.")


def training_fields(c: ml_collections.ConfigDict) -> dict[str, object]:
  """`flat_fields` without the fields of NOT_TRAINING."""
  return {k: v for k, v in flat_fields(c).items() if not k.startswith(NOT_TRAINING)}


def flat_fields(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  """{dotted field name: value} of every leaf field of a config."""
  out = {}
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_fields(value, prefix + key + "."))
    else:
      out[prefix + key] = value
  return out


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int = 1) -> None:
  """Checks a config before anything is compiled. Raises ConfigError naming the field and the fix.

  Every field has a rule (type, range or choices); then the cross-field checks: the posterior std
  bounds, the schedules, the networks against the image size, the kind's needs, the batch against
  processes and devices.
  """
  from sami_jax import kinds  # pylint: disable=g-import-not-at-top  (kinds imports jax)
  for field, value in flat_fields(c).items():
    rule = _RULES.get(field)
    if rule is not None:
      rule(field, value)
  _one_of(c, "model.kind", c.model.kind, tuple(kinds.KINDS))
  eval_sections(c)

  e = c.model.encoder
  if not e.min_std < e.init_std < e.max_std:
    _fail("model.encoder.init_std", "the posterior std starts at init_std, so it needs "
          f"min_std < init_std < max_std (got {e.min_std}, {e.init_std}, {e.max_std}).")
  d = c.diffusion
  if d.logsnr_min >= d.logsnr_max:
    _fail("diffusion.logsnr_min", "must be below diffusion.logsnr_max.")
  if d.linear_beta_start >= d.linear_beta_end:
    _fail("diffusion.linear_beta_start", "must be below diffusion.linear_beta_end.")
  o = c.objective
  if o.beta_schedule == "loglinear" and o.beta_end <= 0:
    _fail("objective.beta_end", "must be > 0 for the loglinear beta schedule (use "
          "beta_schedule=constant for no KL weight).")
  weights = c.eval.inception_weights
  if weights and not os.path.exists(os.path.expanduser(weights)):
    _fail("eval.inception_weights", f"{weights!r} does not exist; see "
          "sami_jax/evaluation/inception.py for how to make it, or set it to '' to skip FID.")

  kind = kinds.get(c.model.kind)
  if (kind.uses_guidance and kind.trains("denoiser") and o.denoiser_loss == "guided"
      and o.encoder_time_sampling != "shared"):
    _fail("objective.encoder_time_sampling",
          f"{o.encoder_time_sampling!r} gives the encoder a time draw of its own, which only the "
          "split objective has: set --config.objective.denoiser_loss=unconditional, or leave it "
          "'shared' (the guided objective is one loss on one draw).")
  if d.guidance_weighting == "cutoff" and not 0.0 < d.guidance_cutoff_sigma < 1.0:
    _fail("diffusion.guidance_cutoff_sigma",
          f"the cutoff weighting switches the guidance off where sigma_t is below it, so it needs "
          f"0 < guidance_cutoff_sigma < 1 (got {d.guidance_cutoff_sigma}).")
  nets = [(kind.image_model, c.model[kind.image_model]), ("encoder", c.model.encoder)]
  for name, sub in nets:
    levels = len(sub.ch_mult)
    factor = 2 ** (levels - 1)
    if c.data.image_size % factor:
      _fail(f"model.{name}.ch_mult",
            f"{levels} levels downsample by {factor}, which does not divide "
            f"data.image_size={c.data.image_size}; use fewer levels or another image size.")
    for mult in sub.ch_mult:
      if (sub.ch * mult) % sub.num_groups:
        _fail(f"model.{name}.num_groups",
              f"{sub.num_groups} groups do not divide the {sub.ch * mult} channels of a level "
              f"(ch={sub.ch}, ch_mult={tuple(sub.ch_mult)}).")

  if kind.needs_denoiser_checkpoint and not c.model.denoiser_checkpoint:
    _fail("model.denoiser_checkpoint",
          f"{kind.name} trains the encoder on a frozen denoiser: set it to the workdir of a "
          "trained ddpm run (e.g. --config.model.denoiser_checkpoint=/path/to/ddpm_workdir).")
  if c.data.name == "folder" and not c.data.folder:
    _fail("data.folder", "the folder dataset needs --config.data.folder=/path/to/images.")
  if c.data.name in ("disks", "disks_video") and c.data.channels != 1:
    _fail("data.channels", f"{c.data.name} images are grayscale: set --config.data.channels=1.")
  if c.data.name in ("disks", "disks_video") and c.data.image_size < 8:
    _fail("data.image_size", f"Disks need image_size >= 8 pixels, got {c.data.image_size}.")

  if c.train.batch_size % num_processes:
    _fail("train.batch_size", f"{c.train.batch_size} is not divisible by the "
          f"{num_processes} processes.")
  if num_devices is not None:
    sizes = parse_mesh(c.mesh, num_devices)
    if c.train.batch_size % (sizes["data"] * sizes["fsdp"]):
      _fail("train.batch_size",
            f"{c.train.batch_size} is not divisible by the {num_devices} devices of the mesh "
            f"{sizes}; use a multiple of {num_devices}.")
    if c.optim.update_layout == "flat" and sizes["fsdp"] > 1:
      _fail("optim.update_layout", "'flat' keeps each subtree's optimizer state in one vector, "
            f"which FSDP (mesh {c.mesh!r}) cannot shard array by array: use 'auto' or 'tree'.")


def flat_update(c: ml_collections.ConfigDict, num_devices: int) -> bool:
  """Whether optim.update_layout resolves to "flat" on a mesh of `num_devices` devices ("auto":
  flat unless the mesh's fsdp axis is > 1)."""
  if c.optim.update_layout != "auto":
    return c.optim.update_layout == "flat"
  return parse_mesh(c.mesh, num_devices)["fsdp"] == 1


def eval_sections(c: ml_collections.ConfigDict) -> list[str]:
  """The report sections config.eval.sections selects (all of EVAL_SECTIONS for "all")."""
  text = c.eval.sections.strip()
  if text in ("", "all"):
    return list(EVAL_SECTIONS)
  chosen = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in chosen if s not in EVAL_SECTIONS]
  if unknown:
    _fail("eval.sections", f"names unknown sections {unknown}; use 'all' or a comma-separated "
          f"subset of {list(EVAL_SECTIONS)}.")
  return chosen


# ------------------------------------------------------------------------------ life cycle


def to_dict(c: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-serialisable Python (tuples become lists)."""
  return json.loads(to_json(c))


def to_json(c: ml_collections.ConfigDict) -> str:
  """The config as JSON (sorted keys), as saved with every checkpoint."""
  return json.dumps(c.to_dict(), sort_keys=True)


def _tuplify(x):
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


def from_json(text_or_dict: str | dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (or its dict), merged over the current defaults (lists become tuples
  again); fields this version does not know are dropped with a warning."""
  d = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
  config = default_config()
  unknown = []

  def merge(dst, src, prefix):
    for k, v in src.items():
      if k not in dst:
        unknown.append(prefix + k)
      elif isinstance(v, dict):
        merge(dst[k], v, prefix + k + ".")
      else:
        dst[k] = _tuplify(v)
  merge(config, d, "")
  if isinstance(d.get("optim"), dict) and "update_layout" not in d["optim"]:
    # Saved before the field existed: those runs' optimizer state has one entry per array.
    config.optim.update_layout = "tree"
  if unknown:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("Ignoring config fields this version does not know: %s", unknown)
  return config


def copy(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An independent, unlocked-field-safe copy of a config (same fields, same values)."""
  return from_json(to_json(c))


# What a config given at inference time (--mode=sample|eval|export, sami_jax.compare, the API)
# may change in a finished run's saved config: how to evaluate and sample, and where the data now
# lives. Everything else (model, diffusion, data contents, seed) is the run's.
INFERENCE_SECTIONS = ("eval", "sampling", "latent_prior")
DATA_LOCATION_FIELDS = ("data_dir", "manual_dir", "folder", "num_workers", "prefetch")


def for_inference(saved: ml_collections.ConfigDict | dict | str,
                  given: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The one merge of a run's saved config with the config given now.

  The saved config decides the model, data and diffusion; the given config's eval.*,
  sampling.* and latent_prior.* sections win (they are choices about evaluation and sampling),
  and so do its data location fields (data.data_dir, manual_dir, folder, num_workers, prefetch)
  when they are set (non-empty, non-default), since the data may live elsewhere on this machine.
  """
  cfg = saved if isinstance(saved, ml_collections.ConfigDict) else from_json(saved)
  cfg = copy(cfg)
  if given is None:
    return cfg
  defaults = default_config()
  for section in INFERENCE_SECTIONS:
    for key, value in given[section].items():
      cfg[section][key] = value
  for key in DATA_LOCATION_FIELDS:
    value = given.data[key]
    if value != defaults.data[key]:
      cfg.data[key] = value
  return cfg


# Fields that name files or directories: `~` in them means the user's home directory.
PATH_FIELDS = ("data.data_dir", "data.manual_dir", "data.folder", "model.denoiser_checkpoint",
               "eval.inception_weights")


def expand_user_paths(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with `~` expanded in every path field (in place; returned for convenience)."""
  for field in PATH_FIELDS:
    section, key = field.split(".")
    if c[section][key]:
      c[section][key] = os.path.expanduser(c[section][key])
  return c


def frozen(c: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """A hashable, immutable view of a config (a cache key for compiled functions)."""
  return ml_collections.FrozenConfigDict(c)


def is_finite_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
