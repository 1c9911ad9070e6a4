"""Tests for the Legendre-kernel plug-in score (jaxlib_models/score/legendre).

Oracles are independent of the module: the kernel is rebuilt here from
scipy's Legendre polynomials, r and r' are checked against adaptive
quadrature (scipy.integrate.quad), and p̂ / ∇p̂ against a dense unshifted
float64 formula differentiated by jax.grad. Each test names the planted bug
it was seen to catch.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from jaxlib_models.score import legendre


def _test_kernel(w, order):
  """K(w) = sum_j psi_j(0) psi_j(w), rebuilt from scipy (independent)."""
  w = np.asarray(w, np.float64)
  k = sum(
      (2 * j + 1) / 2 * special.eval_legendre(j, 0.0)
      * special.eval_legendre(j, w)
      for j in range(order + 1)
  )
  return np.where(np.abs(w) <= 1, k, 0.0)


def _dense_p(x_D, X_ND, t, h, order, n_quad=120):
  """p̂_t(x) = mean_i prod_k ∫ K(w) phi_t(u_ik - h w) dw, unshifted, jnp."""
  w_Q, g_Q = np.polynomial.legendre.leggauss(n_quad)
  a_Q = jnp.asarray(g_Q * _test_kernel(w_Q, order))
  w_Q = jnp.asarray(w_Q)
  u_ND = x_D[None, :] - jnp.asarray(X_ND)
  e_NDQ = jnp.exp(-jnp.square(u_ND[..., None] - h * w_Q[None, None]) / (2 * t))
  f_ND = jnp.sum(a_Q[None, None] * e_NDQ, -1) / jnp.sqrt(2 * jnp.pi * t)
  return jnp.mean(jnp.prod(f_ND, -1))


def _dense_p_M(x_MD, X_ND, t, h, order):
  return jax.vmap(lambda z: _dense_p(z, X_ND, t, h, order))(jnp.asarray(x_MD))


def _p_hat(res):
  return np.asarray(res.sign_M) * np.exp(np.asarray(res.log_abs_p_M))


@pytest.mark.parametrize("order", [0, 1, 2, 5, 10, 17])
def test_kernel_moments(order):
  """∫ w^j K = δ_j0 for j <= order, for K and for the estimator's weights.

  Planted bug caught: coefficients (2j+1)/2 without the P_j(0) factor.
  """
  with jax.enable_x64(True):
    w_Q, g_Q = np.polynomial.legendre.leggauss(order + 20)  # exact here
    k_Q = legendre.kernel_values(w_Q, order)
    np.testing.assert_allclose(k_Q, _test_kernel(w_Q, order), atol=1e-12)
    nodes_Q, a_Q = legendre.quadrature(order)
    for j in range(order + 1):
      want = 1.0 if j == 0 else 0.0
      assert abs(np.sum(g_Q * k_Q * w_Q**j) - want) < 1e-10, j
      assert abs(np.sum(a_Q * nodes_Q**j) - want) < 1e-10, j
    # The order is not higher than claimed: the next even moment is nonzero.
    j = order + 2 if order % 2 == 0 else order + 1
    assert abs(np.sum(g_Q * k_Q * w_Q**j)) > 1e-8
    assert np.all(legendre.kernel_values(np.array([-1.5, 1.01]), order) == 0)


@pytest.mark.parametrize(
    "u,h,t,order",
    [
        (0.3, 0.3, 0.1, 2),
        (-0.8, 0.5, 0.2, 4),
        (1.5, 0.2, 0.05, 6),
        (0.0, 0.7, 0.5, 3),
        (2.0, 0.4, 0.1, 0),
    ],
)
def test_smoothing_factor_vs_adaptive_quadrature(u, h, t, order):
  """r(u), r'(u) by the module's Gauss–Legendre sums vs scipy quad (1e-10).

  Planted bug caught: dropping the h w term in the derivative sum.
  """

  def f(w, power):
    return (
        _test_kernel(w, order)
        * (h * w / t) ** power
        * np.exp(u * h * w / t - h * h * w * w / (2 * t))
    )

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", integrate.IntegrationWarning)
    kw = {"epsabs": 1e-14, "epsrel": 1e-14, "limit": 200}
    r_want = integrate.quad(f, -1, 1, args=(0,), **kw)[0]
    dr_want = integrate.quad(f, -1, 1, args=(1,), **kw)[0]
  with jax.enable_x64(True):
    r, dr = legendre.smoothing_factor(jnp.array([u]), t, h, order)
  assert abs(float(r[0]) - r_want) < 1e-10 * max(1.0, abs(r_want))
  assert abs(float(dr[0]) - dr_want) < 1e-10 * max(1.0, abs(dr_want))
  if order in (2, 4):  # these cases are far from the trivial r = 1
    assert abs(r_want - 1) > 1e-4


@pytest.mark.parametrize("t", [1e-3, 0.1, 2.0])
def test_tiny_bandwidth_is_empirical_score(t):
  """C = 1e-8 reproduces the Gaussian-KDE score and density (1e-8).

  Planted bug caught: kernel coefficients without the P_j(0) factor
  (∫ K != 1 shifts log p̂).
  """
  rng = np.random.default_rng(1)
  X = rng.normal(size=(50, 2))
  x = X[:6] + math.sqrt(t) * rng.normal(size=(6, 2))
  logits = -np.sum((x[:, None] - X[None]) ** 2, -1) / (2 * t)
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  emp_score = (w @ X - x) / t
  lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1))
  lse += logits.max(1)
  emp_logp = lse - math.log(50) - math.log(2 * math.pi * t)
  with jax.enable_x64(True):
    res = legendre.legendre_score(x, X, t, C=1e-8, truncate=False)
  np.testing.assert_allclose(
      res.score_MD, emp_score, rtol=1e-8, atol=1e-8 * max(1, 1 / t)
  )
  np.testing.assert_allclose(res.log_abs_p_M, emp_logp, rtol=0, atol=1e-8)
  assert np.all(np.asarray(res.sign_M) == 1)


def test_bias_decreases_with_order():
  """Gaussian p0: |E p̂_t(0) - p_t(0)| falls strictly for order 0 -> 2 -> 4.

  E p̂_t = p0 * phi_t * K_h = N(0, s²+t) * K_h (one quadrature). The same
  expectation through the estimator's own r (Gauss–Hermite over X ~ p0) is
  checked to agree, tying the bias to the code path that p̂ uses.
  Planted bug caught: coefficients without P_j(0) (no moment cancellation).
  """
  s2, t = 1.0, 0.5
  sd = math.sqrt(s2 + t)
  h = 0.5 * sd
  p_true = stats.norm.pdf(0.0, scale=sd)
  y_G, wy_G = np.polynomial.hermite_e.hermegauss(80)  # X = s y, y ~ N(0, 1)
  biases = []
  for order in (0, 2, 4):
    e_p = integrate.quad(
        lambda w, order=order: legendre.kernel_values(w, order)
        * stats.norm.pdf(h * w, scale=sd),
        -1,
        1,
        epsabs=1e-14,
        epsrel=1e-13,
    )[0]
    with jax.enable_x64(True):
      u_G = jnp.asarray(0.0 - math.sqrt(s2) * y_G)
      r_G, _ = legendre.smoothing_factor(u_G, t, h, order)
      phi_G = stats.norm.pdf(np.asarray(u_G), scale=math.sqrt(t))
      e_p_code = np.sum(wy_G * phi_G * np.asarray(r_G)) / math.sqrt(
          2 * math.pi
      )
    assert abs(e_p_code - e_p) < 1e-10
    biases.append(abs(e_p - p_true))
  assert biases[0] > biases[1] > biases[2], biases
  assert biases[2] < 0.1 * biases[0], biases


def test_negative_density_is_signed_not_nan():
  """Sparse points, order-2 kernel, h = 2 sqrt(t): p̂ < 0 between them.

  Expect sign -1 where the dense formula is negative, the right |p̂|, finite
  outputs, keep False and score 0 there (truncate on or off).
  Planted bug caught: summing |terms| (logsumexp-style) gives sign +1.
  """
  X = np.array([[-2.0], [0.0], [2.0]])
  t, h, order = 0.04, 0.4, 2
  with jax.enable_x64(True):
    x = np.linspace(-3.0, 3.0, 61)[:, None]
    with pytest.warns(UserWarning, match="h >= sqrt"):
      res = legendre.legendre_score(x, X, t, h=h, order=order, truncate=False)
    with pytest.warns(UserWarning, match="h >= sqrt"):
      res_tr = legendre.legendre_score(x, X, t, h=h, order=order)
    dense = np.asarray(_dense_p_M(x, X, t, h, order))
  neg = dense < -1e-6
  assert neg.sum() >= 5
  np.testing.assert_allclose(_p_hat(res), dense, rtol=1e-10, atol=1e-14)
  assert np.all(np.asarray(res.sign_M)[neg] == -1)
  for r in (res, res_tr):
    assert np.all(np.isfinite(r.score_MD))
    assert np.all(np.isfinite(r.log_abs_p_M))
    assert not np.any(np.asarray(r.keep_M)[neg])
    assert np.all(np.asarray(r.score_MD)[~np.asarray(r.keep_M)] == 0)
  np.testing.assert_array_equal(res.keep_M, dense > 0)


@pytest.mark.parametrize("d", [1, 2])
def test_gradient_matches_autodiff_of_dense_density(d):
  """p̂ and ∇p̂ = score·p̂ vs a dense formula and jax.grad (float64, 1e-9).

  n = 23 with block_k = 5 exercises several blocks and a padded tail; h is
  close to sqrt(t) so r is far from 1.
  Planted bugs caught: dropping the r' term; prod over all l instead of
  l != k (d = 2); no rescaling of the running sum when the max moves.
  """
  rng = np.random.default_rng(d)
  X = rng.normal(size=(23, d))
  t, h, order = 0.2, 0.4, 2
  x = rng.normal(size=(5, d))
  with jax.enable_x64(True):
    res = legendre.legendre_score(
        x, X, t, h=h, order=order, truncate=False, block_k=5
    )
    p_want = np.asarray(_dense_p_M(x, X, t, h, order))
    grad = jax.vmap(jax.grad(lambda z: _dense_p(z, X, t, h, order)))
    g_want = np.asarray(grad(jnp.asarray(x)))
    r, _ = legendre.smoothing_factor(jnp.asarray(x - X[0]), t, h, order)
  assert np.max(np.abs(np.asarray(r) - 1)) > 1e-2  # the test is sensitive
  assert np.all(p_want > 0)
  p = _p_hat(res)
  np.testing.assert_allclose(p, p_want, rtol=1e-10)
  np.testing.assert_allclose(
      np.asarray(res.score_MD) * p[:, None],
      g_want,
      rtol=1e-9,
      atol=1e-12,
  )


def test_truncation_equals_density_threshold():
  """keep == (p̂ > c_rho / (n t^{d/2})) with p̂ from the dense formula.

  Planted bug caught: threshold without the (2π)^{d/2} factor.
  """
  rng = np.random.default_rng(3)
  X = rng.normal(size=(40, 1))
  t, h, order, n = 0.1, 0.2, 4, 40
  x = np.linspace(0.0, 4.0, 81)[:, None]
  with jax.enable_x64(True):
    dense = np.asarray(_dense_p_M(x, X, t, h, order))
    for c_rho in (0.1, 1.0, 3.0):
      res = legendre.legendre_score(x, X, t, h=h, order=order, c_rho=c_rho)
      rho = c_rho / (n * t**0.5)
      clear = np.abs(dense - rho) > 1e-8 * rho
      want = dense > rho
      assert want.any() and not want.all()
      np.testing.assert_array_equal(
          np.asarray(res.keep_M)[clear], want[clear]
      )


def _log_f(u, t, h, order):
  """log (K_h*phi_t)(u) and its u-derivative by max-shifted scipy quad."""
  shift = (abs(u) - h) ** 2 / (2 * t)  # valid for |u| > h

  def f(w, power):
    e = np.exp(-((u - h * w) ** 2) / (2 * t) + shift)
    return _test_kernel(w, order) * (-(u - h * w) / t) ** power * e

  edge = np.sign(u) * np.array([0.9, 0.99])
  kw = {"epsabs": 0, "epsrel": 1e-13, "limit": 200, "points": edge}
  i0 = integrate.quad(f, -1, 1, args=(0,), **kw)[0]
  i1 = integrate.quad(f, -1, 1, args=(1,), **kw)[0]
  log_f = math.log(i0) - shift - 0.5 * math.log(2 * math.pi * t)
  return log_f, i1 / i0


def test_float32_far_query_does_not_overflow():
  """float32, u h / t = 120 > 88 (exp overflow): p̂ underflows, log p̂ not.

  One data point at 0, query at 1.5, t = 1e-4: log p̂ ≈ -11000 and the score
  come from max-shifted quadrature (scipy quad, float64) in the oracle.
  Planted bug caught: shifting by the Gaussian exponent -u²/(2t) without
  the clip to [-h, h] (r = inf, inf * 0 = NaN).
  """
  t, h, order, u = 1e-4, 0.008, 4, 1.5
  log_p, score = _log_f(u, t, h, order)
  res = legendre.legendre_score(
      np.array([[u]], np.float32), np.zeros((1, 1), np.float32), t, h=h,
      order=order, truncate=False,
  )
  assert res.score_MD.dtype == jnp.float32
  assert int(res.sign_M[0]) == 1 and bool(res.keep_M[0])
  np.testing.assert_allclose(float(res.log_abs_p_M[0]), log_p, rtol=1e-6)
  np.testing.assert_allclose(float(res.score_MD[0, 0]), score, rtol=1e-4)


@pytest.mark.parametrize("block_k", [2, 3])
def test_padding_does_not_set_the_shift(block_k):
  """Query at 0, data at -3, 3, 4 (padded with zeros when block_k = 2).

  p̂ ~ exp(-4500) underflows; log p̂ must match the quad oracle either way.
  Planted bug caught: padded rows left in the running max (real terms
  underflow against the pad at u = 0: log p̂ = -inf).
  """
  t, h, order = 1e-3, 0.01, 4
  X = np.array([[-3.0], [3.0], [4.0]])
  logs = [_log_f(0.0 - xi, t, h, order)[0] for xi in X[:, 0]]
  want = float(special.logsumexp(logs)) - math.log(3)
  with jax.enable_x64(True):
    res = legendre.legendre_score(
        np.zeros((1, 1)), X, t, h=h, order=order, block_k=block_k
    )
  np.testing.assert_allclose(float(res.log_abs_p_M[0]), want, rtol=1e-10)
  assert int(res.sign_M[0]) == 1 and not bool(res.keep_M[0])


def test_jit_traced_inputs_match_eager():
  """Smoke/consistency: callable under jit with traced x, X and t."""
  rng = np.random.default_rng(4)
  X = rng.normal(size=(30, 2)).astype(np.float32)
  x = rng.normal(size=(4, 2)).astype(np.float32)
  eager = legendre.legendre_score(x, X, 0.3, order=3)
  fn = jax.jit(lambda a, b, t: legendre.legendre_score(a, b, t, order=3))
  traced = fn(x, X, jnp.float32(0.3))
  assert traced.score_MD.dtype == jnp.float32
  np.testing.assert_allclose(traced.score_MD, eager.score_MD, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(traced.keep_M, eager.keep_M)


def test_gaussian_sample_score_close_to_truth():
  """Quality check, d = 2: N(0, I) sample, n = 20000, t = 0.5.

  True score -x / (1 + t). Loose tolerance (RMS 0.05 against a score RMS of
  about 0.9; measured ≈ 0.01): documents that the estimator works, with the
  defaults and with a visibly non-trivial kernel (order 2, C = 3).
  """
  rng = np.random.default_rng(0)
  X = rng.normal(size=(20000, 2))
  x = rng.normal(size=(400, 2)) * math.sqrt(1.5)
  x = x[np.linalg.norm(x, axis=1) < 2.0][:64]
  true = -x / 1.5
  with jax.enable_x64(True):
    for kw in ({}, {"order": 2, "C": 3.0}):
      res = legendre.legendre_score(x, X, 0.5, **kw)
      assert np.all(res.keep_M)
      err = np.asarray(res.score_MD) - true
      assert np.sqrt(np.mean(np.sum(err**2, 1))) < 0.05, kw


_GOOD = {"x_MD": np.zeros((3, 2)), "X_ND": np.zeros((5, 2)), "t": 1.0}


@pytest.mark.parametrize(
    "override,match",
    [
        ({"t": 0.0}, "t=.*> 0"),
        ({"t": -1.0}, "t=.*> 0"),
        ({"X_ND": np.zeros((0, 2))}, "empty"),
        ({"X_ND": np.full((5, 2), np.nan)}, "NaN"),
        ({"x_MD": np.zeros((3, 1))}, "dimension mismatch"),
        ({"X_ND": np.zeros(5)}, "2-D"),
        ({"C": 0.0}, "C="),
        ({"C": -1.0}, "C="),
        ({"order": -1}, "order"),
        ({"order": 1.5}, "order"),
        ({"h": 0.0}, "h="),
        ({"n_quad": 0}, "n_quad"),
        ({"c_rho": -1.0}, "c_rho"),
    ],
)
def test_bad_inputs_raise(override, match):
  """Clear ValueErrors for invalid inputs."""
  with pytest.raises(ValueError, match=match):
    legendre.legendre_score(**{**_GOOD, **override})


def test_bad_kernel_order_raises():
  with pytest.raises(ValueError, match="order"):
    legendre.legendre_kernel_coeffs(-2)
