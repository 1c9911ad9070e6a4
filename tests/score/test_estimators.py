"""Empirical (Gaussian-KDE) score: closed form vs autodiff, truncation, errors.

Brief kernel_score_diffusion.md §8 tests 1, 3, 4 and the bad-input checks.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.score import estimators


def _log_p_dense(x_D, X_ND, t):
  """log p̂_t(x) of P_n * N(0, t I) written independently (logsumexp)."""
  n, d = X_ND.shape
  sq = jnp.sum((x_D[None] - X_ND) ** 2, -1)
  return (jax.nn.logsumexp(-sq / (2 * t)) - jnp.log(n)
          - 0.5 * d * jnp.log(2 * jnp.pi * t))


@pytest.mark.parametrize("t", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("d", [1, 3])
def test_score_equals_grad_of_log_density(t, d):
  """Closed form (mean - x)/t == jax.grad log p̂_t in float64 (1e-10 rel.).
  Catches a wrong sign, a missing 1/t or a wrong softmax temperature."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(300, d)))
    x = jnp.asarray(rng.normal(size=(17, d)) * 1.5)
    out = estimators.empirical_score(x, X, jnp.float64(t), truncate=False,
                                     block_k=64)
    want = jax.vmap(jax.grad(_log_p_dense), (0, None, None))(x, X, t)
    scale = float(jnp.max(jnp.abs(want))) + 1.0
    np.testing.assert_allclose(out.score_MD, want, atol=1e-10 * scale)
    lp = jax.vmap(_log_p_dense, (0, None, None))(x, X, t)
    np.testing.assert_allclose(out.log_p_M, lp, rtol=1e-12, atol=1e-12)


def test_single_point_score_and_truncation_region():
  """n = 1: score (X1 - x)/t exactly; keep iff |x - X1|^2 < -2t(log c_rho +
  d/2 log 2 pi): empty for c_rho = 1, |x - X1|^2 < 2.767 t for c_rho = 0.1,
  d = 1 (brief §8.3). Catches an n- or t-dependent threshold."""
  with jax.enable_x64(True):
    X = jnp.asarray([[0.7]])
    t = 0.3
    r = math.sqrt(-2 * t * (math.log(0.1) + 0.5 * math.log(2 * math.pi)))
    np.testing.assert_allclose(r**2 / t, 2.767, atol=1e-3)
    x = jnp.asarray([[0.7 + r * 0.999], [0.7 - r * 1.001], [0.7], [-3.0]])
    out = estimators.empirical_score(x, X, t, truncate=False)
    np.testing.assert_array_equal(out.score_MD, (X - x) / t)
    assert not estimators.empirical_score(x, X, t, c_rho=1.0).keep_M.any()
    keep = estimators.empirical_score(x, X, t, c_rho=0.1).keep_M
    np.testing.assert_array_equal(keep, [True, False, True, False])
    sc = estimators.empirical_score(x, X, t, c_rho=0.1).score_MD
    np.testing.assert_array_equal(sc[1], [0.0])  # Truncated: zero score.


def test_truncation_equals_density_threshold():
  """The lse rule equals p̂_t(x) > rho_n = c_rho/(n t^{d/2}) evaluated
  directly in float64 (brief §8.4); catches a dropped (2 pi)^{d/2} factor."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    for d, t, c_rho in [(1, 0.05, 1.0), (2, 0.2, 1.0), (2, 0.01, 0.1)]:
      X = rng.normal(size=(500, d))
      x = rng.normal(size=(2000, d)) * 2.5
      keep = np.asarray(estimators.empirical_score(
          jnp.asarray(x), jnp.asarray(X), t, c_rho=c_rho).keep_M)
      sq = ((x[:, None] - X[None]) ** 2).sum(-1)
      p = np.exp(-sq / (2 * t)).sum(1) / (500 * (2 * np.pi * t) ** (d / 2))
      rho = c_rho / (500 * t ** (d / 2))
      clear = np.abs(p / rho - 1) > 1e-9  # Skip exact ties.
      np.testing.assert_array_equal(keep[clear], (p > rho)[clear])
      assert 0 < keep.mean() < 1  # Both sides exercised.


def test_bad_inputs_name_the_problem():
  X = np.zeros((10, 2))
  x = np.zeros((3, 2))
  with pytest.raises(ValueError, match="t must be"):
    estimators.score(x, X, 0.0)
  with pytest.raises(ValueError, match="t must be"):
    estimators.score(x, X, -1.0)
  with pytest.raises(ValueError, match="t must be"):
    estimators.score(x, X, float("nan"))
  with pytest.raises(ValueError, match="empty data"):
    estimators.score(x, np.zeros((0, 2)), 0.1)
  bad = X.copy()
  bad[4, 1] = np.nan
  with pytest.raises(ValueError, match=r"NaN or inf in 1 rows \(first: \[4\]"):
    estimators.score(x, bad, 0.1)
  with pytest.raises(ValueError, match="dimension mismatch"):
    estimators.score(np.zeros((3, 3)), X, 0.1)
  with pytest.raises(ValueError, match="X\\[:, None\\]"):
    estimators.score(x, np.zeros(10), 0.1)
  with pytest.raises(ValueError, match="estimator"):
    estimators.ScoreConfig(estimator="kde")
  with pytest.raises(ValueError, match="c_rho"):
    estimators.ScoreConfig(c_rho=0.0)


def test_score_api_float32_matches_float64():
  """The float32 default path agrees with float64 within the documented
  bound at moderate t (|x| ~ 3, t = 0.1: ~1e-5 relative)."""
  rng = np.random.default_rng(2)
  X = rng.normal(size=(5000, 2))
  x = rng.normal(size=(100, 2))
  s32 = np.asarray(estimators.score(x.astype(np.float32),
                                    X.astype(np.float32), 0.1,
                                    estimators.ScoreConfig(truncate=False)))
  with jax.enable_x64(True):
    s64 = np.asarray(estimators.score(x, X, 0.1,
                                      estimators.ScoreConfig(truncate=False)))
  assert s64.dtype == np.float64 and s32.dtype == np.float32
  np.testing.assert_allclose(s32, s64, atol=2e-4 * np.abs(s64).max())


@pytest.mark.parametrize("distance,bound", [("auto", 2e-3), ("direct", 2e-4)])
def test_float32_error_bound_at_small_t(distance, bound):
  """The documented float32 bound at t = 1e-2 (standardised data, |x| <= 4):
  the default centred expanded form stays within 2e-3 of float64 relative to
  the score scale 1/sqrt(t), exact differences within 2e-4 (brief §2.7).
  Catches dropping the centring (data offset by 30 below: error 5e-3)."""
  rng = np.random.default_rng(3)
  X = rng.normal(size=(4000, 2)) + 30.0
  x = X[:200] + 0.05 * rng.normal(size=(200, 2))
  cfg = estimators.ScoreConfig(truncate=False, distance=distance)
  s32 = np.asarray(estimators.score(x.astype(np.float32),
                                    X.astype(np.float32), 0.01, cfg))
  with jax.enable_x64(True):
    s64 = np.asarray(estimators.score(x, X, 0.01, cfg))
  err = np.max(np.abs(s32 - s64)) * math.sqrt(0.01)
  assert err < bound, err
