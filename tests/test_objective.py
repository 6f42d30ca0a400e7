import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import configlib
from sami_jax import kinds
from sami_jax import objective
from sami_jax import schedules
from tests import tiny_models

B, H, W, C = 4, 3, 3, 1


def _config(kind="sami", **kw):
  c = configlib.default_config()
  c.model.kind = kind
  c.objective.beta_schedule = "constant"
  c.objective.beta_end = 0.0
  for k, v in kw.items():
    *path, field = k.replace("model__time", "model__encoder__time").split("__")
    node = c
    for p in path:
      node = node[p]
    node[field] = v
  return c


def _encode_fn(module, params):
  return lambda x, t: module.apply({"params": params}, x, t)


def test_gaussian_log_prob_and_kl_closed_forms():
  mean = jnp.array([[0.3, -1.0]])
  std = jnp.array([[0.5, 2.0]])
  z = jnp.array([[0.1, 0.7]])
  expected = sum(-0.5 * ((zi - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
                 for zi, m, s in zip([0.1, 0.7], [0.3, -1.0], [0.5, 2.0]))
  np.testing.assert_allclose(objective.gaussian_log_prob(z, mean, std), [expected], rtol=1e-6)

  # KL vs a Monte Carlo estimate E_q[log q - log p].
  rng = jax.random.PRNGKey(0)
  n = 400_000
  samples = mean + std * jax.random.normal(rng, (n, 2))
  log_q = objective.gaussian_log_prob(samples, jnp.broadcast_to(mean, samples.shape),
                                      jnp.broadcast_to(std, samples.shape))
  log_p = objective.gaussian_log_prob(samples, jnp.zeros_like(samples), jnp.ones_like(samples))
  mc = float(jnp.mean(log_q - log_p))
  closed = float(objective.kl_to_standard_normal(mean, std)[0])
  assert abs(mc - closed) < 0.02, (mc, closed)


def test_guidance_score_matches_central_finite_difference():
  with jax.enable_x64(True):
    enc = tiny_models.TinyEncoder(latent_dim=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, H, W, C), jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), tiny_models.init(enc, x))
    z = jax.random.normal(jax.random.PRNGKey(2), (B, 2), jnp.float64)
    encode_fn = _encode_fn(enc, params)
    g = np.asarray(objective.guidance_score(encode_fn, x, z, None))

    def log_q_of(i, xi):
      mean, std = enc.apply({"params": params}, xi[None])
      return float(objective.gaussian_log_prob(z[i:i + 1], mean, std)[0])

    h = 1e-5
    fd = np.zeros_like(g)
    xn = np.asarray(x)
    for i in range(B):
      for idx in np.ndindex(H, W, C):
        xp, xm = xn[i].copy(), xn[i].copy()
        xp[idx] += h
        xm[idx] -= h
        fd[(i,) + idx] = (log_q_of(i, jnp.asarray(xp)) - log_q_of(i, jnp.asarray(xm))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)
    assert np.abs(g).max() > 1e-3


def test_guidance_score_is_per_example():
  enc = tiny_models.TinyEncoder(latent_dim=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, H, W, C))
  params = tiny_models.init(enc, x)
  z = jax.random.normal(jax.random.PRNGKey(2), (B, 2))
  encode_fn = _encode_fn(enc, params)
  g = objective.guidance_score(encode_fn, x, z, None)
  x2 = x.at[2].add(1.5)
  g2 = objective.guidance_score(encode_fn, x2, z, None)
  for i in (0, 1, 3):
    np.testing.assert_allclose(g[i], g2[i], rtol=1e-6, atol=1e-7)
  assert not np.allclose(g[2], g2[2])


def _models_and_params(encoder_module):
  den = tiny_models.TinyDenoiser()
  x = jax.random.uniform(jax.random.PRNGKey(3), (B, H, W, C), minval=-1, maxval=1)
  t = jnp.full((B,), 0.5)
  params = {"denoiser": tiny_models.init(den, x, t, rng=4),
            "encoder": tiny_models.init(encoder_module, x, rng=5)}
  return den, params, {"image": x}


def test_constant_encoder_gives_the_plain_diffusion_loss():
  enc = tiny_models.ConstantEncoder()
  den, params, batch = _models_and_params(enc)
  rng = jax.random.PRNGKey(7)
  sami = kinds.make_loss_fn(_config("sami"), den, enc)
  plain = kinds.make_loss_fn(_config("ddpm"), den, enc)
  _, terms_s = sami(params, batch, rng, 0)
  _, terms_p = plain(params, batch, rng, 0)
  np.testing.assert_allclose(terms_s["diffusion"], terms_p["diffusion"], rtol=1e-6)
  np.testing.assert_allclose(terms_s["guidance_norm"], 0.0, atol=1e-7)


def test_outer_gradient_reaches_encoder_through_guidance():
  """d(diffusion term)/d(encoder params) is non-zero with beta = 0 (no KL path), and matches a
  central finite difference of the loss in one encoder parameter."""
  with jax.enable_x64(True):
    enc = tiny_models.TinyEncoder(latent_dim=2)
    den, params, batch = _models_and_params(enc)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = {"image": batch["image"].astype(jnp.float64)}
    loss_fn = kinds.make_loss_fn(_config("sami"), den, enc)
    rng = jax.random.PRNGKey(11)
    # Jitted (one compile each instead of one per operation); float64 throughout all the same.
    f = jax.jit(lambda p: loss_fn(p, batch, rng, 0)[0])
    grads = jax.jit(jax.grad(f))(params)
    genc = grads["encoder"]
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(genc))))
    assert norm > 1e-6

    kernel = params["encoder"]["Dense_0"]["kernel"]
    idx = (0, 0)
    h = 1e-6
    def with_value(v):
      p = jax.tree.map(lambda a: a, params)
      p["encoder"]["Dense_0"]["kernel"] = kernel.at[idx].set(v)
      return float(f(p))
    fd = (with_value(kernel[idx] + h) - with_value(kernel[idx] - h)) / (2 * h)
    analytic = float(genc["Dense_0"]["kernel"][idx])
    assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(fd)), (fd, analytic)
    assert abs(analytic) > 1e-8


def test_frozen_mode_gives_no_denoiser_gradient_and_ddpm_no_encoder_gradient():
  enc = tiny_models.TinyEncoder(latent_dim=2)
  den, params, batch = _models_and_params(enc)
  rng = jax.random.PRNGKey(0)
  g_frozen = jax.jit(jax.grad(lambda p: kinds.make_loss_fn(_config("sami_frozen"), den, enc)(
      p, batch, rng, 0)[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_frozen["denoiser"]))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_frozen["encoder"]))
  g_ddpm = jax.jit(jax.grad(lambda p: kinds.make_loss_fn(_config("ddpm"), den, enc)(
      p, batch, rng, 0)[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_ddpm["encoder"]))


def test_guidance_scale_and_elbo_weighting():
  enc = tiny_models.TinyEncoder(latent_dim=2)
  den, params, batch = _models_and_params(enc)
  rng = jax.random.PRNGKey(0)
  _, t1 = kinds.make_loss_fn(_config("sami"), den, enc)(params, batch, rng, 0)
  _, t0 = kinds.make_loss_fn(_config("sami", diffusion__guidance_scale=0.0), den, enc)(
      params, batch, rng, 0)
  np.testing.assert_allclose(t0["diffusion"], t0["mse_uncond"], rtol=1e-6)
  assert not np.allclose(t1["diffusion"], t1["mse_uncond"])
  _, te = kinds.make_loss_fn(_config("sami", diffusion__weighting="elbo"), den, enc)(
      params, batch, rng, 0)
  w = schedules.Schedule().elbo_weight(te["t"])
  np.testing.assert_allclose(te["diffusion"], w * t1["diffusion"], rtol=1e-5)


def test_beta_schedules():
  o = configlib.default_config().objective
  o.beta_start, o.beta_end, o.beta_warmup_steps = 1e-6, 1e-2, 100
  o.beta_schedule = "loglinear"
  np.testing.assert_allclose(objective.beta_at(o, 0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(objective.beta_at(o, 50), 1e-4, rtol=1e-4)  # geometric midpoint
  np.testing.assert_allclose(objective.beta_at(o, 500), 1e-2, rtol=1e-5)
  o.beta_schedule = "linear"
  np.testing.assert_allclose(objective.beta_at(o, 50), (1e-6 + 1e-2) / 2, rtol=1e-5)
  o.beta_schedule = "constant"
  np.testing.assert_allclose(objective.beta_at(o, 0), 1e-2, rtol=1e-6)


def test_mask_excludes_padding_rows():
  enc = tiny_models.TinyEncoder(latent_dim=2)
  den, params, batch = _models_and_params(enc)
  rng = jax.random.PRNGKey(0)
  loss_fn = kinds.make_loss_fn(_config("sami"), den, enc)
  _, terms = loss_fn(params, batch, rng, 0)
  mask = jnp.array([True, True, False, False])
  loss_m, _ = loss_fn(params, dict(batch, mask=mask), rng, 0)
  np.testing.assert_allclose(loss_m, jnp.mean(terms["diffusion"][:2]), rtol=1e-6)


@pytest.mark.parametrize("scale_param", ["softplus", "exp"])
def test_loss_at_init_is_finite_and_of_order_one_with_the_real_models(scale_param):
  """The known trap: guidance ~ 1/std^2. With the real encoder (std == 1 at init) the guided loss
  on unit-variance data is finite and O(1) (an unconstrained log-variance head gave ~1e17)."""
  from sami_jax import models
  c = configlib.default_config()
  c.data.image_size, c.data.channels = 8, 1
  c.model.denoiser.ch, c.model.denoiser.ch_mult, c.model.denoiser.attn_resolutions = 8, (1, 2), ()
  c.model.denoiser.num_groups = c.model.encoder.num_groups = 4
  c.model.encoder.ch, c.model.encoder.ch_mult = 8, (1, 2)
  c.model.encoder.scale_param = scale_param
  den, enc = models.build_models(c)
  params = models.initialize(c, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 1))  # unit variance
  loss, terms = jax.jit(kinds.make_loss_fn(c, den, enc))(params, {"image": x},
                                                             jax.random.PRNGKey(2), 0)
  assert np.isfinite(float(loss))
  assert 0.5 < float(loss) < 2.0, float(loss)
  assert np.all(np.isfinite(terms["guidance_norm"]))
  np.testing.assert_allclose(terms["posterior_std"], 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------ the split objective
#
# The references below are written by hand from SAMI.md (the Gaussian log q, its x-gradient, the
# guided prediction with eps_theta held fixed), not with objective.py's functions.


def _split_setup(encoder_time_sampling="shared", **kw):
  enc = tiny_models.TimeTinyEncoder(latent_dim=2)
  den = tiny_models.TinyDenoiser()
  x = jax.random.uniform(jax.random.PRNGKey(3), (B, H, W, C), minval=-1, maxval=1)
  t = jnp.full((B,), 0.5)
  params = {"denoiser": tiny_models.init(den, x, t, rng=4),
            "encoder": tiny_models.init(enc, x, t, rng=5)}
  config = _config("sami", objective__denoiser_loss="unconditional",
                   objective__encoder_time_sampling=encoder_time_sampling,
                   objective__beta_end=0.25, model__time_conditioning=True, **kw)
  return config, den, enc, params, {"image": x}


def _hand_encoder_term(config, den, enc, params, x0, rng, t, w, eps):
  """mean_B[ w ||eps - (sg(eps_theta(x_t, t)) - sigma_t grad_x log q(z | x_t, t))||^2 / D
  + beta KL(q(z | x0, t=0) || N(0, I)) / D ], z = mean0 + std0 * eta; a function of the encoder
  params only (the denoiser's are fixed)."""
  alpha = jnp.sqrt(jax.nn.sigmoid(schedules.Schedule().logsnr(t)))
  sigma = jnp.sqrt(jax.nn.sigmoid(-schedules.Schedule().logsnr(t)))
  x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
  eps_theta = den.apply({"params": params["denoiser"]}, x_t, t)
  eta = jax.random.normal(jax.random.split(rng, 4)[2], (B, 2))
  beta = config.objective.beta_end

  def loss(enc_params):
    mean0, std0 = enc.apply({"params": enc_params}, x0, jnp.zeros((B,)))
    z = mean0 + std0 * eta

    def log_q(x):
      mean, std = enc.apply({"params": enc_params}, x, t)
      return jnp.sum(-0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * np.log(2 * np.pi))
    eps_hat = eps_theta - sigma[:, None, None, None] * jax.grad(log_q)(x_t)
    kl = 0.5 * jnp.sum(mean0 ** 2 + std0 ** 2 - 1 - 2 * jnp.log(std0), axis=-1)
    return jnp.mean(w * jnp.mean((eps - eps_hat) ** 2, axis=(1, 2, 3)) + beta * kl / (H * W * C))
  return loss


@pytest.mark.parametrize("encoder_time_sampling", ["shared", "high_noise"])
def test_split_denoiser_gradient_is_the_ddpm_kinds_exactly(encoder_time_sampling):
  config, den, enc, params, batch = _split_setup(encoder_time_sampling)
  rng = jax.random.PRNGKey(9)
  ddpm_config = configlib.copy(config)
  ddpm_config.model.kind = "ddpm"
  g_split = jax.grad(lambda p: kinds.make_loss_fn(config, den, enc)(p, batch, rng, 0)[0])(params)
  g_ddpm = jax.grad(lambda p: kinds.make_loss_fn(ddpm_config, den, enc)(p, batch, rng, 0)[0])(
      params)
  for a, b in zip(jax.tree.leaves(g_split["denoiser"]), jax.tree.leaves(g_ddpm["denoiser"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  # ... while the guided (joint) loss gives the denoiser another gradient.
  joint = configlib.copy(config)
  joint.objective.denoiser_loss, joint.objective.encoder_time_sampling = "guided", "shared"
  g_joint = jax.grad(lambda p: kinds.make_loss_fn(joint, den, enc)(p, batch, rng, 0)[0])(params)
  assert not np.allclose(jax.tree.leaves(g_joint["denoiser"])[0],
                         jax.tree.leaves(g_ddpm["denoiser"])[0])


@pytest.mark.parametrize("encoder_time_sampling", ["shared", "high_noise"])
def test_split_encoder_gradient_is_the_guided_losses_with_eps_theta_fixed(encoder_time_sampling):
  """Also checks the noise-aware encoder's times: z from the clean image at t = 0, the guidance
  at the draw's own t (the hand reference encodes exactly so)."""
  config, den, enc, params, batch = _split_setup(encoder_time_sampling)
  rng = jax.random.PRNGKey(9)
  x0 = batch["image"]
  schedule = schedules.from_config(config)
  if encoder_time_sampling == "shared":
    rng_t, rng_eps = jax.random.split(rng, 4)[:2]
    t, w = schedule.sample_times(rng_t, B, config.diffusion.weighting)
  else:
    rng_t, rng_eps = jax.random.split(jax.random.fold_in(rng, 1))
    t = jnp.maximum(jax.random.uniform(rng_t, (B,)), 1e-12) ** 0.3
    w = schedule.elbo_weight(t)  # objective.encoder_weighting's default
    assert float(jnp.min(t)) > 0.2  # the high-noise draw, not the denoiser's
  eps = jax.random.normal(rng_eps, x0.shape)
  ref = jax.grad(_hand_encoder_term(config, den, enc, params, x0, rng, t, w, eps))(
      params["encoder"])
  got = jax.grad(lambda p: kinds.make_loss_fn(config, den, enc)(p, batch, rng, 0)[0])(params)
  for a, b in zip(jax.tree.leaves(got["encoder"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # sami_frozen is the split's encoder term alone: the same encoder gradient.
  frozen = configlib.copy(config)
  frozen.model.kind = "sami_frozen"
  g_frozen = jax.grad(lambda p: kinds.make_loss_fn(frozen, den, enc)(p, batch, rng, 0)[0])(params)
  for a, b in zip(jax.tree.leaves(g_frozen["encoder"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_a_time_conditioned_encoder_is_told_the_noise_level():
  """The hand reference above would not notice an encoder that ignored t: this one does not."""
  enc = tiny_models.TimeTinyEncoder(latent_dim=2)
  x = jax.random.uniform(jax.random.PRNGKey(3), (B, H, W, C), minval=-1, maxval=1)
  params = tiny_models.init(enc, x, jnp.zeros((B,)))
  m0, _ = enc.apply({"params": params}, x, jnp.zeros((B,)))
  m1, _ = enc.apply({"params": params}, x, jnp.full((B,), 0.7))
  assert float(jnp.max(jnp.abs(m0 - m1))) > 1e-3


def test_guidance_gain_is_the_unconditional_minus_the_guided_mse():
  enc = tiny_models.TimeTinyEncoder(latent_dim=2)
  config, den, _, params, batch = _split_setup("shared")
  rng = jax.random.PRNGKey(2)
  joint = _config("sami", model__time_conditioning=True)  # "simple" weighting: w = 1
  _, terms = kinds.make_loss_fn(joint, den, enc)(params, batch, rng, 0)
  np.testing.assert_allclose(terms["guidance_gain"], terms["mse_uncond"] - terms["diffusion"],
                             rtol=1e-5, atol=1e-7)
  assert np.any(np.abs(terms["guidance_gain"]) > 1e-6)
  # With gamma = 0 the guided prediction is the denoiser's own: no gain.
  off = _config("sami", model__time_conditioning=True, diffusion__guidance_scale=0.0)
  _, alone = kinds.make_loss_fn(off, den, enc)(params, batch, rng, 0)
  np.testing.assert_allclose(alone["guidance_gain"], 0.0, atol=1e-7)
  # The split logs it on the encoder's draw (here the shared one): the same gain.
  _, split = kinds.make_loss_fn(config, den, enc)(params, batch, rng, 0)
  np.testing.assert_allclose(split["guidance_gain"], terms["guidance_gain"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighting,params_kw", [
    ("sigma_power", {"diffusion__guidance_power": 2.0}),
    ("cutoff", {"diffusion__guidance_cutoff_sigma": 0.8}),
])
def test_guidance_weighting_scales_the_correction_in_training_and_sampling(weighting, params_kw):
  from sami_jax import samplers
  enc = tiny_models.TimeTinyEncoder(latent_dim=2)
  den = tiny_models.TinyDenoiser()
  x = jax.random.uniform(jax.random.PRNGKey(3), (B, H, W, C), minval=-1, maxval=1)
  t_draw = jnp.array([0.05, 0.3, 0.6, 0.95])
  params = {"denoiser": tiny_models.init(den, x, t_draw, rng=4),
            "encoder": tiny_models.init(enc, x, t_draw, rng=5)}
  const = _config("sami", model__time_conditioning=True)
  weighted = _config("sami", model__time_conditioning=True,
                     diffusion__guidance_weighting=weighting, **params_kw)
  # Hand-written gamma(t) from the cosine schedule's sigma.
  s = 0.008
  alpha_bar = (np.cos((np.asarray(t_draw) + s) / (1 + s) * np.pi / 2) ** 2
               / np.cos(s / (1 + s) * np.pi / 2) ** 2)
  sigma = np.sqrt(1 - alpha_bar)
  gamma = sigma ** 2.0 if weighting == "sigma_power" else (sigma >= 0.8).astype(float)
  assert 0 < gamma.min() < 1 or gamma.min() == 0 < gamma.max()
  z = jax.random.normal(jax.random.PRNGKey(6), (B, 2))
  eps_theta = den.apply({"params": params["denoiser"]}, x, t_draw)
  corr = {}
  for name, c in (("const", const), ("weighted", weighted)):
    fn = samplers.conditional_eps_fn(den, enc, params, z, gamma=1.5, time_conditioning=True,
                                     schedule=schedules.from_config(c))
    corr[name] = np.asarray(eps_theta - fn(x, t_draw))
  # (eps_theta - eps_hat in float32: absolute rounding of eps_theta's size, ~1e-8)
  np.testing.assert_allclose(corr["weighted"], gamma[:, None, None, None] * corr["const"],
                             rtol=1e-5, atol=5e-8)
  # Training: the logged guidance norm (RMS of the correction) scales the same way, per example.
  rng = jax.random.PRNGKey(0)
  _, tc = kinds.make_loss_fn(const, den, enc)(params, {"image": x}, rng, 0)
  _, tw = kinds.make_loss_fn(weighted, den, enc)(params, {"image": x}, rng, 0)
  t = np.asarray(tc["t"])
  ab = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
  sig = np.sqrt(1 - ab)
  g_train = sig ** 2.0 if weighting == "sigma_power" else (sig >= 0.8).astype(float)
  np.testing.assert_allclose(tw["guidance_norm"], g_train * np.asarray(tc["guidance_norm"]),
                             rtol=1e-4, atol=1e-8)


def test_guidance_without_the_std_path_is_the_mean_term_alone():
  """through_std=False: g = sum_i (z_i - mean_i(x)) / std_i(x_t)^2 grad_x mean_i(x) at x = x_t,
  written here as a vector-Jacobian product of the mean alone."""
  enc = tiny_models.TinyEncoder(latent_dim=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, H, W, C))
  params = tiny_models.init(enc, x)
  z = jax.random.normal(jax.random.PRNGKey(2), (B, 2))
  encode_fn = _encode_fn(enc, params)
  mean, std = enc.apply({"params": params}, x)
  _, vjp = jax.vjp(lambda xx: enc.apply({"params": params}, xx)[0], x)
  ref = vjp((z - mean) / std ** 2)[0]
  got = objective.guidance_score(encode_fn, x, z, None, through_std=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  full = objective.guidance_score(encode_fn, x, z, None)
  assert not np.allclose(full, ref, rtol=1e-3)  # this encoder's std does depend on x
