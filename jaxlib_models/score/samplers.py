"""Early-stopped reverse-time samplers for the Brownian forward process.

Forward: X_t = X_0 + sqrt(t) Z. Reverse (Algorithm 1 of arXiv 2402.15602, in
forward-time notation): start Y ~ N(0, T I) at t = T and run t down to t0 on a
grid t0 = tau_0 < ... < tau_K = T, then output Y (early stopping: never t = 0,
whose empirical-score limit is the training points themselves).

M: particles, N: data points, D: dimension. With step tau -> tau' < tau,
Delta = tau - tau', score s = s_tau(Y) and denoiser m = Y + tau s (Tweedie):

  "em"     Euler-Maruyama      Y <- Y + Delta s + sqrt(Delta) xi
  "ei"     exponential integr. Y <- m + (tau'/tau)(Y - m)
                                    + sqrt(tau' (tau - tau') / tau) xi
           (exact for a frozen m: the Brownian bridge towards m)
  "ode"    probability flow    Y <- Y + Delta s / 2              (Euler)
  "ode_ei" probability flow    Y <- m + sqrt(tau'/tau) (Y - m)   (exact for
                                                            frozen m)
  "bridge" exact for the *untruncated* empirical score: draw the data index
           i ~ softmax_i(-|Y_T - X_i|^2 / (2T)) and Y_{t0} ~ N(X_i + (t0/T)
           (Y_T - X_i), t0 (T - t0)/T I): no discretisation error at all.

Schedule (Thm 3.8): t0 = n^{-2/(2 beta + D)}, T = n^{2 beta/(2 beta + D)}
with beta = 2 by default; every choice is a `SamplerConfig` field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.score import estimators

METHODS = ("em", "ei", "ode", "ode_ei", "bridge")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Reverse-process settings (defaults: brief §2.3)."""

  method: str = "em"  # One of METHODS.
  steps: int = 400  # K grid intervals between t0 and T.
  grid: str = "geometric"  # "geometric" | "linear" in t.
  beta: float = 2.0  # Smoothness for the theory's t0 and T.
  t0: float | None = None  # None: n^{-2/(2 beta + D)}.
  T: float | None = None  # None: n^{2 beta/(2 beta + D)}.
  start: str = "gaussian"  # "gaussian": N(0, T I); "kde": draws of p̂_T.

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; use one of {METHODS}")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps} must be >= 1")
    if self.grid not in ("geometric", "linear"):
      raise ValueError(f"grid={self.grid!r}; use 'geometric' or 'linear'")
    if self.start not in ("gaussian", "kde"):
      raise ValueError(f"start={self.start!r}; use 'gaussian' or 'kde'")
    if self.beta <= 0:
      raise ValueError(f"beta={self.beta} must be > 0")
    for name in ("t0", "T"):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise ValueError(f"{name}={v} must be > 0 (a noise variance)")
    if self.t0 is not None and self.T is not None and not self.t0 < self.T:
      raise ValueError(f"t0={self.t0} must be < T={self.T}")


def theory_schedule(n: int, d: int, beta: float = 2.0) -> tuple[float, float]:
  """(t0, T) = (n^{-2/(2 beta + d)}, n^{2 beta/(2 beta + d)}) (Thm 3.8)."""
  e = 2.0 * beta + d
  return float(n) ** (-2.0 / e), float(n) ** (2.0 * beta / e)


def resolve(cfg: SamplerConfig, n: int, d: int) -> tuple[float, float]:
  t0, T = theory_schedule(n, d, cfg.beta)
  t0 = cfg.t0 if cfg.t0 is not None else t0
  T = cfg.T if cfg.T is not None else T
  if not t0 < T:
    raise ValueError(f"t0={t0} must be < T={T}")
  return t0, T


def time_grid(t0, T, steps: int, kind: str = "geometric"):
  """Descending times tau_K = T > ... > tau_0 = t0 (endpoints exact).

  numpy float64 for Python/numpy inputs, jnp inside a trace (t0, T traced).
  """
  xp = jnp if isinstance(t0, jax.Array) or isinstance(T, jax.Array) else np
  k = xp.arange(steps, -1, -1) / steps
  if kind == "geometric":
    g = t0 * (T / t0) ** k
  else:
    g = t0 + (T - t0) * k
  if xp is np:
    g[0], g[-1] = T, t0
    return g
  return g.at[0].set(T).at[-1].set(t0)


def _normal(key, shape, dtype):
  # Noise is drawn in float32 and cast, so float32 and float64 runs with one
  # key share their noise exactly (precision checks, brief §8.11).
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _step(method: str, y_MD, s_MD, tau, tau_next, xi_MD):
  delta = tau - tau_next
  if method == "em":
    return y_MD + delta * s_MD + jnp.sqrt(delta) * xi_MD
  if method == "ode":
    return y_MD + 0.5 * delta * s_MD
  m_MD = y_MD + tau * s_MD
  if method == "ei":
    return (m_MD + (tau_next / tau) * (y_MD - m_MD)
            + jnp.sqrt(tau_next * delta / tau) * xi_MD)
  if method == "ode_ei":
    return m_MD + jnp.sqrt(tau_next / tau) * (y_MD - m_MD)
  raise ValueError(method)


def integrate(score_fn: Callable, key, y_MD, grid, method: str = "em"):
  """Runs `method` from y at grid[0] down to grid[-1] (lax.scan).

  score_fn(y_MD, tau) -> score_MD must be traceable. Noise keys fold in the
  step index, so a fixed key gives bit-identical output.
  """
  if method == "bridge":
    raise ValueError("'bridge' is not a time-stepping method; use "
                     "bridge_sample")
  grid = jnp.asarray(grid, y_MD.dtype)

  def body(y, inp):
    k, tau, tau_next = inp
    xi = _normal(jax.random.fold_in(key, k), y.shape, y.dtype)
    return _step(method, y, score_fn(y, tau), tau, tau_next, xi), None

  ks = jnp.arange(grid.shape[0] - 1)
  y, _ = jax.lax.scan(body, y_MD, (ks, grid[:-1], grid[1:]))
  return y


def gumbel_index(key, y_MD, X_ND, t, *, block_k: int = 1024):
  """i ~ softmax_i(-|y - X_i|^2 / (2t)) per row by a chunked Gumbel-max."""
  n, d = X_ND.shape
  b = min(block_k, n)
  nb = -(-n // b)
  Xp = jnp.concatenate([X_ND, jnp.zeros((nb * b - n, d), X_ND.dtype)])
  idx = jnp.arange(nb * b, dtype=jnp.int32).reshape(nb, b)
  m = y_MD.shape[0]

  def body(carry, inp):
    best, arg = carry
    j, X_BD, idx_B = inp
    diff = y_MD[:, None, :] - X_BD[None]
    logits = -jnp.sum(diff * diff, -1) / (2 * t)
    g = jax.random.gumbel(jax.random.fold_in(key, j), logits.shape,
                          jnp.float32).astype(logits.dtype)
    score = jnp.where(idx_B[None] < n, logits + g, -jnp.inf)
    blk_arg = jnp.argmax(score, axis=1)
    blk_best = jnp.take_along_axis(score, blk_arg[:, None], 1)[:, 0]
    better = blk_best > best
    return (jnp.where(better, blk_best, best),
            jnp.where(better, idx_B[blk_arg], arg)), None

  init = (jnp.full((m,), -jnp.inf, y_MD.dtype), jnp.zeros((m,), jnp.int32))
  (_, arg), _ = jax.lax.scan(
      body, init, (jnp.arange(nb), Xp.reshape(nb, b, d), idx))
  return arg


def bridge_sample(key, y_MD, X_ND, T, t0):
  """Exact reverse process of P_n * Brownian motion from Y_T = y to t0."""
  k1, k2 = jax.random.split(key)
  i_M = gumbel_index(k1, y_MD, X_ND, T)
  Xi_MD = X_ND[i_M]
  mean = Xi_MD + (t0 / T) * (y_MD - Xi_MD)
  sd = jnp.sqrt(t0 * (T - t0) / T)
  return mean + sd * _normal(k2, y_MD.shape, y_MD.dtype)


def initial(key, num: int, X_ND, T, start: str):
  """N(0, T I) ('gaussian', the paper's start) or draws of p̂_T ('kde')."""
  d = X_ND.shape[1]
  k1, k2 = jax.random.split(key)
  z = _normal(k1, (num, d), X_ND.dtype)
  if start == "gaussian":
    return jnp.sqrt(T) * z
  i = jax.random.randint(k2, (num,), 0, X_ND.shape[0])
  return X_ND[i] + jnp.sqrt(T) * z


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _run(key, X_ND, num, cfg: SamplerConfig, score_cfg, t0, T):
  k_start, k_run = jax.random.split(key)
  y = initial(k_start, num, X_ND, T, cfg.start)
  if cfg.method == "bridge":
    return bridge_sample(k_run, y, X_ND, T, t0)
  grid = time_grid(t0, T, cfg.steps, cfg.grid)
  fn = lambda y, tau: estimators.estimate(y, X_ND, tau, score_cfg).score_MD
  return integrate(fn, k_run, y, grid, cfg.method)


def sample(key, X_ND, num: int, cfg: SamplerConfig = SamplerConfig(),
           score_cfg: estimators.ScoreConfig = estimators.ScoreConfig()):
  """`num` draws of the early-stopped diffusion sampler built on X.

  Returns (samples_MD, (t0, T)). The 'bridge' method needs the untruncated
  empirical score (score_cfg.truncate=False); anything else is an error,
  because the bridge is only exact for that score.
  """
  X = estimators.check_data(X_ND)
  if num < 1:
    raise ValueError(f"num={num} samples must be >= 1")
  n, d = X.shape
  t0, T = resolve(cfg, n, d)
  if cfg.method == "bridge" and (score_cfg.estimator != "empirical"
                                 or score_cfg.truncate):
    raise ValueError("method='bridge' is exact only for the untruncated "
                     "empirical score: set score.truncate=False and "
                     "estimator='empirical', or use 'em'/'ei'")
  dtype = estimators.work_dtype(X)
  Xj = jnp.asarray(X, dtype)
  out = _run(key, Xj, int(num), cfg, score_cfg, jnp.asarray(t0, dtype),
             jnp.asarray(T, dtype))
  return out, (t0, T)


def kde_sample(rng: np.random.Generator, X_ND, num: int, t0: float):
  """Direct draws of P_n * N(0, t0 I): the closed-form output (brief §2.4)."""
  X = np.asarray(X_ND)
  i = rng.integers(0, X.shape[0], num)
  return X[i] + math.sqrt(t0) * rng.standard_normal((num, X.shape[1]))
