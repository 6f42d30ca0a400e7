"""SAMI on CelebA 64x64 (joint training). Needs the prepared TFDS celeb_a dataset: see README.

  --config=configs/celeba.py --config.data.data_dir=/path/to/tensorflow_datasets
Variants: (none) the accelerator-sized run; test: tiny, for the tests (with mock data).
"""

from sami_jax import configlib


def get_config(arg: str | None = None):
  c = configlib.default_config()
  c.data.name = "celeba"
  c.data.image_size = 64
  c.data.channels = 3
  c.model.kind = "sami"
  c.model.denoiser.ch = 128
  c.model.denoiser.ch_mult = (1, 2, 2, 2)
  c.model.denoiser.num_res_blocks = 2
  c.model.denoiser.attn_resolutions = (16,)
  c.model.denoiser.dropout = 0.1
  c.model.denoiser.num_groups = 32
  c.model.encoder.ch = 64
  c.model.encoder.ch_mult = (1, 2, 4, 4)
  c.model.encoder.num_res_blocks = 2
  c.model.encoder.latent_dim = 32
  c.model.dtype = "bfloat16"
  c.train.batch_size = 128
  c.train.num_steps = 300000
  c.train.ckpt_every = 10000
  c.train.sample_every = 10000
  c.objective.beta_warmup_steps = 50000
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5000
  c.optim.ema_decay = 0.9999
  c.train.probe_at_end = False
  if arg == "test":
    c.data.image_size = 16
    c.model.dtype = "float32"
    c.model.denoiser.ch = 8
    c.model.denoiser.ch_mult = (1,)  # one level: what is tested is the CelebA input pipeline
    c.model.denoiser.num_res_blocks = 1
    c.model.denoiser.attn_resolutions = ()
    c.model.denoiser.num_groups = 4
    c.model.denoiser.dropout = 0.0
    c.model.encoder.ch = 8
    c.model.encoder.ch_mult = (1,)
    c.model.encoder.num_res_blocks = 1
    c.model.encoder.num_groups = 4
    c.model.encoder.latent_dim = 4
    c.train.batch_size = 8
    c.train.num_steps = 1
    c.train.log_every = 1
    c.train.sample_every = 0
    c.train.num_sample_images = 2
    c.sampling.steps = 2
    c.optim.warmup_steps = 1
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of configs/celeba.py: use '' or 'test'.")
  return c
