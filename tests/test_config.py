"""Every config validation failure gives its own one-line message naming the field."""

import importlib.util
import json
import os

import pytest

from sami_jax import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess: this session's (tests/conftest.py) with `devices` CPU devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [("disks", None), ("disks", "cpu"), ("disks", "test"),
                                      ("disks", "compare"), ("celeba", None), ("celeba", "test"),
                                      ("ddpm", "disks"), ("ddpm", "celeba"), ("ddpm", "test")])
def test_shipped_configs_validate(name, arg):
  configlib.validate(load_config(name, arg), num_devices=8)


@pytest.mark.parametrize("arg", [None, "cpu", "gpu", "test"])
def test_folder_configs_validate_once_given_a_folder(arg):
  c = load_config("folder", arg)
  with pytest.raises(configlib.ConfigError, match="data.folder"):
    configlib.validate(c, num_devices=8)
  c.data.folder = "/some/images"
  configlib.validate(c, num_devices=8)


@pytest.mark.parametrize("name,arg", [("celeba_frozen", None), ("disks", "frozen")])
def test_frozen_config_needs_a_checkpoint(name, arg):
  c = load_config(name, arg)
  assert c.model.kind == "sami_frozen" and c.objective.encoder_time_sampling == "high_noise"
  with pytest.raises(configlib.ConfigError, match="denoiser_checkpoint"):
    configlib.validate(c)
  c.model.denoiser_checkpoint = "/some/run"
  configlib.validate(c)


def test_disks_frozen_matches_the_ddpm_pretraining_denoiser():
  """configs/disks.py:frozen must restore configs/ddpm.py:disks (same U-Net), at half its lr."""
  frozen, ddpm = load_config("disks", "frozen"), load_config("ddpm", "disks")
  assert frozen.model.denoiser.to_dict() == ddpm.model.denoiser.to_dict()
  assert frozen.data.image_size == ddpm.data.image_size
  assert frozen.optim.lr == 0.5 * load_config("disks", "cpu").optim.lr


def _set(c, path, value):
  *parents, leaf = path.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


@pytest.mark.parametrize("path,value,message", [
    ("data.name", "mnist", r"config\.data\.name: 'mnist' is not one of"),
    ("model.kind", "gan", r"config\.model\.kind"),
    ("diffusion.schedule", "sigmoid", r"config\.diffusion\.schedule"),
    ("diffusion.weighting", "vlb", r"config\.diffusion\.weighting"),
    ("sampling.sampler", "euler", r"config\.sampling\.sampler"),
    ("optim.lr", 0.0, r"config\.optim\.lr: must be positive"),
    ("optim.lr", -1e-3, r"config\.optim\.lr: must be positive"),
    ("train.num_steps", 0, r"config\.train\.num_steps: must be positive"),
    ("optim.ema_decay", 1.0, r"config\.optim\.ema_decay: must be in \[0, 1\)"),
    ("model.encoder.min_std", 0.0, r"config\.model\.encoder\.min_std"),
    ("model.encoder.init_std", 0.0005, r"config\.model\.encoder\.init_std: .*min_std < "),
    ("sampling.prior", "flow", r"config\.sampling\.prior"),
    ("latent_prior.num_steps", 0, r"config\.latent_prior\.num_steps: must be positive"),
    ("objective.vae_beta", -1.0, r"config\.objective\.vae_beta: must be >= 0"),
    ("diffusion.high_noise_power", 1.5, r"high_noise_power"),
    ("data.image_size", 30, r"does not divide data\.image_size=30"),
    ("model.denoiser.num_groups", 7, r"7 groups do not divide"),
    ("train.batch_size", 12, r"not divisible by the 8 devices"),
    ("mesh", "data:3,fsdp:-1", r"needs a multiple of 3 devices"),
    ("mesh", "model:8", r"must name exactly the axes data and fsdp"),
    ("mesh", "data=8", r"not of the form"),
    # Validated before compiling (they used to fail late, or never):
    ("optim.lr", float("inf"), r"config\.optim\.lr: must be positive and finite, got inf"),
    ("optim.lr_decay", "cosien", r"config\.optim\.lr_decay: 'cosien' is not one of"),
    ("sampling.traverse_range", float("nan"), r"config\.sampling\.traverse_range: must be"),
    ("sampling.traverse_points", 0, r"config\.sampling\.traverse_points: must be positive"),
    ("eval.num_examples", 1, r"config\.eval\.num_examples: must be >= 2"),
    ("eval.num_examples", 0, r"config\.eval\.num_examples: must be >= 2"),
    ("train.num_sample_images", 0, r"config\.train\.num_sample_images: must be positive"),
    ("data.prefetch", -1, r"config\.data\.prefetch: must be >= 0"),
    ("seed", -1, r"config\.seed: must be >= 0"),
    ("eval.dci_mode", "trees", r"config\.eval\.dci_mode"),
    ("eval.sections", "elbo,latentz", r"config\.eval\.sections: .*latentz"),
    ("data.channels", 2, r"config\.data\.channels: 2 is not one of"),
    ("model.denoiser.dropout", 1.0, r"config\.model\.denoiser\.dropout: must be in \[0, 1\)"),
    ("model.denoiser.ch_mult", (), r"config\.model\.denoiser\.ch_mult: must be a tuple"),
    ("objective.beta_end", 0.0, r"config\.objective\.beta_end: must be > 0 for the loglinear"),
    ("diffusion.linear_beta_start", 0.5, r"linear_beta_start: must be below"),
    ("objective.denoiser_loss", "plain", r"config\.objective\.denoiser_loss: 'plain'"),
    ("objective.encoder_time_sampling", "high_noise",
     r"config\.objective\.encoder_time_sampling: .*denoiser_loss=unconditional"),
    ("diffusion.guidance_weighting", "cutoff", r"config\.diffusion\.guidance_cutoff_sigma: .*0 <"),
    ("diffusion.guidance_cutoff_sigma", 1.5, r"config\.diffusion\.guidance_cutoff_sigma: must"),
    ("diffusion.mixture_high_noise", -0.1, r"config\.diffusion\.mixture_high_noise: must"),
])
def test_each_validation_failure_has_its_message(path, value, message):
  c = configlib.default_config()
  _set(c, path, value)
  with pytest.raises(configlib.ConfigError, match=message) as info:
    configlib.validate(c, num_devices=8)
  assert "\n" not in str(info.value)


def test_unknown_field_is_an_error():
  c = configlib.default_config()
  with pytest.raises(AttributeError):
    c.model.encoder.latnet_dim = 4


def test_mesh_parsing():
  assert configlib.parse_mesh("data:-1,fsdp:2", 8) == {"data": 4, "fsdp": 2}
  assert configlib.parse_mesh("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4}
  assert configlib.parse_mesh("data:-1,fsdp:1", 1) == {"data": 1, "fsdp": 1}


def test_update_layout_resolves_per_mesh_and_old_runs_read_as_tree():
  c = configlib.default_config()
  c.optim.update_layout = "flat"
  c.mesh = "data:-1,fsdp:2"
  with pytest.raises(configlib.ConfigError, match=r"config\.optim\.update_layout: 'flat' .*'tree'"):
    configlib.validate(c, num_devices=8)
  c.optim.update_layout = "auto"
  assert not configlib.flat_update(c, 8)  # FSDP shards arrays one by one
  c.mesh = "data:-1,fsdp:1"
  assert configlib.flat_update(c, 8)
  c.optim.update_layout = "tree"
  assert not configlib.flat_update(c, 8)
  # A run saved before the field existed has the per-array optimizer state.
  saved = json.loads(configlib.to_json(configlib.default_config()))
  assert configlib.from_json(saved).optim.update_layout == "auto"
  del saved["optim"]["update_layout"]
  assert configlib.from_json(saved).optim.update_layout == "tree"


def test_every_field_has_a_validation_rule():
  """A new config field must come with its rule in configlib._RULES (checked before compiling)."""
  fields = set(configlib.flat_fields(configlib.default_config()))
  assert fields == set(configlib._RULES)  # pylint: disable=protected-access


def test_factor_sets_match_the_disks_dataset():
  from sami_jax.data import disks  # pylint: disable=g-import-not-at-top
  assert set(configlib.FACTOR_SETS) == set(disks.FACTOR_SETS)
