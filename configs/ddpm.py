"""Unconditional diffusion pre-training (the denoiser alone, guidance off): the checkpoint that
`configs/celeba_frozen.py` / `sami_frozen` runs start from.

  --config=configs/ddpm.py:disks      Disks 32x32 (CPU-sized)
  --config=configs/ddpm.py:celeba     CelebA 64x64 (accelerator-sized)
  --config=configs/ddpm.py:test       tiny, for the tests
"""

import importlib.util
import os

from sami_jax import configlib


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  which = arg or "disks"
  if which == "disks":
    c = _load("disks.py").get_config("cpu")
  elif which == "celeba":
    c = _load("celeba.py").get_config(None)
  elif which == "test":
    c = _load("disks.py").get_config("test")
  else:
    raise ValueError(f"Unknown variant {which!r} of configs/ddpm.py: use disks, celeba or test.")
  c.model.kind = "ddpm"
  c.train.probe_at_end = False
  return c
