"""SAMI on the procedurally generated Disks dataset (no download; built on first use).

Variants (--config=configs/disks.py:VARIANT):
  (none)  the full-size run for an accelerator: 32x32, larger U-Net, 50k steps.
  cpu     the README's quick start: sized to train on a 2-core CPU in about 10 minutes.
  test    a tiny model and dataset for the test suite (a few seconds a step).
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
  elif variant == "cpu":
    c.data.num_train = 20000
    c.model.denoiser.ch = 32
    c.model.denoiser.ch_mult = (1, 2, 2)
    c.model.denoiser.num_res_blocks = 1
    c.model.denoiser.attn_resolutions = ()
    c.model.encoder.ch = 16
    c.model.encoder.ch_mult = (1, 2, 2, 2)
    c.model.encoder.num_res_blocks = 1
    c.train.batch_size = 64
    c.train.num_steps = 3000
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.train.sample_every = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.objective.beta_warmup_steps = 2000
    c.sampling.steps = 25
    c.eval.num_examples = 2000
  elif variant == "test":
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.image_size = 8
    # One resolution level and no attention: the smallest graph, so the many end-to-end tests
    # compile quickly (the model tests cover downsampling and attention).
    c.model.denoiser.ch = 8
    c.model.denoiser.ch_mult = (1,)
    c.model.denoiser.num_res_blocks = 1
    c.model.denoiser.attn_resolutions = ()
    c.model.denoiser.num_groups = 4
    c.model.encoder.ch = 8
    c.model.encoder.ch_mult = (1,)
    c.model.encoder.num_groups = 4
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.ckpt_every = 2
    c.train.sample_every = 0
    c.train.num_sample_images = 4
    c.sampling.steps = 3
    c.sampling.traverse_points = 3
    c.eval.num_examples = 64
    c.optim.warmup_steps = 1
  else:
    raise ValueError(f"Unknown variant {variant!r} of configs/disks.py: use '', 'cpu' or 'test'.")
  return c
