"""Truncated Legendre-kernel plug-in score estimator (arXiv 2402.15602).

The paper's estimator of the score of p_t = p_0 * phi_t (Brownian forward
process, phi_t the N(0, t I) density) as read from a third-party summary
(brief `methods/kernel_score_diffusion.md` §2.2; Lemma C.2 and Section 3 of
the PDF not checked): p̂_t = P_n * K_h * phi_t with the product kernel
K_h(v) = h^-d prod_k K(v_k / h), K of order `order` on [-1, 1] built from
orthonormal Legendre polynomials, and the truncated plug-in score
ŝ_t = ∇p̂_t / p̂_t · 1{p̂_t > rho_n}, rho_n = c_rho / (n t^(d/2)).

Per coordinate (K_h * phi_t)(u) = phi_t(u) r(u) with
r(u) = ∫_{-1}^{1} K(w) exp(u h w / t - h² w² / (2t)) dw, evaluated by
Gauss–Legendre quadrature. K, hence r and p̂, can be negative, so every sum is
a signed sum under a common max-shift (never a logsumexp), streamed over data
blocks with `lax.scan` like a flash-attention forward.

M: queries, N: data points, D: dimension, B: data points per block,
C: data blocks, Q: quadrature nodes, J: kernel order + 1.
"""

import functools
import math
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_SENTINEL = -1e30  # finite "minus infinity" for the running max


class LegendreScore(typing.NamedTuple):
  """Output of `legendre_score`; p̂_t(x) = sign_M * exp(log_abs_p_M)."""

  score_MD: jax.Array  # ∇p̂/p̂ where keep_M, else 0.
  keep_M: jax.Array  # bool: p̂ > rho_n (truncate=True) or p̂ > 0.
  log_abs_p_M: jax.Array  # log |p̂_t(x)|; -inf where p̂ == 0.
  sign_M: jax.Array  # sign of p̂_t(x) in {-1, 0, 1}.


def legendre_kernel_coeffs(order: int) -> np.ndarray:
  """Legendre-series coefficients of the order-`order` kernel K.

  K(w) = sum_{j<=order} psi_j(0) psi_j(w) on |w| <= 1 with
  psi_j = sqrt((2j+1)/2) P_j (Tsybakov 2009, §1.2.2; the brief's reading of
  arXiv 2402.15602, Lemma C.2). Then ∫ K = 1 and ∫ w^j K = 0 for
  1 <= j <= order.

  Args:
    order: kernel order ℓ >= 0.

  Returns:
    float64 array c_J with K(w) = sum_j c_J[j] P_j(w), J = order + 1.
  """
  order = _check_order(order)
  j_J = np.arange(order + 1)
  p0_J = np.polynomial.legendre.legval(0.0, np.eye(order + 1))  # P_j(0)
  return (2.0 * j_J + 1.0) / 2.0 * p0_J


def kernel_values(w: np.typing.ArrayLike, order: int) -> np.ndarray:
  """K(w) in float64 (numpy); zero outside [-1, 1]."""
  w = np.asarray(w, dtype=np.float64)
  k = np.polynomial.legendre.legval(w, legendre_kernel_coeffs(order))
  return np.where(np.abs(w) <= 1.0, k, 0.0)


def quadrature(order: int, n_quad: int | None = None):
  """Gauss–Legendre nodes w_Q and weights a_Q = g_Q K(w_Q), float64 numpy.

  ∫_{-1}^{1} K(w) f(w) dw ≈ sum_q a_Q[q] f(w_Q[q]), exact for polynomials f
  of degree <= 2 n_quad - 1 - order.

  Args:
    order: kernel order ℓ >= 0.
    n_quad: number of nodes Q >= 1; default ℓ + 32.

  Returns:
    (w_Q, a_Q).
  """
  order = _check_order(order)
  n_quad = order + 32 if n_quad is None else int(n_quad)
  if n_quad < 1:
    raise ValueError(f"n_quad={n_quad} must be >= 1")
  w_Q, g_Q = np.polynomial.legendre.leggauss(n_quad)
  return w_Q, g_Q * kernel_values(w_Q, order)


def _node_sums(u, t, h, w_Q, a_Q):
  """Shifted quadrature sums for (K_h * phi_t)(u) and its u-derivative.

  With c = h clip(u/h, -1, 1) (the point of [-h, h] nearest u) the shift
  m = -(u - c)² / (2t) bounds every node exponent -(u - h w)² / (2t), so
  nothing overflows however large u h / t is, and
    sqrt(2πt) (K_h * phi_t)(u)    = exp(m) s,
    sqrt(2πt) (K_h * phi_t)'(u)   = exp(m) g,
  i.e. r(u) = exp(m + u²/(2t)) s and r'(u) - (u/t) r(u) = exp(m + u²/(2t)) g.
  Memory is that of u (the nodes are scanned), not u × Q.

  Returns:
    (m, s, g), each shaped like u.
  """
  c = h * jnp.clip(u / h, -1.0, 1.0)
  m = -jnp.square(u - c) / (2.0 * t)

  def add_node(carry, node):
    s, g = carry
    w, a = node
    hw = h * w
    # (u-c)² - (u-hw)² factored: exact cancellation as h -> 0.
    e = a * jnp.exp((hw - c) * (2.0 * u - c - hw) / (2.0 * t))
    return (s + e, g - e * (u - hw) / t), None

  zeros = jnp.zeros_like(u)
  (s, g), _ = jax.lax.scan(add_node, (zeros, zeros), (w_Q, a_Q))
  return m, s, g


def smoothing_factor(
    u: jax.typing.ArrayLike,
    t: float,
    h: float,
    order: int,
    n_quad: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """r(u) and r'(u) of (K_h * phi_t)(u) = phi_t(u) r(u), one coordinate.

  Uses the estimator's own quadrature (`_node_sums`); r is formed unshifted,
  so it overflows once u h / t exceeds the exponent range (the estimator
  itself never forms r).

  Args:
    u: offsets x - X (any shape).
    t: diffusion time > 0.
    h: bandwidth > 0.
    order: kernel order ℓ >= 0.
    n_quad: quadrature nodes; default ℓ + 32.

  Returns:
    (r, dr), shaped like u, in u's floating dtype.
  """
  u = jnp.asarray(u)
  u = u.astype(jnp.result_type(u.dtype, float))
  w_Q, a_Q = quadrature(order, n_quad)
  m, s, g = _node_sums(
      u, t, h, jnp.asarray(w_Q, u.dtype), jnp.asarray(a_Q, u.dtype)
  )
  scale = jnp.exp(m + jnp.square(u) / (2.0 * t))
  r = scale * s
  return r, scale * g + u / t * r


def _prod_others(s_MBD):
  """prod_{l != k} s[..., l] for each k, without division (s may be 0).

  An unrolled O(D^2) product (D is small and static): the cumprod form was
  constant-folded by XLA for seconds when D = 1 (a product of nothing).
  """
  d = s_MBD.shape[-1]
  if d == 1:
    return jnp.ones_like(s_MBD)
  cols = []
  for k in range(d):
    others = [s_MBD[..., l] for l in range(d) if l != k]
    p = others[0]
    for o in others[1:]:
      p = p * o
    cols.append(p)
  return jnp.stack(cols, -1)


@functools.partial(jax.jit, static_argnames=("block",))
def _signed_sums(x_MD, X_ND, t, h, w_Q, a_Q, *, block):
  """Streams data blocks; returns (max-shift, signed p-sum, grad-sum).

  sum_i prod_k sqrt(2πt) (K_h*phi_t)(u_ik) = exp(max_M) sum_M, likewise the
  gradient with grad_MD. Online rescaling of the running max as in a
  flash-attention forward, but on signed sums.
  """
  n, d = X_ND.shape
  n_blocks = -(-n // block)
  pad = n_blocks * block - n
  X_CBD = jnp.pad(X_ND, ((0, pad), (0, 0))).reshape(n_blocks, block, d)
  valid_CB = (jnp.arange(n_blocks * block) < n).reshape(n_blocks, block)

  def step(carry, blk):
    max_M, sum_M, grad_MD = carry
    X_BD, valid_B = blk
    u_MBD = x_MD[:, None, :] - X_BD[None, :, :]
    m_MBD, s_MBD, g_MBD = _node_sums(u_MBD, t, h, w_Q, a_Q)
    logw_MB = jnp.where(valid_B[None, :], m_MBD.sum(-1), _SENTINEL)
    new_max_M = jnp.maximum(max_M, logw_MB.max(-1))
    rescale_M = jnp.exp(max_M - new_max_M)
    e_MB = jnp.where(
        valid_B[None, :], jnp.exp(logw_MB - new_max_M[:, None]), 0.0
    )
    sum_M = sum_M * rescale_M + jnp.sum(e_MB * s_MBD.prod(-1), -1)
    gprod_MBD = g_MBD * _prod_others(s_MBD)
    grad_MD = grad_MD * rescale_M[:, None] + jnp.einsum(
        "MB,MBD->MD", e_MB, gprod_MBD
    )
    return (new_max_M, sum_M, grad_MD), None

  m = x_MD.shape[0]
  init = (
      jnp.full((m,), _SENTINEL, x_MD.dtype),
      jnp.zeros((m,), x_MD.dtype),
      jnp.zeros((m, d), x_MD.dtype),
  )
  (max_M, sum_M, grad_MD), _ = jax.lax.scan(step, init, (X_CBD, valid_CB))
  return max_M, sum_M, grad_MD


def legendre_score(
    x_MD: jax.typing.ArrayLike,
    X_ND: jax.typing.ArrayLike,
    t: float | jax.typing.ArrayLike,
    *,
    C: float = 1.0,
    order: int | None = None,
    h: float | jax.typing.ArrayLike | None = None,
    n_quad: int | None = None,
    c_rho: float = 1.0,
    truncate: bool = True,
    block_k: int = 4096,
) -> LegendreScore:
  """Truncated Legendre-kernel plug-in score (arXiv 2402.15602, §3).

  p̂_t(x) = (1/n) sum_i prod_k phi_t(u_ik) r(u_ik), u = x - X_i, and
  ∇_k p̂_t(x) = (1/n) sum_i phi_t(u_i) (r'(u_ik) - (u_ik/t) r(u_ik))
  prod_{l != k} r(u_il) (brief §2.2, derived). The score is ∇p̂/p̂ where kept.

  Truncation: p̂_t > rho_n = c_rho / (n t^(d/2)) is evaluated in the
  equivalent form sum_i exp(-|u_i|²/(2t)) prod_k r(u_ik) > c_rho (2π)^(d/2)
  (independent of n and t) on the max-shifted signed sum, so p̂ is never
  exponentiated. With truncate=False, keep is p̂ > 0 (the score of a
  non-positive p̂ is meaningless and set to 0).

  Defaults: h = C sqrt(t / log n), ℓ = ceil(log n) (natural log; log n is
  floored at 1 in h so that n <= 2 gives a finite bandwidth). When
  h >= sqrt(t) (C >= sqrt(log n)) the Gaussian factor of the integrand is
  narrower than the kernel support and the default Q = ℓ + 32 nodes may be
  too few; a warning is issued when this can be decided outside of jit.

  Cost per query and data point: D × Q exponentials (Q = ℓ + 32), about Q
  times the empirical score. Memory O(M × block_k × D), independent of N.

  Args:
    x_MD: queries (M, D); their floating dtype is the working dtype (use
      float64 under `jax.enable_x64` for verification).
    X_ND: data (N, D), N >= 1.
    t: diffusion time > 0 (may be traced).
    C: bandwidth constant > 0 (ignored when h is given).
    order: kernel order ℓ >= 0; default ceil(log N).
    h: explicit bandwidth > 0; overrides C.
    n_quad: Gauss–Legendre nodes; default ℓ + 32.
    c_rho: truncation constant >= 0.
    truncate: apply 1{p̂ > rho_n}; otherwise keep where p̂ > 0.
    block_k: data points per scanned block.

  Returns:
    LegendreScore(score_MD, keep_M, log_abs_p_M, sign_M).

  Raises:
    ValueError: bad shapes, t <= 0, empty or non-finite data, C <= 0,
      order < 0, h <= 0, n_quad < 1, c_rho < 0, block_k < 1.
  """
  x_MD = jnp.asarray(x_MD)
  x_MD = x_MD.astype(jnp.result_type(x_MD.dtype, float))
  dtype = x_MD.dtype
  X_ND = jnp.asarray(X_ND)
  if x_MD.ndim != 2:
    raise ValueError(f"queries x_MD must be 2-D (M, D), got {x_MD.shape}")
  if X_ND.ndim != 2:
    raise ValueError(f"data X_ND must be 2-D (N, D), got {X_ND.shape}")
  n, d = X_ND.shape
  if n == 0:
    raise ValueError("data X_ND is empty (N = 0)")
  if x_MD.shape[1] != d:
    raise ValueError(
        f"dimension mismatch: queries have D={x_MD.shape[1]}, data D={d}"
    )
  if not C > 0:
    raise ValueError(f"bandwidth constant C={C} must be > 0")
  if not c_rho >= 0:
    raise ValueError(f"c_rho={c_rho} must be >= 0")
  if block_k < 1:
    raise ValueError(f"block_k={block_k} must be >= 1")
  X_ND = X_ND.astype(dtype)
  for name, arr in (("data X_ND", X_ND), ("queries x_MD", x_MD)):
    if _concrete(arr) and not np.all(np.isfinite(np.asarray(arr))):
      raise ValueError(f"{name} contains NaN or infinite values")
  if _concrete(t) and not float(t) > 0:
    raise ValueError(f"diffusion time t={float(t)} must be > 0")
  if h is not None and _concrete(h) and not float(h) > 0:
    raise ValueError(f"bandwidth h={float(h)} must be > 0")

  log_n = math.log(n)
  order = math.ceil(log_n) if order is None else _check_order(order)
  w_Q, a_Q = quadrature(order, n_quad)
  t = jnp.asarray(t, dtype)
  if h is None:
    h = C * jnp.sqrt(t / max(log_n, 1.0))
    wide = C >= math.sqrt(max(log_n, 1.0))
  else:
    h = jnp.asarray(h, dtype)
    wide = _concrete(h) and _concrete(t) and float(h) >= math.sqrt(float(t))
  if wide:
    warnings.warn(
        "bandwidth h >= sqrt(t): the quadrature integrand is less smooth;"
        " consider a larger n_quad",
        stacklevel=2,
    )

  max_M, sum_M, grad_MD = _signed_sums(
      x_MD,
      X_ND,
      t,
      h,
      jnp.asarray(w_Q, dtype),
      jnp.asarray(a_Q, dtype),
      block=min(int(block_k), n),
  )
  sign_M = jnp.sign(sum_M)
  log_sum_M = max_M + jnp.log(jnp.abs(sum_M))
  log_abs_p_M = log_sum_M - log_n - 0.5 * d * jnp.log(2.0 * jnp.pi * t)
  keep_M = sum_M > 0
  if truncate:
    log_thresh = jnp.log(jnp.asarray(c_rho, dtype)) + 0.5 * d * math.log(
        2.0 * math.pi
    )
    keep_M = keep_M & (log_sum_M > log_thresh)
  safe_M = jnp.where(keep_M, sum_M, 1.0)
  score_MD = jnp.where(keep_M[:, None], grad_MD / safe_M[:, None], 0.0)
  return LegendreScore(score_MD, keep_M, log_abs_p_M, sign_M)


def _check_order(order) -> int:
  """Validates a kernel order."""
  if int(order) != order or order < 0:
    raise ValueError(f"kernel order={order} must be an integer >= 0")
  return int(order)


def _concrete(x) -> bool:
  """Whether x has a value now (not a jit/grad tracer)."""
  return not isinstance(x, jax.core.Tracer)
