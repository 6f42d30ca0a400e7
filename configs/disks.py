"""SAMI on the procedurally generated Disks dataset (no download; built on first use).

Variants (--config=configs/disks.py:VARIANT):
  (none)  the full-size run for an accelerator: 32x32, larger U-Net, 50k steps.
  cpu     the README's quick start: sized to train on a 2-core CPU in about 10 minutes (16x16
          images: at 32x32 a CPU step costs about 4x more).
  frozen  SAMI's encoder alone on a frozen denoiser pre-trained by configs/ddpm.py:disks
          (--config.model.denoiser_checkpoint=DDPM_WORKDIR): the cpu model, half its learning
          rate, high noise levels oversampled.
  compare the base of `python -m sami_jax.compare` (SAMI vs beta-VAE, DiffAE, frozen-denoiser
          SAMI): the cpu variant's model and budget for every kind.
  test    a tiny model and dataset for the test suite.
"""

from sami_jax import configlib


def get_config(arg: str | None = None):
  c = configlib.default_config()
  c.data.name = "disks"
  c.data.image_size = 32
  c.data.channels = 1
  c.model.kind = "sami"
  c.model.encoder.latent_dim = 3
  variant = arg or "full"
  if variant == "full":
    c.data.num_train = 50000
    c.model.denoiser.ch = 64
    c.model.denoiser.ch_mult = (1, 2, 2)
    c.model.denoiser.num_res_blocks = 2
    c.train.batch_size = 128
    c.train.num_steps = 50000
    c.train.ckpt_every = 5000
    c.train.sample_every = 5000
    c.objective.beta_warmup_steps = 10000
  elif variant in ("cpu", "compare", "frozen"):
    configlib.use_cpu_sizes(c)
    c.data.image_size = 16
    c.data.num_train = 20000
    c.eval.num_examples = 2000
    # beta_vae's decoder mirrors the cpu encoder (used only when model.kind == "beta_vae").
    c.model.decoder.ch, c.model.decoder.ch_mult = 16, (1, 2, 2)
    if variant == "frozen":
      configlib.use_frozen_denoiser(c)
      # Seed 0 learns every factor (kNN R^2 >= 0.9) in 2000 steps, about half the joint run's time;
      # seeds 1 and 2 do not start (README, Results; docs/experiments.md, batches E-F).
      c.train.num_steps = 2000
  elif variant == "test":
    configlib.use_tiny_sizes(c)
    c.data.num_train = 256
    c.data.num_test = 64
  else:
    raise ValueError(f"Unknown variant {variant!r} of configs/disks.py: use '', 'cpu', "
                     "'frozen', 'compare' or 'test'.")
  return c
