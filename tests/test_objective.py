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
    sec, field = k.split("__")
    c[sec][field] = v
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
