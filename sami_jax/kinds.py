"""The model kinds, each declared once: which networks it has, what trains, how the latent reaches
the image, which loss it minimises and how it generates.

Code elsewhere asks a kind's declaration ("has a posterior?", "is a diffusion model?") instead of
testing its name, so adding a kind means adding one `Kind(...)` to `KINDS` (and, if it brings a new
route for the latent, one branch in `make_loss_fn` / `eps_fn` below).

    kind = kinds.of(config)            # the declaration of config.model.kind
    loss_fn = kinds.make_loss_fn(config, image_model, encoder, schedule)
    images = kinds.decode(kind, nets..., z, rng, ...)   # via inference.Components
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sami_jax import objective
from sami_jax import samplers
from sami_jax import schedules


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a model kind is made of.

  Attributes:
    name: the value of config.model.kind.
    summary: one line for tables and help texts.
    image_model: "denoiser" (a U-Net eps_theta(x_t, t), sampled by the reverse process) or
      "decoder" (a one-shot conv decoder of z); also the key of its params.
    encoder: "posterior" (q(z | x) = N(mean, std^2), with a KL to the prior), "deterministic"
      (only the mean is used: no posterior, no KL) or "none" (no latent at all).
    latent_route: how z reaches the image: "guidance" (score guidance, SAMI), "adagn" (adaptive
      group norm inside the U-Net, DiffAE), "decoder" (the decoder's input) or "none".
    frozen: params subtrees that never train (restored or unused).
    needs_denoiser_checkpoint: the denoiser is restored from model.denoiser_checkpoint.
    kl_weight: "schedule" (objective.beta_* over training), "vae_beta" (objective.vae_beta,
      constant) or "" (no KL term).
    bound: the variational bound on -log p(x) the kind has (evaluation/elbo.py): "diffusion"
      (the diffusion bound of its noise prediction, plus the latent KL when it has a posterior),
      "decoder" (the VAE bound of a one-shot decoder) or "" (none; see no_bound_reason).
    no_bound_reason: why the kind has no bound ("" if it has one).
    compare_note: what the comparison (sami_jax.compare) changes for it, on top of the base config.
    compare_setup: applies those changes to a config (called with the config and the comparison's
      workdir).
  """
  name: str
  summary: str
  image_model: str
  encoder: str
  latent_route: str
  frozen: tuple[str, ...] = ()
  needs_denoiser_checkpoint: bool = False
  kl_weight: str = ""
  bound: str = "diffusion"
  no_bound_reason: str = ""
  compare_note: str = "base config"
  compare_setup: Callable[[ml_collections.ConfigDict, str], None] | None = None

  @property
  def has_encoder(self) -> bool:
    """The kind trains and uses an encoder (it has latents)."""
    return self.encoder != "none"

  @property
  def has_posterior(self) -> bool:
    """The encoder is a distribution q(z | x) (KL per latent, posterior std)."""
    return self.encoder == "posterior"

  @property
  def uses_guidance(self) -> bool:
    return self.latent_route == "guidance"

  @property
  def is_diffusion(self) -> bool:
    """Images come from the reverse diffusion process (the sampling.* fields apply)."""
    return self.image_model == "denoiser"

  @property
  def has_bound(self) -> bool:
    return bool(self.bound)

  def trains(self, subtree: str) -> bool:
    return subtree not in self.frozen


def _no_probe(c: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  c.train.probe_at_end = False


def _frozen_on_compare_ddpm(c: ml_collections.ConfigDict, workdir: str) -> None:
  from sami_jax import configlib  # pylint: disable=g-import-not-at-top
  configlib.use_frozen_denoiser(c)
  c.model.denoiser_checkpoint = os.path.join(workdir, "ddpm")


def _diffae_simple_loss(c: ml_collections.ConfigDict, workdir: str) -> None:
  del workdir
  c.diffusion.weighting = "simple"
  c.diffusion.time_sampling = "uniform"


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(name="sami", summary="encoder + denoiser trained jointly; z only through score guidance",
         image_model="denoiser", encoder="posterior", latent_route="guidance",
         kl_weight="schedule"),
    Kind(name="sami_frozen",
         summary="the encoder alone, on a frozen denoiser restored from a ddpm run",
         image_model="denoiser", encoder="posterior", latent_route="guidance",
         frozen=("denoiser",), needs_denoiser_checkpoint=True, kl_weight="schedule",
         compare_note="encoder only on the ddpm run's frozen denoiser; lr x 0.5, the encoder's "
                      "time draw t = u ** 0.1, KL weight 1e-3",
         compare_setup=_frozen_on_compare_ddpm),
    Kind(name="ddpm", summary="the unconditional denoiser alone (pre-training for sami_frozen)",
         image_model="denoiser", encoder="none", latent_route="none", frozen=("encoder",),
         compare_note="unconditional denoiser (pre-training for sami_frozen); no latent",
         compare_setup=_no_probe),
    Kind(name="beta_vae", summary="encoder + conv decoder, Gaussian likelihood, KL x vae_beta",
         image_model="decoder", encoder="posterior", latent_route="decoder",
         kl_weight="vae_beta", bound="decoder",
         compare_note="conv decoder (model.decoder), Gaussian likelihood obs_std "
                      "model.decoder.obs_std, KL weight objective.vae_beta"),
    Kind(name="diffae", summary="deterministic encoder; z conditions the U-Net by adaptive group "
         "norm (Diffusion Autoencoders)",
         image_model="denoiser", encoder="deterministic", latent_route="adagn", bound="",
         no_bound_reason="diffae's encoder is deterministic: there is no posterior q(z | x), "
                         "so no KL term and no variational bound on -log p(x)",
         compare_note="deterministic encoder, z -> U-Net adaptive group norm; simple loss, "
                      "uniform t",
         compare_setup=_diffae_simple_loss),
)}


def get(name: str) -> Kind:
  """The declaration of a kind; ValueError naming the known kinds otherwise."""
  if name not in KINDS:
    raise ValueError(f"config.model.kind={name!r} is not one of {list(KINDS)}.")
  return KINDS[name]


def of(config: ml_collections.ConfigDict) -> Kind:
  """The declaration of config.model.kind."""
  return get(config.model.kind)


# ------------------------------------------------------------------------------ training


def trainable_labels(kind: Kind, params: dict) -> dict:
  """Optimizer label per params subtree: its own name ("denoiser", "decoder", "encoder"), or
  "frozen" for the subtrees the kind does not train."""
  return {name: jax.tree.map(lambda _, n=name: n if kind.trains(n) else "frozen", sub)
          for name, sub in params.items()}


def encoder_time_conditioning(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's encoder is told the noise level t: model.encoder.time_conditioning,
  for the kinds whose encoder reads noisy images (score guidance). The other kinds' encoders
  (beta-VAE's, DiffAE's) only ever see clean images, so they are built without a time input."""
  return bool(config.model.encoder.time_conditioning) and of(config).uses_guidance


def kl_weight(kind: Kind, config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array | None:
  """The weight of the KL term at a step (what the loss uses), or None if the kind has none."""
  if kind.kl_weight == "schedule":
    return objective.beta_at(config.objective, step)
  if kind.kl_weight == "vae_beta":
    return jnp.asarray(config.objective.vae_beta, jnp.float32)
  return None


def make_loss_fn(config: ml_collections.ConfigDict, image_model, encoder,
                 schedule: schedules.Schedule | None = None) -> objective.LossFn:
  """The pure loss `(params, batch, rng, step, *, train) -> (loss, per-example terms)` of the
  config's kind (see objective.make_diffusion_loss_fn / make_vae_loss_fn for the terms)."""
  kind = of(config)
  if not kind.is_diffusion:
    return objective.make_vae_loss_fn(config, image_model, encoder)
  return objective.make_diffusion_loss_fn(
      config, image_model, encoder, schedule or schedules.from_config(config),
      latent=kind.latent_route, frozen_denoiser=not kind.trains("denoiser"),
      time_conditioning=encoder_time_conditioning(config))


# ------------------------------------------------------------------------------ generation


def eps_fn(kind: Kind, image_model, encoder, params: Any, z: jax.Array, *, gamma: float,
           time_conditioning: bool, schedule: schedules.Schedule) -> samplers.EpsFn:
  """The noise prediction a diffusion kind samples with, given latents z [B, d]."""
  if not kind.is_diffusion:
    raise ValueError(f"{kind.name} is not a diffusion model: decode its latents with `decode`.")
  if kind.latent_route == "guidance":
    return samplers.conditional_eps_fn(image_model, encoder, params, z, gamma=gamma,
                                       time_conditioning=time_conditioning, schedule=schedule)
  if kind.latent_route == "adagn":
    return samplers.adagn_eps_fn(image_model, params, z)
  return samplers.unconditional_eps_fn(image_model, params)


def decode(kind: Kind, image_model, encoder, params: Any, z: jax.Array, rng: jax.Array, *,
           schedule: schedules.Schedule, image_shape: tuple[int, int, int],
           gamma: float | jax.Array = 1.0, steps: int = 50, sampler: str = "ddim",
           eta: float = 0.0, clip_x0: bool = True, time_conditioning: bool = False,
           shared_noise: bool = False) -> jax.Array:
  """Images [B, H, W, C] for latents z [B, d] (pure; jit it with the non-array args static).

  Diffusion kinds run the reverse process from fresh noise (shared by every row with
  shared_noise, which makes traversals comparable) under the kind's eps_fn; for a kind without
  latents z only sets B. A one-shot decoder (beta_vae) returns its mean image, clipped to
  [-1, 1] when clip_x0.
  """
  if not kind.is_diffusion:
    return samplers.decoder_mean(image_model, params, z, clip=clip_x0)
  eps = eps_fn(kind, image_model, encoder, params, z, gamma=gamma,
               time_conditioning=time_conditioning, schedule=schedule)
  return samplers.generate(eps, schedule, z.shape[0], image_shape, rng,
                           shared_noise=shared_noise, steps=steps, sampler=sampler, eta=eta,
                           clip_x0=clip_x0)
