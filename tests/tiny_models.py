"""Tiny stand-in networks used to test the objective and samplers in isolation from the real models.

They follow the real models' call signatures: denoiser(x, t, train=...) -> eps, encoder(x, t) ->
(mean, std), and like them have no coupling across the batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyEncoder(nn.Module):
  latent_dim: int = 2
  hidden: int = 8

  @nn.compact
  def __call__(self, x, t=None, *, train=False):
    h = x.reshape((x.shape[0], -1))
    h = nn.tanh(nn.Dense(self.hidden)(h))
    mean = nn.Dense(self.latent_dim)(h)
    std = 0.5 + jax.nn.softplus(nn.Dense(self.latent_dim)(h))
    return mean, std


class TimeTinyEncoder(nn.Module):
  """A noise-aware TinyEncoder: t [B] enters beside the pixels (required, as in the real encoder
  with time_conditioning=True), so its output depends on the noise level."""
  latent_dim: int = 2
  hidden: int = 8

  @nn.compact
  def __call__(self, x, t=None, *, train=False):
    if t is None:
      raise ValueError("TimeTinyEncoder needs t")
    h = jnp.concatenate([x.reshape((x.shape[0], -1)), 3.0 * t[:, None]], axis=-1)
    h = nn.tanh(nn.Dense(self.hidden)(h))
    mean = nn.Dense(self.latent_dim)(h)
    std = 0.5 + jax.nn.softplus(nn.Dense(self.latent_dim)(h))
    return mean, std


class ConstantEncoder(nn.Module):
  """Output independent of the input: its guidance score is exactly zero."""
  latent_dim: int = 2

  @nn.compact
  def __call__(self, x, t=None, *, train=False):
    mean = self.param("mean", nn.initializers.normal(1.0), (self.latent_dim,))
    log_std = self.param("log_std", nn.initializers.zeros, (self.latent_dim,))
    b = x.shape[0]
    return jnp.broadcast_to(mean, (b, self.latent_dim)), jnp.broadcast_to(
        jnp.exp(log_std), (b, self.latent_dim))


class TinyDenoiser(nn.Module):
  hidden: int = 8

  @nn.compact
  def __call__(self, x, t, *, train=False):
    b = x.shape[0]
    h = jnp.concatenate([x.reshape((b, -1)), t[:, None]], axis=-1)
    h = nn.tanh(nn.Dense(self.hidden)(h))
    return nn.Dense(x[0].size)(h).reshape(x.shape)


def init(module, x, t=None, rng=0, **kw):
  return module.init(jax.random.PRNGKey(rng), x, t, **kw)["params"]
