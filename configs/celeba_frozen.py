"""Feature extraction from a pre-trained diffusion model: SAMI's encoder trained on a frozen
CelebA denoiser (restored from an unconditional run of configs/ddpm.py:celeba).

  --config=configs/celeba_frozen.py --config.model.denoiser_checkpoint=/path/to/ddpm_workdir
Only the encoder trains: lower learning rate, high noise levels oversampled.
"""

import importlib.util
import os

from sami_jax import configlib


def get_config(arg: str | None = None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "celeba.py")
  spec = importlib.util.spec_from_file_location("celeba", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  configlib.use_frozen_denoiser(c)  # the encoder's own draw: t = u^0.5
  c.optim.lr = 5e-5
  c.train.num_steps = 100000 if not arg else c.train.num_steps
  return c
