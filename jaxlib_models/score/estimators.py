"""Score estimators for p_t = p0 * N(0, t I) from n samples (arXiv 2402.15602).

M: queries, N: data points, D: dimension.

- "empirical": the score of the Gaussian KDE P_n * phi_t,
  s_t(x) = (sum_i w_i(x) X_i - x) / t, w = softmax_i(-|x - X_i|^2 / (2 t))
  (the h -> 0 limit of the paper's kernel estimator; brief §2.2). Computed by
  the Gaussian-kernel attention (kernels/gauss_attention): memory does not
  grow with N.
- "legendre": the paper's truncated kernel plug-in estimator with a
  higher-order Legendre kernel (score/legendre.py).
Truncation (paper: 1{p̂_t(x) > rho_n}, rho_n = c_rho / (n t^{D/2})) is, for
the empirical estimator, lse_i(-|x - X_i|^2/(2t)) > log c_rho + D/2 log 2 pi:
independent of n and t (brief §2.2). With c_rho = 1 it keeps the score only
where about (2 pi)^{D/2} points lie within ~sqrt(t) of x; fine for D <= 2,
destructive in high D, hence `c_rho` and `truncate` are configurable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.kernels import gauss_attention as ga


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Which estimator and its settings (defaults: brief §3)."""

  estimator: str = "empirical"  # "empirical" | "legendre".
  truncate: bool = True  # Paper's 1{p̂ > rho_n}; False: the plain KDE score.
  c_rho: float = 1.0  # rho_n = c_rho / (n t^{D/2}).
  # Legendre estimator only: h = C sqrt(t / ln n), order = ceil(ln n).
  C: float = 1.0
  order: int | None = None
  n_quad: int | None = None
  # Kernel dispatch: None = pallas on GPU then xla; or a name / list.
  implementation: str | tuple | None = None
  block_k: int = 1024  # Data points per scanned block (xla path).
  # Squared distances: "auto" = direct differences in float64, the centred
  # expanded form (one matmul, ~6x faster on CPU) in float32; "direct" forces
  # exact differences (float32 at t < ~1e-3, brief §2.7).
  distance: str = "auto"

  def __post_init__(self):
    if self.estimator not in ("empirical", "legendre"):
      raise ValueError(f"estimator={self.estimator!r}; use 'empirical' or "
                       "'legendre'")
    if not self.c_rho > 0:
      raise ValueError(f"c_rho={self.c_rho} must be > 0")
    if not self.C > 0:
      raise ValueError(f"C={self.C} must be > 0")
    if self.order is not None and self.order < 0:
      raise ValueError(f"order={self.order} must be >= 0")
    if self.block_k < 1:
      raise ValueError(f"block_k={self.block_k} must be >= 1")
    if self.distance not in ("auto", "direct", "expanded"):
      raise ValueError(f"distance={self.distance!r}; use 'auto', 'direct' "
                       "or 'expanded'")


class ScoreOut(NamedTuple):
  score_MD: jax.Array  # Estimated score; 0 where truncated.
  keep_M: jax.Array  # True where p̂_t(x) > rho_n (all True if not truncating).
  log_p_M: jax.Array  # log p̂_t(x) (empirical) or log|p̂_t(x)| (legendre).


def check_data(X_ND, *, name: str = "data") -> np.ndarray:
  """Host-side validation of a sample: 2-D, non-empty, finite."""
  X = np.asarray(X_ND)
  if X.ndim == 1:
    raise ValueError(f"{name} must be 2-D (N, D); got shape {X.shape}. For "
                     "1-D data use X[:, None]")
  if X.ndim != 2:
    raise ValueError(f"{name} must be 2-D (N, D); got shape {X.shape}")
  if X.shape[0] == 0:
    raise ValueError(f"empty {name}: N = 0 points; the score estimator needs "
                     "at least one sample")
  if X.shape[1] == 0:
    raise ValueError(f"{name} has D = 0 dimensions")
  bad = ~np.isfinite(X).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)[:5].tolist()
    raise ValueError(f"{name} contains NaN or inf in {int(bad.sum())} rows "
                     f"(first: {rows}); drop or impute them")
  return X


def check_time(t, *, name: str = "t") -> float:
  tv = float(t)
  if not tv > 0 or not math.isfinite(tv):
    raise ValueError(f"{name} must be a finite number > 0 (a noise "
                     f"variance), got {tv}")
  return tv


def work_dtype(X: np.ndarray):
  """float64 when the data are float64 and x64 is enabled, else float32."""
  if jax.config.jax_enable_x64 and X.dtype == np.float64:
    return jnp.float64
  return jnp.float32


def keep_threshold(d: int, c_rho: float) -> float:
  """lse threshold equivalent to p̂_t > c_rho / (n t^{D/2}) (brief §2.2)."""
  return math.log(c_rho) + 0.5 * d * math.log(2 * math.pi)


def empirical_score(x_MD, X_ND, t, *, truncate: bool = True,
                    c_rho: float = 1.0, implementation=None,
                    block_k: int = 1024, distance: str = "auto") -> ScoreOut:
  """The (optionally truncated) score of the Gaussian KDE P_n * phi_t.

  Traceable in x, X and t (t a scalar); call `check_data`/`check_time` on
  concrete inputs first (the public wrappers do).
  """
  n, d = X_ND.shape
  mean_MD, lse_M = ga.gauss_attention(
      x_MD, X_ND, t, implementation=implementation,
      block_sizes=ga.BlockSizes(block_k=block_k), distance=distance)
  score_MD = (mean_MD - x_MD) / t
  log_p_M = lse_M - math.log(n) - 0.5 * d * jnp.log(2 * jnp.pi * t)
  if truncate:
    keep_M = lse_M > keep_threshold(d, c_rho)
    score_MD = jnp.where(keep_M[:, None], score_MD, 0.0)
  else:
    keep_M = jnp.ones(lse_M.shape, bool)
  return ScoreOut(score_MD, keep_M, log_p_M)


def estimate(x_MD, X_ND, t, cfg: ScoreConfig = ScoreConfig()) -> ScoreOut:
  """The configured estimator at queries x for noise level t."""
  if cfg.estimator == "empirical":
    return empirical_score(x_MD, X_ND, t, truncate=cfg.truncate,
                           c_rho=cfg.c_rho, implementation=cfg.implementation,
                           block_k=cfg.block_k, distance=cfg.distance)
  from jaxlib_models.score import legendre  # noqa: PLC0415

  out = legendre.legendre_score(
      x_MD, X_ND, t, C=cfg.C, order=cfg.order, n_quad=cfg.n_quad,
      c_rho=cfg.c_rho, truncate=cfg.truncate, block_k=cfg.block_k)
  return ScoreOut(out.score_MD, out.keep_M, out.log_abs_p_M)


def score(x_MD, X_ND, t, cfg: ScoreConfig = ScoreConfig()) -> jax.Array:
  """Checked, jitted convenience: the estimated score at x (M, D)."""
  X = check_data(X_ND)
  x = np.asarray(x_MD)
  check_data(x, name="queries")
  if x.shape[1] != X.shape[1]:
    raise ValueError(f"dimension mismatch: queries have D={x.shape[1]} but "
                     f"data have D={X.shape[1]}")
  tv = check_time(t)
  dtype = work_dtype(X)
  return _jit_estimate(jnp.asarray(x, dtype), jnp.asarray(X, dtype),
                       jnp.asarray(tv, dtype), cfg).score_MD


_jit_estimate = jax.jit(estimate, static_argnums=3)
