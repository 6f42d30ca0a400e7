"""How a Disks run's latents carry the factors: linear or not, and through the std or not.

  python benchmarks/latent_geometry.py WORKDIR [WORKDIR ...]

For each run (its newest checkpoint, EMA params), on 2,000 test images:
- R^2 of polynomial probes (degree 1, 2, 3, least squares on all monomials of the latent means,
  fitted and scored on the same images: a description, not a held-out score) of each factor;
- the correlation of the background intensity with the norm of the latent mean, |mu| (a factor
  coded in the norm reads near 0 on a linear probe and near 1 on a degree-2 one);
- on 512 test images noised to t = 0, 0.3, ..., 0.95 (one fixed noise draw): the encoder's mean
  std per latent, the correlation of each latent's std with the background, and of |mu| with it.
Prints one block per run. Used in docs/experiments.md (session of 2026-12-06).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np


def _poly_r2(z: np.ndarray, y: np.ndarray, degree: int) -> float:
  from sklearn.linear_model import LinearRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import PolynomialFeatures  # pylint: disable=g-import-not-at-top
  feats = PolynomialFeatures(degree).fit_transform(z)
  return float(LinearRegression().fit(feats, y).score(feats, y))


def describe(workdir: str) -> str:
  from sami_jax import inference, objective  # pylint: disable=g-import-not-at-top
  from sami_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config, params, step = inference.restore(workdir)
  comp = inference.components(config)
  names = pipeline.factor_names(config)
  enc = inference.encode_dataset(config, params, "test", 2000)
  z, factors = enc["mean"], enc["factors"]
  fmt = lambda a, k=3: "[" + ", ".join(f"{v:.{k}f}" for v in np.asarray(a, np.float64)) + "]"
  lines = [f"{workdir} (step {step}): latent sd {fmt(z.std(0))}, "
           f"posterior std {fmt(enc['std'].mean(0), 4)}"]
  for degree in (1, 2, 3):
    r2 = [_poly_r2(z, factors[:, i], degree) for i in range(len(names))]
    lines.append(f"  degree-{degree} probe R^2 " + ", ".join(
        f"{n} {v:.3f}" for n, v in zip(names, r2)))
  bg = names.index("background")
  norm = np.linalg.norm(z - z.mean(0), axis=1)
  lines.append(f"  corr(background, |mu|) {np.corrcoef(factors[:, bg], norm)[0, 1]:.3f}")
  batch = next(iter(pipeline.eval_iterator(config, "test", 512, num_examples=512)))
  x0, f = jnp.asarray(batch["image"]), np.asarray(batch["factors"])
  encode_fn = jax.jit(objective.bind_encoder(comp.encoder, params["encoder"],
                                             comp.time_conditioning))
  eps = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  for t in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
    tb = jnp.full((x0.shape[0],), t, jnp.float32)
    alpha, sigma = comp.schedule.alpha_sigma(tb)
    mean, std = (np.asarray(a) for a in encode_fn(objective.diffuse(x0, eps, alpha, sigma), tb))
    corr = [np.corrcoef(std[:, i], f[:, bg])[0, 1] if std[:, i].std() > 0 else float("nan")
            for i in range(std.shape[1])]
    lines.append(f"  t {t:.2f}: std {fmt(std.mean(0))}, corr(std_i, bg) "
                 f"{fmt(corr, 2)}, corr(|mu|, bg) "
                 f"{np.corrcoef(np.linalg.norm(mean, axis=1), f[:, bg])[0, 1]:.2f}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__)
    return 2
  for workdir in argv:
    print(describe(workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
