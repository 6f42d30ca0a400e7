"""Tests of sami_jax.evaluation: every metric on inputs whose answer is known independently.

Disentanglement metrics get three latent codes of the same factors: "perfect" (a permutation and
rescaling of the factors plus tiny noise), "noise" (independent of the factors) and "mixed" (one
latent carries the sum of two factors), and must rank them perfect > mixed > noise, with perfect
near the top of the range and noise near the bottom. Where a value can be computed by hand
(curvature of a regular polygon, SAP of a sum of two uniforms, Frechet distance of diagonal
Gaussians) it is.
"""

import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import mutual_info_score, roc_auc_score

from sami_jax.evaluation import attributes
from sami_jax.evaluation import disentanglement as dis
from sami_jax.evaluation import fid
from sami_jax.evaluation import inception
from sami_jax.evaluation import probes
from sami_jax.evaluation import straightness

N = 800  # samples per code; small keeps the tree-based metrics fast.


def _factors(seed=0, n=N, k=3):
  return np.random.default_rng(seed).uniform(-1, 1, size=(n, k))


def _codes(f, seed=1):
  """The three latent codes of factors f [N, 3] (d = 4 each)."""
  rng = np.random.default_rng(seed)
  n = len(f)
  perfect = np.stack([3 * f[:, 2], -0.5 * f[:, 0], 2 * f[:, 1], np.zeros(n)], axis=1)
  perfect += 1e-3 * rng.normal(size=perfect.shape)
  noise = rng.normal(size=(n, 4))
  mixed = np.concatenate([np.stack([f[:, 0] + f[:, 1], f[:, 2]], axis=1),
                          rng.normal(size=(n, 2))], axis=1)
  return {"perfect": perfect, "noise": noise, "mixed": mixed}


@pytest.fixture(scope="module")
def data():
  f = _factors()
  return f, _codes(f)


def _split(x, n_train=600):
  return x[:n_train], x[n_train:]


# ------------------------------------------------------------------------------------- probes


def test_factor_r2_linear_and_noise(data):
  f, codes = data
  ftr, fte = _split(f)
  ztr, zte = _split(codes["perfect"])
  r = probes.factor_r2(ztr, ftr, zte, fte)
  assert r["linear"].shape == r["knn"].shape == (3,)
  assert np.all(r["linear"] > 0.999)
  assert np.all(r["knn"] > 0.9)
  ztr, zte = _split(codes["noise"])
  r = probes.factor_r2(ztr, ftr, zte, fte)
  assert np.all(r["linear"] < 0.05) and np.all(r["knn"] < 0.05)


def test_factor_r2_linear_matches_least_squares(data):
  """The linear probe's R^2 equals an ordinary least-squares fit done with numpy."""
  f, codes = data
  z = codes["mixed"]
  ztr, zte = _split(z)
  ftr, fte = _split(f)
  r = probes.factor_r2(ztr, ftr, zte, fte)
  a = np.concatenate([ztr, np.ones((len(ztr), 1))], axis=1)
  coef = np.linalg.lstsq(a, ftr, rcond=None)[0]
  pred = np.concatenate([zte, np.ones((len(zte), 1))], axis=1) @ coef
  expected = 1 - ((fte - pred) ** 2).sum(0) / ((fte - fte.mean(0)) ** 2).sum(0)
  np.testing.assert_allclose(r["linear"], expected, atol=1e-8)
  # f0 and f1 are only known through their sum: R^2 = corr(f0, f0 + f1)^2 = 1/2.
  np.testing.assert_allclose(r["linear"][:2], 0.5, atol=0.1)


def test_factor_r2_quadratic_needs_knn():
  z = np.random.default_rng(3).uniform(-1, 1, size=(1000, 1))
  f = z ** 2  # Uncorrelated with z (symmetric), but a smooth function of it.
  r = probes.factor_r2(z[:800], f[:800], z[800:], f[800:])
  assert r["linear"][0] < 0.05
  assert r["knn"][0] > 0.95


def test_factor_r2_errors():
  z, f = np.zeros((10, 2)), np.zeros((10, 1))
  with pytest.raises(ValueError, match="same number of samples"):
    probes.factor_r2(z, f[:5], z, f)
  with pytest.raises(ValueError, match="knn_neighbors"):
    probes.factor_r2(z, f, z, f, knn_neighbors=11)
  with pytest.raises(ValueError, match="NaN"):
    probes.factor_r2(z * np.nan, f, z, f)


# ------------------------------------------------------------------------------------- MIG / SAP


def test_mig_ranks_codes(data):
  f, codes = data
  s = {k: dis.mig(z, f)["mig"] for k, z in codes.items()}
  assert s["perfect"] > 0.85
  assert s["noise"] < 0.05
  assert s["noise"] + 0.15 < s["mixed"] < s["perfect"] - 0.15


def test_mig_discrete_identity():
  """A latent equal to a discrete factor: I(z; f) = H(f), every other latent independent."""
  rng = np.random.default_rng(0)
  f = rng.integers(0, 4, size=(4000, 1)).astype(float)
  z = np.concatenate([f + 0.01 * rng.normal(size=f.shape), rng.normal(size=f.shape)], axis=1)
  r = dis.mig(z, f, num_bins=4)
  np.testing.assert_allclose(r["factor_entropy"], np.log(4), atol=0.01)
  np.testing.assert_allclose(r["mutual_info"][0, 0], mutual_info_score(f[:, 0], f[:, 0]), atol=1e-9)
  # (H(f) - I(noise; f)) / H(f), and the plug-in I(noise; f) is tiny with 4000 samples, 4 bins.
  assert r["mig"] == pytest.approx(1.0, abs=0.01)


def test_sap_by_hand(data):
  f, codes = data
  assert dis.sap(codes["perfect"], f)["sap"] > 0.99
  assert dis.sap(codes["noise"], f)["sap"] < 0.03
  # Mixed: corr(f0 + f1, f0)^2 = 1/2 for iid factors, so the gaps are 1/2, 1/2 and 1.
  np.testing.assert_allclose(dis.sap(codes["mixed"], f)["sap"], 2 / 3, atol=0.05)


def test_sap_discrete():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2, size=(1000, 2)).astype(float)
  z = np.concatenate([a + 0.05 * rng.normal(size=a.shape), rng.normal(size=(1000, 1))], axis=1)
  r = dis.sap(z[:700], a[:700], z[700:], a[700:], continuous_factors=False)
  # Best latent: accuracy 1; second best: chance (1/2) with balanced classes.
  np.testing.assert_allclose(r["sap"], 0.5, atol=0.08)
  with pytest.raises(ValueError, match="z_test"):
    dis.sap(z, a, continuous_factors=False)


# ------------------------------------------------------------------------------------- DCI


def test_dci_from_importance_by_hand():
  assert dis.dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0))
  assert dis.dci_from_importance(np.ones((3, 3))) == pytest.approx((0.0, 0.0), abs=1e-12)
  # One code used equally for both factors: that code is fully entangled (D = 0), but each factor
  # lives in a single code (C = 1).
  assert dis.dci_from_importance([[1.0, 1.0], [0.0, 0.0]]) == pytest.approx((0.0, 1.0))
  # Code 0 -> factor 0 only (D_0 = 1), code 1 split evenly (D_1 = 0), equal code weights.
  d, _ = dis.dci_from_importance([[1.0, 0.0], [0.5, 0.5]])
  assert d == pytest.approx(0.5)
  assert dis.dci_from_importance(np.zeros((2, 2))) == (0.0, 0.0)


@pytest.mark.parametrize("mode", ["classification", "regression"])
def test_dci_ranks_codes(data, mode):
  f, codes = data
  ftr, fte = _split(f)
  # Classification with the default 100 stages fits 20 classes x 100 trees per factor; 10 stages
  # keep this ranking test fast (the defaults are checked in test_dci_default_is_the_library's).
  kw = {"num_trees": 10} if mode == "classification" else {}
  r = {k: dis.dci(z[:600], ftr, z[600:], fte, mode=mode, **kw) for k, z in codes.items()}
  assert r["perfect"]["disentanglement"] > 0.9 and r["perfect"]["completeness"] > 0.9
  assert r["noise"]["disentanglement"] < 0.25
  assert (r["noise"]["disentanglement"] + 0.15 < r["mixed"]["disentanglement"]
          < r["perfect"]["disentanglement"] - 0.15)
  # Informativeness: accuracy over 20 bins (chance 1/20) or R^2 (chance 0).
  assert r["perfect"]["informativeness"] > 0.8
  assert r["noise"]["informativeness"] < 0.15
  assert r["perfect"]["importance"].shape == (4, 3)


def _library_dci_scores(importance):
  """disentanglement_lib's D and C (dci.py), re-derived from the paper's formulas with scipy:
  1 - entropy of each row / column (scipy normalises it; the library adds 1e-11 first), weighted
  by the row / column share of the total importance."""
  r = np.asarray(importance, np.float64)
  per_code = 1.0 - scipy_entropy(r.T + 1e-11, base=r.shape[1])
  per_factor = 1.0 - scipy_entropy(r + 1e-11, base=r.shape[0])
  return (float(np.sum(per_code * r.sum(1) / r.sum())),
          float(np.sum(per_factor * r.sum(0) / r.sum())))


def test_dci_from_importance_rotated_latents():
  # Latents z = Q f for a rotation Q: each latent's share of each factor is Q_ik^2 (the fraction
  # of z_i's variance from f_k for iid unit-variance factors), so R = Q * Q.
  # 45 degrees: every latent is half of each factor -> D = C = 0.
  q = np.array([[1.0, -1.0], [1.0, 1.0]]) / np.sqrt(2)
  assert dis.dci_from_importance(q * q) == pytest.approx((0.0, 0.0), abs=1e-12)
  # Shares 0.9 / 0.1: D = C = 1 - H_2(0.9) = 1 + 0.9 log2 0.9 + 0.1 log2 0.1 = 0.5310044064.
  d, c = dis.dci_from_importance([[0.9, 0.1], [0.1, 0.9]])
  assert d == pytest.approx(0.5310044064, abs=1e-9)
  assert c == pytest.approx(0.5310044064, abs=1e-9)
  # A generic 3-D rotation (Euler angles 0.3, 0.7, 1.1) and an unequal, non-square matrix:
  # the library's formulas written above (agreement to its 1e-11 offset).
  def rot(axis, a):
    m = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    return m
  q3 = rot(0, 0.3) @ rot(1, 0.7) @ rot(2, 1.1)
  np.testing.assert_allclose(q3 @ q3.T, np.eye(3), atol=1e-12)
  for r in (q3 * q3, np.array([[0.5, 0.1, 0.0], [0.2, 0.6, 0.3], [0.3, 0.3, 0.7],
                               [0.0, 0.0, 0.0]])):
    np.testing.assert_allclose(dis.dci_from_importance(r), _library_dci_scores(r), atol=1e-8)


def test_dci_default_is_the_librarys():
  """dci's defaults reproduce disentanglement_lib's pipeline: a GradientBoostingClassifier with
  sklearn's default settings per (discrete) factor, fitted on the raw latents; R[:, k] =
  |feature_importances_|; informativeness = mean test accuracy. The reference below is written
  from that description (random_state pinned on both sides: it only breaks ties)."""
  rng = np.random.default_rng(0)
  n = 500
  f = rng.integers(0, 4, size=(n, 2)).astype(float)  # discrete: kept as classes, no binning
  a = 0.6  # radians: each latent mixes both factors
  rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  z = np.concatenate([f @ rot.T + 0.05 * rng.normal(size=(n, 2)), rng.normal(size=(n, 1))], 1)
  ztr, zte, ftr, fte = z[:400], z[400:], f[:400], f[400:]
  got = dis.dci(ztr, ftr, zte, fte, seed=3)

  importance = np.zeros((3, 2))
  acc_test, acc_train = [], []
  for k in range(2):
    model = GradientBoostingClassifier(random_state=3).fit(ztr, ftr[:, k])
    importance[:, k] = np.abs(model.feature_importances_)
    acc_test.append(np.mean(model.predict(zte) == fte[:, k]))
    acc_train.append(np.mean(model.predict(ztr) == ftr[:, k]))
  d_ref, c_ref = _library_dci_scores(importance)
  np.testing.assert_allclose(got["importance"], importance, atol=1e-12)
  assert got["disentanglement"] == pytest.approx(d_ref, abs=1e-8)
  assert got["completeness"] == pytest.approx(c_ref, abs=1e-8)
  assert got["informativeness"] == pytest.approx(np.mean(acc_test), abs=1e-12)
  assert got["informativeness_train"] == pytest.approx(np.mean(acc_train), abs=1e-12)
  s = got["settings"]
  assert (s["mode"], s["estimator"], s["num_trees"], s["max_depth"], s["learning_rate"]) == (
      "classification", "GradientBoostingClassifier", 100, 3, 0.1)
  assert s["disentanglement_lib_settings"] and s["informativeness_measure"] == "test accuracy"
  assert "disentanglement_lib's settings" in s["description"]
  short = dis.dci(ztr, ftr, zte, fte, num_trees=10, seed=3)["settings"]
  assert not short["disentanglement_lib_settings"] and "NOT" in short["description"]


def test_dci_regression_mode_says_what_it_is_and_handles_an_angle():
  rng = np.random.default_rng(1)
  n = 600
  theta = rng.uniform(-np.pi, np.pi, n)
  b = rng.uniform(0, 1, n)
  f = np.stack([theta, b], 1)
  z = np.stack([np.cos(theta), np.sin(theta), b, rng.normal(size=n)], 1)
  r = dis.dci(z[:450], f[:450], z[450:], f[450:], mode="regression", circular=[True, False])
  s = r["settings"]
  assert s["estimator"] == "GradientBoostingRegressor" and s["num_bins"] is None
  assert s["informativeness_measure"] == "test R^2" and not s["disentanglement_lib_settings"]
  assert s["circular"] == [True, False]
  # theta is read from latents 0 and 1 (fitted as cos and sin), b from latent 2 alone; each
  # importance column sums to 1 (the angle's is the mean of two columns that do).
  np.testing.assert_allclose(r["importance"].sum(0), 1.0, atol=1e-9)
  assert r["importance"][:2, 0].sum() > 0.95 and r["importance"][2, 1] > 0.95
  assert r["informativeness_per_factor"][0] > 0.95 and r["informativeness_per_factor"][1] > 0.95


def test_discretize_circular_by_hand():
  # 4 bins over [-pi, pi): edges -pi/2, 0, pi/2; values wrapped to [-pi, pi) first.
  np.testing.assert_allclose(dis.circular_bin_edges(4), [-np.pi / 2, 0.0, np.pi / 2])
  theta = np.array([-np.pi, np.pi, -np.pi / 2 - 1e-9, -np.pi / 2, 0.0, 3.0, np.pi - 1e-9,
                    2 * np.pi + 0.1, -3.2])
  expected = [0, 0, 0, 1, 2, 3, 3, 2, 3]  # pi == -pi; 2 pi + 0.1 -> 0.1; -3.2 -> 3.083
  (labels,) = dis.discretize_factors(theta[:, None], num_bins=4, circular=[True])
  np.testing.assert_array_equal(labels[:, 0], expected)
  # The bins do not follow the observed range: angles in [0, 0.5] all fall in bin 2, while a
  # non-circular column over the same values is cut into 4 bins of its own range.
  small = np.linspace(0, 0.5, 50)[:, None]
  (lab_c,) = dis.discretize_factors(small, num_bins=4, circular=[True])
  (lab_r,) = dis.discretize_factors(small, num_bins=4)
  assert set(lab_c[:, 0]) == {2} and set(lab_r[:, 0]) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="one bool per factor"):
    dis.discretize_factors(small, circular=[True, False])


def test_mig_circular_uses_the_circle_bins():
  """MIG with circular=[True] equals MIG of the hand-computed circle-bin labels (passed as a
  discrete factor: <= num_bins distinct values are kept as classes)."""
  rng = np.random.default_rng(2)
  n = 3000
  delta = rng.uniform(-0.5, 0.5, n)
  theta = np.mod(np.pi + delta + np.pi, 2 * np.pi) - np.pi  # near the -pi / pi cut
  z = np.stack([delta, rng.normal(size=n)], 1)
  labels = np.floor((theta + np.pi) / (2 * np.pi / 20)).astype(int)
  got = dis.mig(z, theta[:, None], circular=[True])
  ref = dis.mig(z, labels[:, None].astype(float))
  np.testing.assert_allclose(got["mutual_info"], ref["mutual_info"], atol=1e-12)
  assert got["mig"] == pytest.approx(ref["mig"], abs=1e-12)
  # delta determines the bin: MIG near 1 (the plug-in noise-latent MI is small with 3000 samples).
  assert got["mig"] > 0.85


def test_dci_bad_mode(data):
  f, codes = data
  with pytest.raises(ValueError, match="mode"):
    dis.dci(codes["perfect"], f, codes["perfect"], f, mode="svm")


# ------------------------------------------------------------------------------------- FactorVAE


def test_factorvae_from_dataset_ranks_codes(data):
  f, codes = data
  s = {k: dis.factorvae_score_from_dataset(z, f, num_train=300, num_eval=300)
       for k, z in codes.items()}
  assert s["perfect"]["factorvae"] > 0.95
  # The tiny-noise 4th latent of "perfect" (std 1e-3) is pruned.
  assert s["perfect"]["num_active_dims"] == 3
  # Independent latents: about chance, 1/K.
  assert s["noise"]["factorvae"] < 1 / 3 + 0.1
  # Mixed: fixing f0 or f1 both shrink latent 0, which can be assigned to only one of them: 2/3.
  np.testing.assert_allclose(s["mixed"]["factorvae"], 2 / 3, atol=0.07)


def test_factorvae_with_simulator():
  """The callback form: a ground-truth simulator fixes a factor exactly."""
  mix = np.array([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])  # z = f @ mix.T: z0 = 2 f1, z1 = f0.

  def sampler(k, rng):
    f = rng.uniform(-1, 1, size=(32, 2))
    f[:, k] = rng.uniform(-1, 1)
    return f @ mix.T + 1e-3 * rng.normal(size=(32, 3))

  global_z = _factors(k=2) @ mix.T
  r = dis.factorvae_score(sampler, 2, global_z, num_train=100, num_eval=100)
  assert r["factorvae"] == 1.0
  # Votes land on the latent that carries each factor: f0 -> z1, f1 -> z0.
  assert r["votes"][1, 0] == r["votes"][:, 0].sum() and r["votes"][0, 1] == r["votes"][:, 1].sum()
  with pytest.raises(ValueError, match="sample_fixed_factor_batch"):
    dis.factorvae_score(lambda k, rng: np.zeros((1, 3)), 2, global_z, num_train=1, num_eval=1)


# ------------------------------------------------------------------------------------- summaries


def test_correlation_matrix_matches_corrcoef(data):
  f, codes = data
  z = codes["mixed"]
  expected = np.abs(np.corrcoef(z.T, f.T)[:4, 4:])
  np.testing.assert_allclose(dis.correlation_matrix(z, f), expected, atol=1e-10)
  # A constant latent has no correlation (not NaN).
  assert np.all(dis.correlation_matrix(np.zeros((N, 1)), f) == 0)


def test_rank_latents_by_kl_by_hand():
  n = 5
  mean = np.tile([0.0, 2.0, 0.0], (n, 1))
  std = np.tile([1.0, 1.0, 0.5], (n, 1))
  order, kl = dis.rank_latents_by_kl(mean, std)
  # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - ln s^2) / 2.
  np.testing.assert_allclose(kl, [0.0, 2.0, 0.5 * (0.25 - 1 + 2 * np.log(2))], atol=1e-12)
  np.testing.assert_array_equal(order, [1, 2, 0])
  with pytest.raises(ValueError, match="positive"):
    dis.rank_latents_by_kl(mean, 0 * std)


# ------------------------------------------------------------------------------------- curvature


def test_curvature_straight_line():
  t = np.linspace(0, 1, 7)[:, None]
  traj = t * np.array([[1.0, -2.0, 3.0]]) + 5  # uneven speed would not matter either
  c = straightness.curvature(traj)
  np.testing.assert_allclose(c["angles"], 0, atol=1e-5)
  np.testing.assert_allclose(c["mean_cosine"], 1, atol=1e-12)


@pytest.mark.parametrize("n", [3, 4, 6, 12])
def test_curvature_regular_polygon(n):
  """Points equally spaced on a circle turn by the exterior angle 360/n at each vertex."""
  theta = 2 * np.pi * np.arange(n + 3) / n
  traj = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
  c = straightness.curvature(traj)
  np.testing.assert_allclose(c["angles"], 360 / n, atol=1e-8)
  np.testing.assert_allclose(c["mean_cosine"], np.cos(2 * np.pi / n), atol=1e-12)


def test_curvature_zigzag_and_batch_axes():
  # Displacements alternate (1, 1) and (1, -1): 90 degrees at every interior point.
  zig = np.array([[0, 0], [1, 1], [2, 0], [3, 1], [4, 0]], float)
  # (1, 0) then (1, sqrt(3)): 60 degrees, then (1, 0) again: 60.
  tri = np.array([[0, 0], [1, 0], [2, np.sqrt(3)], [3, np.sqrt(3)], [4, np.sqrt(3)]], float)
  back = np.array([[0, 0], [1, 0], [0, 0], [1, 0], [0, 0]], float)  # reversals: 180
  traj = np.stack([zig, tri, back])[None]  # [1, 3, T=5, D=2]
  c = straightness.curvature(traj)
  assert c["angles"].shape == (1, 3, 3) and c["mean_curvature"].shape == (1, 3)
  np.testing.assert_allclose(c["angles"][0, 0], 90, atol=1e-6)
  np.testing.assert_allclose(c["angles"][0, 1], [60, 60, 0], atol=1e-6)
  np.testing.assert_allclose(c["mean_curvature"][0], [90, 40, 180], atol=1e-6)


def test_curvature_repeated_frame_is_skipped():
  traj = np.array([[0, 0], [1, 0], [1, 0], [2, 0], [2, 1]], float)
  c = straightness.curvature(traj)
  assert np.isnan(c["angles"][0]) and np.isnan(c["angles"][1])
  np.testing.assert_allclose(c["mean_curvature"], 90)  # only the last turn counts
  with pytest.raises(ValueError, match="T >= 3"):
    straightness.curvature(np.zeros((2, 4)))


def test_trajectory_report():
  n_frames = 8
  theta = 2 * np.pi * np.arange(n_frames) / 8
  circle = np.stack([np.cos(theta), np.sin(theta)], -1)  # 45 degrees per step
  pixels = np.zeros((2, n_frames, 4, 4, 1))
  pixels[:, :, 0, 0, 0] = circle[:, 0]
  pixels[:, :, 1, 2, 0] = circle[:, 1]
  latents = np.tile(np.linspace(0, 1, n_frames)[None, :, None], (2, 1, 3))  # straight
  r = straightness.trajectory_report(latents, pixels)
  assert r["latent_curvature"] == pytest.approx(0, abs=1e-5)
  assert r["pixel_curvature"] == pytest.approx(45)
  assert r["curvature_reduction"] == pytest.approx(45, abs=1e-5)
  assert r["pixel_cosine"] == pytest.approx(np.cos(np.pi / 4))
  assert r["num_sequences"] == 2 and r["num_frames"] == n_frames
  with pytest.raises(ValueError, match="same first two"):
    straightness.trajectory_report(latents, pixels[:1])


# ------------------------------------------------------------------------------------- attributes


def _attr_data(seed=0, n=1000):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 2, size=(n, 3))
  a[:, 2] = rng.uniform(size=n) < 0.3  # a2: encoded by no latent
  z = np.stack([a[:, 0] + 0.1 * rng.normal(size=n),  # latent 0 = attribute 0
                -a[:, 1] + 0.1 * rng.normal(size=n),  # latent 1 = -attribute 1 (sign is arbitrary)
                rng.normal(size=n),
                np.round(rng.normal(size=n))], axis=1)  # ties
  return z, a


def test_single_latent_auroc_matches_sklearn():
  z, a = _attr_data()
  got = attributes.single_latent_auroc(z, 2 * a - 1)  # {-1, 1} coding, as in raw CelebA
  raw = np.array([[roc_auc_score(a[:, k], z[:, i]) for i in range(4)] for k in range(3)])
  np.testing.assert_allclose(got, np.maximum(raw, 1 - raw), atol=1e-12)
  assert got[0, 0] > 0.999 and got[1, 1] > 0.999


def test_attribute_mutual_info_matches_sklearn():
  _, a = _attr_data()
  a = np.concatenate([a, a[:, :1]], axis=1)
  mi = attributes.attribute_mutual_info(a)
  expected = np.array([[mutual_info_score(a[:, i], a[:, j]) for j in range(4)] for i in range(4)])
  np.testing.assert_allclose(mi, expected, atol=1e-12)


def test_tad_counts_captured_attributes():
  z, a = _attr_data()
  r = attributes.tad(z, a)
  np.testing.assert_array_equal(r["captured"], [True, True, False])
  assert r["attrs"] == 2
  np.testing.assert_array_equal(r["best_latent"][:2], [0, 1])
  # TAD = sum over captured attributes of (best - second best single-latent AUROC), via sklearn.
  expected = 0.0
  for k in range(2):
    aucs = sorted(max(roc_auc_score(a[:, k], z[:, i]), 1 - roc_auc_score(a[:, k], z[:, i]))
                  for i in range(4))
    expected += aucs[-1] - aucs[-2]
  assert r["tad"] == pytest.approx(expected, abs=1e-12)
  assert r["tad"] == pytest.approx(1.0, abs=0.1)  # two gaps of about 1 - 1/2


def test_tad_excludes_redundant_attributes():
  z, a = _attr_data()
  a = np.concatenate([a, a[:, :1]], axis=1)  # attribute 3 duplicates attribute 0
  r = attributes.tad(z, a)
  # Each copy explains all of the other's entropy (reduction 1 > 0.2): both are dropped.
  np.testing.assert_allclose(r["entropy_reduction"][[0, 3]], 1.0, atol=1e-12)
  np.testing.assert_array_equal(r["captured"], [False, True, False, False])
  assert r["attrs"] == 1


def test_linear_probe_auroc():
  z, a = _attr_data()
  r = attributes.linear_probe_auroc(z[:700], a[:700], z[700:], a[700:])
  assert r["per_attribute"][0] > 0.99 and r["per_attribute"][1] > 0.99
  assert abs(r["per_attribute"][2] - 0.5) < 0.1
  assert r["mean_auroc"] == pytest.approx(np.mean(r["per_attribute"]))
  report = attributes.attribute_report(z[:700], a[:700], z[700:], a[700:])
  assert report["attrs"] == 2
  with pytest.raises(ValueError, match="binary"):
    attributes.tad(z, a * 3)


# ------------------------------------------------------------------------------------- FID


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rotated_same_covariance():
  """Same full covariance, different means: only ||mu1 - mu2||^2 remains."""
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 6))
  sigma = a @ a.T
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  got = fid.frechet_distance(mu1, sigma, mu2, sigma)
  assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-6)


def test_fid_of_identical_and_singular_sets():
  x = np.random.default_rng(2).normal(size=(20, 64))  # N < D: singular covariance
  assert abs(fid.fid_from_features(x, x)) < 1e-3
  mu, sigma = fid.stats(x)
  xc = x - x.mean(0)
  np.testing.assert_allclose(sigma, xc.T @ xc / (len(x) - 1), atol=1e-12)
  np.testing.assert_allclose(mu, x.sum(0) / len(x), atol=1e-12)


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match="Shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  # A covariance with a negative eigenvalue has no real square root.
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_stats_cache_roundtrip(tmp_path):
  x = np.random.default_rng(3).normal(size=(50, 8))
  calls = []

  def compute():
    calls.append(1)
    return x

  path = str(tmp_path / "sub" / "ref_stats.npz")
  mu, sigma = fid.cached_stats(path, compute)
  mu2, sigma2 = fid.cached_stats(path, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  with pytest.raises(FileNotFoundError, match="save_stats"):
    fid.load_stats(str(tmp_path / "missing.npz"))


# ------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def random_inception():
  return inception.InceptionFeatures.random(seed=0)


def _torch_state_dict(params):
  """pytorch-fid-style state dict whose BN layers are the identity except for beta = bias."""
  state = {}

  def walk(node, prefix):
    if "kernel" in node:
      name = ".".join(prefix[:-1])  # drop the Flax "conv" submodule
      k = np.asarray(node["kernel"])
      out = k.shape[-1]
      state[f"{name}.conv.weight"] = k.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> torch layout
      state[f"{name}.bn.weight"] = np.ones(out, np.float32)
      state[f"{name}.bn.bias"] = np.asarray(node["bias"])
      state[f"{name}.bn.running_mean"] = np.zeros(out, np.float32)
      state[f"{name}.bn.running_var"] = np.full(out, 1 - inception.BN_EPS, np.float32)
      return
    for key, child in node.items():
      walk(child, prefix + (key,))

  walk(params, ())
  return state


def test_inception_architecture_sizes(random_inception):
  state = _torch_state_dict(random_inception.params)
  weights = {k: v for k, v in state.items() if k.endswith("conv.weight")}
  # Published sizes of Inception-v3 without the classifier (Keras InceptionV3(include_top=False):
  # 21,802,784 parameters, of which 34,432 are BN moving statistics = 2 x 17,216 channels).
  assert len(weights) == 94
  assert sum(v.size for v in weights.values()) == 21_802_784 - 34_432 - 17_216
  assert sum(v.size for k, v in state.items() if k.endswith("running_mean")) == 17_216
  # A few torchvision / pytorch-fid layer shapes, [out, in, kh, kw].
  assert weights["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert weights["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
  assert weights["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert weights["Mixed_7b.branch3x3dbl_1.conv.weight"].shape == (448, 1280, 1, 1)
  assert weights["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)


def test_inception_features_wiring(random_inception):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(3, 32, 32, 3)).astype(np.float32)
  f_ab = np.asarray(random_inception.features(x[[0, 1]]))
  f_ac = np.asarray(random_inception.features(x[[0, 2]]))
  assert f_ab.shape == (2, inception.FEATURE_DIM)
  assert np.all(np.isfinite(f_ab)) and np.all(f_ab >= 0)  # pool3 averages ReLU outputs
  assert np.std(f_ab) > 1e-3  # not collapsed
  np.testing.assert_allclose(f_ab[0], f_ac[0], rtol=1e-5, atol=1e-6)  # batch independence
  assert not np.allclose(f_ab[1], f_ac[1])  # different images, different features
  np.testing.assert_array_equal(np.asarray(random_inception.features(x[[0, 1]])), f_ab)
  # Grayscale is the image repeated to three channels.
  gray = x[[0, 1], :, :, :1]
  np.testing.assert_allclose(np.asarray(random_inception.features(gray)),
                             np.asarray(random_inception.features(np.repeat(gray, 3, -1))),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="C = 1 or 3"):
    random_inception.features(x[..., :2])


def test_inception_load_from_npz(random_inception, tmp_path):
  """Weights saved in the PyTorch layout load back to the same network."""
  path = str(tmp_path / "inception_fid.npz")
  np.savez(path, **_torch_state_dict(random_inception.params), **{"fc.weight": np.zeros((2, 2))})
  loaded = inception.InceptionFeatures.load(path)
  x = np.random.default_rng(1).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(loaded.features(x)),
                             np.asarray(random_inception.features(x)), rtol=1e-4, atol=1e-5)
  state = dict(np.load(path))
  del state["Mixed_6c.branch1x1.bn.running_var"]
  np.savez(path, **state)
  with pytest.raises(ValueError, match="Mixed_6c.branch1x1.bn.running_var"):
    inception.InceptionFeatures.load(path)


def test_inception_missing_weights_explains(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inception.InceptionFeatures.load(str(tmp_path / "nope.npz"))
  msg = str(e.value)
  assert inception.WEIGHTS_URL in msg and "--convert" in msg
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"x")
  with pytest.raises(ValueError, match="--convert"):
    inception.InceptionFeatures.load(str(pth))


def test_fold_batch_norm_matches_conv_then_bn():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 5, 2))
  w = rng.normal(size=(3, 2, 3, 3))  # torch [out, in, kh, kw]
  gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
  mean, var = rng.normal(size=3), rng.uniform(0.5, 2, 3)
  kernel, bias = inception.fold_batch_norm(w, gamma, beta, mean, var)
  # Direct 'VALID' cross-correlation in numpy, then batch norm.
  conv = np.zeros((3, 3, 3))
  for i in range(3):
    for j in range(3):
      conv[i, j] = np.einsum("hwc,ochw->o", x[0, i:i + 3, j:j + 3], w)
  expected = gamma * (conv - mean) / np.sqrt(var + 1e-3) + beta
  got = np.einsum("ijhwc,hwco->ijo", np.lib.stride_tricks.sliding_window_view(
      x[0], (3, 3), axis=(0, 1)).transpose(0, 1, 3, 4, 2), kernel) + bias
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_avg_pool_excludes_padding():
  """FID blocks average only real pixels at the borders (count_include_pad=False)."""
  x = jnp.full((1, 4, 4, 2), 3.0)
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(x)), 3.0)


def test_preprocess_matches_torch_bilinear():
  """torch interpolate(bilinear, align_corners=False): source x = (i + 0.5) * in / out - 0.5,
  clamped at the borders."""
  img = np.zeros((1, 2, 2, 3), np.float32)
  img[0, :, 1] = 1.0  # left column 0, right column 1
  out = np.asarray(inception.preprocess(jnp.asarray(img)))
  assert out.shape == (1, 299, 299, 3)
  for i in (0, 100, 149, 298):
    src = (i + 0.5) * 2 / 299 - 0.5
    np.testing.assert_allclose(out[0, 7, i, 0], np.clip(src, 0, 1), atol=1e-5)


def test_preprocess_downsampling_has_no_antialiasing():
  """Halving the size without antialiasing (torch's default) averages each 2x2 block."""
  img = np.random.default_rng(0).uniform(-1, 1, size=(1, 598, 598, 3)).astype(np.float32)
  out = np.asarray(inception.preprocess(jnp.asarray(img)))
  blocks = img[0].reshape(299, 2, 299, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(out[0], blocks, atol=1e-5)


def test_convert_with_a_stand_in_torch(random_inception, tmp_path, monkeypatch):
  """The converter's logic (torch.load -> numpy -> validated .npz), with torch faked."""

  class FakeTensor:

    def __init__(self, a):
      self.a = a

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.a

  state = _torch_state_dict(random_inception.params)
  fake_torch = types.ModuleType("torch")
  fake_torch.load = lambda path, map_location=None: {
      **{k: FakeTensor(v) for k, v in state.items()},
      "Mixed_5b.branch1x1.bn.num_batches_tracked": FakeTensor(np.array(7))}
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  src = tmp_path / "pt_inception.pth"
  src.write_bytes(b"stand-in")
  out = str(tmp_path / "out.npz")
  inception.main(["--convert", str(src), out])
  with np.load(out) as data:
    assert set(data.files) == set(state)
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var"):
      np.testing.assert_array_equal(data[k], state[k])
  del state["Mixed_7a.branch3x3_2.conv.weight"]  # an incomplete file is refused, nothing written
  with pytest.raises(ValueError, match="Mixed_7a.branch3x3_2.conv.weight"):
    inception.convert(str(src), str(tmp_path / "bad.npz"))
  assert not os.path.exists(tmp_path / "bad.npz")


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is not None,
                    reason="torch is installed; the converter would run")
def test_convert_without_torch_says_so(tmp_path):
  with pytest.raises(SystemExit, match="PyTorch"):
    inception.main(["--convert", str(tmp_path / "a.pth"), str(tmp_path / "b.npz")])
