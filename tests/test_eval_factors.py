"""Tests of evaluation/factors.py (Cartesian vs polar Disks factors, circular probes) and
evaluation/speckle.py (background noise of Disks images).

Expected values are derived by hand in the comments: closed-form population R^2 of linear probes
for uniform r and theta, exact pixel counts of masks, and rendered disks (data/disks.py) whose
noise is added with a known standard deviation.
"""

import math

import numpy as np
import pytest

from sami_jax.data import disks
from sami_jax.evaluation import factors
from sami_jax.evaluation import probes
from sami_jax.evaluation import speckle

# ------------------------------------------------------------------------------------ factor sets


def test_factor_sets_by_hand():
  names = ("x", "y", "background")
  # image_size 32: centre (16, 16). Rows: right of centre, above (y smaller), left, a 3-4-5 point.
  f = np.array([[26.0, 16.0, 0.1], [16.0, 6.0, 0.2], [6.0, 16.0, 0.3], [19.0, 20.0, 0.4]])
  sets = factors.factor_sets(f, names, 32)
  cart, polar = sets["cartesian"], sets["polar"]
  assert cart.names == ("x", "y", "background") and cart.circular == (False, False, False)
  assert polar.names == ("r", "theta", "background") and polar.circular == (False, True, False)
  assert cart.position == polar.position == (0, 1)
  np.testing.assert_array_equal(cart.values, f)
  np.testing.assert_allclose(polar.values[:, 0], [10, 10, 10, 5], atol=1e-12)
  # atan2(dy, dx): (10, 0) -> 0; (0, -10) -> -pi/2; (-10, 0) -> pi, wrapped to -pi; (3, 4).
  np.testing.assert_allclose(polar.values[:, 1], [0, -np.pi / 2, -np.pi, math.atan2(4, 3)],
                             atol=1e-12)
  np.testing.assert_array_equal(polar.values[:, 2], f[:, 2])


def test_factor_sets_five_factors_and_order():
  names = disks.factor_names("xy_bg_r_fg")  # x, y, background, radius, foreground
  f = disks.sample_factors(np.random.default_rng(0), 10, "xy_bg_r_fg", 32)
  polar = factors.factor_sets(f, names, 32)["polar"]
  assert polar.names == ("r", "theta", "background", "radius", "foreground")
  assert polar.circular == (False, True, False, False, False)
  np.testing.assert_allclose(polar.values[:, 2:], f[:, 2:], atol=0)
  # Columns in another order: x and y are found by name, the rest keep their order.
  g = f[:, [2, 1, 0, 3, 4]]
  other = factors.factor_sets(g, ["background", "y", "x", "radius", "foreground"], 32)
  np.testing.assert_allclose(other["polar"].values, polar.values, atol=1e-12)
  assert other["cartesian"].names == ("x", "y", "background", "radius", "foreground")
  with pytest.raises(ValueError, match="'x' and 'y'"):
    factors.factor_sets(f[:, :3], ["a", "b", "c"], 32)
  with pytest.raises(ValueError, match="one name per column"):
    factors.factor_sets(f, ["x", "y"], 32)


def test_wrap_angle():
  np.testing.assert_allclose(factors.wrap_angle([np.pi, -np.pi, 3 * np.pi / 2, 0.5, -7.0]),
                             [-np.pi, -np.pi, -np.pi / 2, 0.5, -7.0 + 2 * np.pi], atol=1e-12)


# ------------------------------------------------------------------------------------ probes

R_MAX = 8.0  # r ~ U(0, R_MAX): E r = 4, E r^2 = 64 / 3, so (E r)^2 / E r^2 = 3 / 4.


def _polar_factors(n, seed):
  """Factors (x, y, background) from r ~ U(0, 8), theta ~ U(-pi, pi), about centre (16, 16)."""
  rng = np.random.default_rng(seed)
  r = rng.uniform(0, R_MAX, n)
  theta = rng.uniform(-np.pi, np.pi, n)
  bg = rng.uniform(0, 0.5, n)
  return np.stack([16 + r * np.cos(theta), 16 + r * np.sin(theta), bg], 1), r, theta


def test_polar_latent_scores_higher_on_the_polar_set():
  """Latent z = (r, cos theta, sin theta, background).

  Polar set: r, (cos, sin) and background are linear in z: R^2 = 1.
  Cartesian set: x - 16 = r cos theta. Its covariances with the latents: with r (E r^2 E cos =
  0), with cos (E r E cos^2 = E r / 2), with sin (0); Var(cos) = 1/2, so the best linear
  prediction is E r cos theta and R^2 = (E r)^2 (1/2) / (E r^2 / 2) = (E r)^2 / E r^2 = 3/4.
  Same for y.
  """
  f, r, theta = _polar_factors(5000, seed=0)
  rng = np.random.default_rng(1)
  z = np.stack([r, np.cos(theta), np.sin(theta), f[:, 2]], 1) + 1e-4 * rng.normal(size=(5000, 4))
  m = factors.factor_set_metrics(z[:3000], f[:3000], z[3000:], f[3000:],
                                 ["x", "y", "background"], 32)
  np.testing.assert_allclose(m["polar"]["linear"], [1, 1, 1], atol=1e-3)
  # 2000 test samples: the sampling error of these R^2 is ~0.01.
  np.testing.assert_allclose(m["cartesian"]["linear"][:2], [0.75, 0.75], atol=0.03)
  assert m["cartesian"]["linear"][2] == pytest.approx(1, abs=1e-3)
  assert m["polar"]["position_linear_r2"] == pytest.approx(1, abs=1e-3)
  assert m["cartesian"]["position_linear_r2"] == pytest.approx(0.75, abs=0.03)
  # Both sets describe the same position: a kNN probe reads either well.
  assert min(m["polar"]["position_knn_r2"], m["cartesian"]["position_knn_r2"]) > 0.9
  a = factors.aligned_coordinates(m)
  assert (a["aligned"], a["decided_by"]) == ("polar", "linear R^2")


def test_cartesian_latent_scores_higher_on_the_cartesian_set():
  """Latent z = (x, y, background).

  Cartesian set: R^2 = 1. Polar set: r is uncorrelated with x - 16 = r cos theta (E r^2 E cos = 0)
  and with y - 16, so its linear R^2 is 0; theta, scored on (cos, sin): Cov(cos theta, r cos
  theta) = E r / 2, Var(r cos theta) = E r^2 / 2, so cos theta's R^2 = (E r / 2)^2 / (E r^2 / 2)
  / Var(cos) = (E r)^2 / E r^2 = 3/4, the same for sin, and the pooled R^2 is 3/4.
  """
  f, _, _ = _polar_factors(5000, seed=2)
  z = f + 1e-4 * np.random.default_rng(3).normal(size=f.shape)
  m = factors.factor_set_metrics(z[:3000], f[:3000], z[3000:], f[3000:],
                                 ["x", "y", "background"], 32)
  np.testing.assert_allclose(m["cartesian"]["linear"], [1, 1, 1], atol=1e-3)
  np.testing.assert_allclose(m["polar"]["linear"][:2], [0.0, 0.75], atol=0.03)
  a = factors.aligned_coordinates(m)
  assert (a["aligned"], a["decided_by"]) == ("cartesian", "linear R^2")
  assert m["cartesian"]["position_mig"] > m["polar"]["position_mig"]


def test_circular_probe_over_the_whole_circle():
  """z = (cos theta, sin theta), theta ~ U(-pi, pi).

  On (cos, sin) the linear probe is exact: R^2 = 1. On theta itself (not circular) the best
  linear prediction uses sin theta only: Cov(theta, sin theta) = (1 / 2 pi) int theta sin theta
  = 1, Var(sin) = 1/2, Var(theta) = pi^2 / 3, so R^2 = (1 / (1/2)) / (pi^2 / 3) = 6 / pi^2
  = 0.608: the jump at the cut is what a number cannot follow.
  """
  rng = np.random.default_rng(4)
  theta = rng.uniform(-np.pi, np.pi, 6000)
  z = np.stack([np.cos(theta), np.sin(theta)], 1)
  f = theta[:, None]
  circ = probes.factor_r2(z[:4000], f[:4000], z[4000:], f[4000:], circular=[True])
  flat = probes.factor_r2(z[:4000], f[:4000], z[4000:], f[4000:])
  assert circ["linear"][0] == pytest.approx(1.0, abs=1e-9)
  assert circ["knn"][0] > 0.99
  assert flat["linear"][0] == pytest.approx(6 / np.pi ** 2, abs=0.02)


def test_circular_probe_near_the_cut():
  """theta = pi + delta wrapped to [-pi, pi), delta ~ U(-a, a), a = 0.3; the latent is delta.

  theta itself jumps between ~-pi and ~pi: theta = -pi sign(delta) + delta. A linear probe on
  delta: Cov(theta, delta) = -pi E|delta| + E delta^2 = -pi a / 2 + a^2 / 3, Var(delta) = a^2 / 3,
  Var(theta) = pi^2 - pi a + a^2 / 3, R^2 = Cov^2 / (Var(delta) Var(theta)) = 0.7245.
  On (cos theta, sin theta) = -(cos delta, sin delta): sin delta's explained variance is
  Cov(sin delta, delta)^2 / Var(delta), Cov = (sin a - a cos a) / a; cos delta is even, so
  uncorrelated with delta: nothing of it is explained. Pooled R^2 = explained / (Var sin delta +
  Var cos delta), with E sin^2 = 1/2 - sin(2a) / (4a), E cos = sin(a) / a, E cos^2 = 1/2 +
  sin(2a) / (4a): 0.99399 (both checked by quadrature).
  """
  a = 0.3
  cov = -np.pi * a / 2 + a ** 2 / 3
  raw_expected = cov ** 2 / (a ** 2 / 3 * (np.pi ** 2 - np.pi * a + a ** 2 / 3))
  c_sin = (np.sin(a) - a * np.cos(a)) / a
  var_sin = 0.5 - np.sin(2 * a) / (4 * a)
  var_cos = 0.5 + np.sin(2 * a) / (4 * a) - (np.sin(a) / a) ** 2
  circ_expected = c_sin ** 2 / (a ** 2 / 3) / (var_sin + var_cos)
  assert raw_expected == pytest.approx(0.7245, abs=1e-4)
  assert circ_expected == pytest.approx(0.99399, abs=1e-4)

  rng = np.random.default_rng(5)
  delta = rng.uniform(-a, a, 20000)
  theta = factors.wrap_angle(np.pi + delta)
  assert theta.min() < -2.8 and theta.max() > 2.8  # really on both sides of the cut
  z, f = delta[:, None], theta[:, None]
  circ = probes.factor_r2(z[:10000], f[:10000], z[10000:], f[10000:], circular=[True])
  flat = probes.factor_r2(z[:10000], f[:10000], z[10000:], f[10000:])
  assert circ["linear"][0] == pytest.approx(circ_expected, abs=0.002)
  assert flat["linear"][0] == pytest.approx(raw_expected, abs=0.02)
  assert circ["knn"][0] > 0.99


def test_circular_probe_leaves_other_factors_unchanged():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(400, 3))
  f = np.stack([z[:, 0] + 0.3 * rng.normal(size=400), rng.uniform(-np.pi, np.pi, 400),
                z[:, 1] ** 2], 1)
  a = probes.factor_r2(z[:300], f[:300], z[300:], f[300:], circular=[False, True, False])
  b = probes.factor_r2(z[:300], f[:300], z[300:], f[300:])
  for name in ("linear", "knn"):
    np.testing.assert_allclose(a[name][[0, 2]], b[name][[0, 2]], atol=1e-12)
  with pytest.raises(ValueError, match="one bool per factor"):
    probes.factor_r2(z, f, z, f, circular=[True])


def test_pooled_r2_by_hand():
  y = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # mean 0, total SS 4
  pred = np.zeros_like(y)
  pred[0, 0] = 1.0  # one point exact: SSE 3 -> R^2 = 1 - 3/4
  assert probes.pooled_r2(y, pred) == pytest.approx(0.25)
  assert probes.pooled_r2(y, y) == 1.0
  assert math.isnan(probes.pooled_r2(np.ones((3, 2)), np.zeros((3, 2))))
  # 1-D: the usual R^2. y = 0..4 has SS_tot 10; errors +-1 at two points: 1 - 2 / 10.
  assert probes.pooled_r2([0, 1, 2, 3, 4], [1, 1, 2, 3, 3]) == pytest.approx(0.8)


def test_aligned_coordinates_rule():
  def m(cart_r2, polar_r2, cart_mig=None, polar_mig=None):
    return {"cartesian": {"position_linear_r2": cart_r2, "position_mig": cart_mig},
            "polar": {"position_linear_r2": polar_r2, "position_mig": polar_mig}}
  assert factors.aligned_coordinates(m(0.9, 0.6))["aligned"] == "cartesian"
  assert factors.aligned_coordinates(m(0.6, 0.9))["aligned"] == "polar"
  # R^2 within the margin (0.05): MIG decides, if it can.
  got = factors.aligned_coordinates(m(0.80, 0.83, 0.2, 0.5))
  assert (got["aligned"], got["decided_by"]) == ("polar", "MIG")
  got = factors.aligned_coordinates(m(0.80, 0.83, 0.3, 0.32))
  assert (got["aligned"], got["decided_by"]) == ("undecided", None)
  assert factors.aligned_coordinates(m(0.80, 0.83))["aligned"] == "undecided"
  assert factors.aligned_coordinates(m(0.80, 0.83), margin=0.01)["aligned"] == "polar"
  assert factors.aligned_coordinates(m(0.5, 0.5), margin=0.0)["aligned"] == "undecided"
  assert factors.aligned_coordinates(m(float("nan"), 0.9))["aligned"] == "undecided"
  assert "linear-probe" in factors.aligned_coordinates(m(0.9, 0.6))["rule"]
  with pytest.raises(ValueError, match="missing"):
    factors.aligned_coordinates({"polar": {"position_linear_r2": 1.0}})


# ------------------------------------------------------------------------------------ speckle


def test_background_mask_by_hand():
  # 8 x 8, centre (4, 4), radius 1, margin 1: not background where the pixel centre is within 2 px.
  # Pixel centres are 0.5, 1.5, ... away from 4 along each axis; d^2 <= 4 for offsets
  # (+-0.5, +-0.5) (d^2 0.5, 4 pixels) and (+-0.5, +-1.5), (+-1.5, +-0.5) (2.5, 8 pixels);
  # (+-1.5, +-1.5) has 4.5 and (+-0.5, +-2.5) 6.5. So 12 disk pixels, 52 background.
  mask = speckle.background_mask([[4.0, 4.0]], 1.0, 8, margin=1.0)
  assert mask.shape == (1, 8, 8) and mask.sum() == 52
  assert not mask[0, 3:5, 2:6].any() and not mask[0, 2:6, 3:5].any()
  assert mask[0, 2, 2] and mask[0, 5, 5]
  # x is the column, y the row: a centre at (x, y) = (1, 6), radius 1, clears the four pixels
  # whose centres (0.5 or 1.5, 5.5 or 6.5) are 0.71 px away: rows 5-6, columns 0-1.
  m2 = speckle.background_mask([[1.0, 6.0]], 1.0, (8, 10), margin=0.0)
  assert m2.shape == (1, 8, 10) and m2.sum() == 80 - 4
  assert not m2[0, 5:7, 0:2].any() and m2[0, 1, 6] and m2[0, 0:2, 5:7].all()


def _rendered(n, seed, factor_set="xy_bg_r_fg", size=32):
  f = disks.sample_factors(np.random.default_rng(seed), n, factor_set, size).astype(np.float64)
  images = disks.render_factors(f, factor_set, size).astype(np.float64) / 127.5 - 1.0
  p = disks.render_params(f, factor_set, size)
  centres = np.stack([p["centre_x"], p["centre_y"]], 1)
  return images, centres, p["radius"], p["background"]


def test_background_std_clean_renders_is_zero():
  images, centres, radius, bg = _rendered(64, seed=0)
  stats = speckle.background_stats(images, centres, radius)
  # The background of a render is one uint8 value: std 0 (up to float rounding of the mean),
  # mean = round(255 bg) / 127.5 - 1.
  np.testing.assert_allclose(stats["std"], 0.0, atol=1e-12)
  np.testing.assert_allclose(stats["mean"], np.rint(255 * bg) / 127.5 - 1, atol=1e-12)
  assert (stats["num_pixels"] > 600).all()
  # Without the margin the anti-aliasing ramp (out to radius + 0.5) counts as background.
  assert (speckle.background_std(images, centres, radius, margin=0.0) > 0).all()


def test_background_std_recovers_added_noise():
  images, centres, radius, _ = _rendered(64, seed=1)
  sigma = 0.05
  noisy = images + sigma * np.random.default_rng(2).normal(size=images.shape)
  stats = speckle.background_stats(noisy, centres, radius)
  # The sample std of n Gaussian values has standard error ~ sigma / sqrt(2 (n - 1)):
  # ~0.0013 per image (n > 600), ~0.0002 for the mean over 64 images.
  se = sigma / np.sqrt(2 * (stats["num_pixels"] - 1))
  assert (np.abs(stats["std"] - sigma) < 5 * se).all()
  assert np.mean(stats["std"]) == pytest.approx(sigma, abs=0.001)


def test_clipped_fraction_by_hand():
  # 4 x 4, disk (radius 0.5, margin 0) at the centre of pixel (0, 0): the other 15 pixels are
  # background. 5 of them at -1, 3 at 1, 7 at 0.2: clipped fraction 8/15.
  image = np.full((1, 4, 4, 1), 0.2)
  image[0, 0, 1:4, 0] = -1.0
  image[0, 1, 0:2, 0] = -1.0
  image[0, 3, 1:4, 0] = 1.0
  stats = speckle.background_stats(image, [[0.5, 0.5]], 0.5, margin=0.0)
  assert stats["num_pixels"][0] == 15
  assert stats["clipped_fraction"][0] == pytest.approx(8 / 15)
  values = np.array([-1.0] * 5 + [1.0] * 3 + [0.2] * 7)
  assert stats["mean"][0] == pytest.approx(values.mean())
  assert stats["std"][0] == pytest.approx(values.std(ddof=1))


def test_estimated_disks_match_the_factors():
  images, centres, radius, _ = _rendered(64, seed=3)
  est = speckle.estimate_disks(images)
  # The coverage-weighted centroid is the disk's centre of mass; only uint8 rounding and pixel
  # sampling move it (tests/test_data.py measures < 0.03 px for the same moments).
  # Measured: < 0.03 px for centres and radii on 256 disks of each kind below; 0.05 px is
  # tolerated, far below the 0.5 px of a half-pixel convention error.
  np.testing.assert_allclose(est["centres"], centres, atol=0.05)
  np.testing.assert_allclose(est["radius"], radius, atol=0.05)
  # Fixed-radius set, smaller images (the quick start's 16 px).
  images, centres, radius, _ = _rendered(64, seed=4, factor_set="xy_bg", size=16)
  est = speckle.estimate_disks(images)
  np.testing.assert_allclose(est["centres"], centres, atol=0.05)
  np.testing.assert_allclose(est["radius"], radius, atol=0.05)


def test_sample_background_std_without_factors():
  images, centres, radius, _ = _rendered(64, seed=5)
  clean = speckle.sample_background_std(images)
  np.testing.assert_allclose(clean["std"], 0.0, atol=1e-12)
  sigma = 0.03
  noisy = images + sigma * np.random.default_rng(6).normal(size=images.shape)
  est = speckle.sample_background_std(noisy)
  # Noise of std 0.03 (contrast >= 0.5) moves the estimated centres by <= 0.1 px (measured on 256
  # disks); the 2 px margin absorbs that.
  np.testing.assert_allclose(est["centres"], centres, atol=0.2)
  assert np.mean(est["std"]) == pytest.approx(sigma, abs=0.001)
  # With the known radius of the fixed-radius set.
  images, _, _, _ = _rendered(16, seed=7, factor_set="xy_bg")
  known = speckle.sample_background_std(images, radius=32 / 6)
  np.testing.assert_allclose(known["radius"], 32 / 6)
  np.testing.assert_allclose(known["std"], 0.0, atol=1e-12)


def test_speckle_errors():
  with pytest.raises(ValueError, match="centres"):
    speckle.background_std(np.zeros((2, 8, 8, 1)), np.zeros((3, 2)), 1.0)
  with pytest.raises(ValueError, match="radius"):
    speckle.background_std(np.zeros((2, 8, 8, 1)), np.zeros((2, 2)), [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="NaN"):
    speckle.background_std(np.full((1, 8, 8, 1), np.nan), np.zeros((1, 2)), 1.0)
