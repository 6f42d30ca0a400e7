"""sami_jax: SAMI (score-based autoencoder for multiscale inference) in JAX/Flax."""

__version__ = "0.1.0"
