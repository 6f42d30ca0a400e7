"""SAMI on your own images: a folder of PNG/JPEG files (searched recursively).

  python -m sami_jax.main --config=configs/folder.py --workdir=/tmp/my_run \
      --config.data.folder=/path/to/images [--config.data.image_size=64] \
      [--config.data.channels=1]

The folder is turned into a dataset once (resized so the shorter side is data.image_size, centre
cropped, converted to data.channels; unreadable files are skipped and listed in a warning and in
skipped_files.txt next to the dataset) and rebuilt only when its files change. About 5% of the
files are held out as the "test" split. See sami_jax/data/folder.py.

Variants (--config=configs/folder.py:VARIANT):
  (none) / cpu  sized to train on a laptop CPU: 32x32 RGB, the Disks `cpu` model sizes.
  gpu           64x64 RGB, a larger U-Net, for an accelerator.
  test          a tiny model for the test suite and the example script (8x8).
"""

from sami_jax import configlib


def get_config(arg: str | None = None):
  c = configlib.default_config()
  c.data.name = "folder"
  c.data.folder = ""  # required: --config.data.folder=/path/to/images
  c.data.image_size = 32
  c.data.channels = 3
  c.model.kind = "sami"
  c.model.encoder.latent_dim = 8
  # The held-out split of a small folder can be tiny; the probe is for datasets with factors.
  c.train.probe_at_end = False
  variant = arg or "cpu"
  if variant == "cpu":
    configlib.use_cpu_sizes(c)
  elif variant == "gpu":
    c.data.image_size = 64
    c.data.num_workers = 4  # decoding is done once at build time; workers only slice arrays
    c.model.denoiser.ch = 64
    c.model.denoiser.ch_mult = (1, 2, 2, 2)
    c.model.denoiser.num_res_blocks = 2
    c.model.denoiser.attn_resolutions = (16,)
    c.model.encoder.ch = 32
    c.model.encoder.ch_mult = (1, 2, 2, 2)
    c.model.encoder.latent_dim = 32
    c.train.batch_size = 128
    c.train.num_steps = 100000
    c.train.ckpt_every = 5000
    c.train.sample_every = 5000
    c.objective.beta_warmup_steps = 10000
  elif variant == "test":
    configlib.use_tiny_sizes(c)
    c.model.encoder.latent_dim = 3
    c.train.write_grids = False  # the example script makes its own figure
  else:
    raise ValueError(f"Unknown variant {variant!r} of configs/folder.py: use 'cpu' (the "
                     "default), 'gpu' or 'test'.")
  return c
