"""Rate experiments of arXiv 2402.15602 (brief §5): E1-E5.

E1 score MSE against n at fixed t; E2 against t at fixed n; E3 TV (1-D) of the
sampler's output distribution against n via the closed-form identity
(the early-stopped empirical-score sampler outputs P_n * N(0, t0 I) exactly,
brief §2.4); E4 the time-stepping samplers against direct draws of that KDE
(two-sample KS with its noise floor); E5 kernel against neural score at small
n. Everything on the truth side is float64 (jax_enable_x64 inside).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxlib_models.kernels import gauss_attention as ga
from jaxlib_models.score import estimators, samplers, targets


def fit_slope(x, y) -> float:
  """OLS slope of log y on log x."""
  lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
  if len(np.unique(lx)) < 2:
    return float("nan")  # A slope needs two distinct x values.
  return float(np.polyfit(lx, ly, 1)[0])


def bootstrap_slope(ns, per_n_values, *, reps: int = 2000, seed: int = 0):
  """Slope of log(mean over seeds) on log n, with a 95% bootstrap CI that
  resamples the seeds independently at each n (fresh data per seed)."""
  rng = np.random.default_rng(seed)
  means = [np.mean(v) for v in per_n_values]
  slope = fit_slope(ns, means)
  boots = []
  for _ in range(reps):
    m = [np.mean(rng.choice(v, size=len(v), replace=True))
         for v in per_n_values]
    boots.append(fit_slope(ns, m))
  lo, hi = np.percentile(boots, [2.5, 97.5])
  return slope, (float(lo), float(hi))


@jax.jit
def _score_f64(x_MD, X_ND, t):
  return estimators.empirical_score(x_MD, X_ND, t, truncate=True).score_MD


def score_mse(target: targets.Target, n: int, t: float, seed: int, *,
              n_eval: int = 10_000, cfg: estimators.ScoreConfig | None = None,
              score_fn=None) -> float:
  """E_{x ~ p_t} |ŝ_t(x) - s_t(x)|^2 by Monte Carlo, float64.

  Data X ~ p0 (n points, fresh per seed); evaluation points x ~ p_t. Either
  the kernel estimator (cfg) or a given score_fn(x, t) (the neural model).
  """
  rng = np.random.default_rng((seed, n, 7))
  X = target.sample(rng, n)
  x = target.sample_pt(rng, n_eval, t)
  truth = target.score(x, t)
  with jax.enable_x64(True):
    if score_fn is not None:
      est = np.asarray(score_fn(x, t), np.float64)
    elif cfg is None or (cfg.estimator == "empirical" and cfg.truncate
                         and cfg.c_rho == 1.0):
      est = np.asarray(_score_f64(jnp.asarray(x), jnp.asarray(X),
                                  jnp.asarray(t, jnp.float64)))
    else:
      est = np.asarray(estimators._jit_estimate(
          jnp.asarray(x), jnp.asarray(X), jnp.asarray(t, jnp.float64),
          cfg).score_MD)
  return float(np.mean(np.sum((est - truth) ** 2, axis=-1)))


def kde_log_density(grid_GD, X_ND, t0: float) -> np.ndarray:
  """log of P_n * N(0, t0 I) at grid points (float64, chunked)."""
  with jax.enable_x64(True):
    _, lse = ga.gauss_attention(jnp.asarray(grid_GD, jnp.float64),
                                jnp.asarray(X_ND, jnp.float64),
                                jnp.asarray(t0, jnp.float64))
  n, d = X_ND.shape
  return np.asarray(lse) - math.log(n) - 0.5 * d * math.log(2 * math.pi * t0)


def tv_kde_1d(target: targets.Target, X_N1, t0: float) -> float:
  """TV(P_n * N(0, t0), p0) = 1/2 int |p̂ - p0| by trapezoid; spacing
  <= sqrt(t0)/20 over the data range +- 8 sd (brief §5, E3)."""
  sd = math.sqrt(t0)
  lo = min(X_N1.min(), -6.0) - 8 * sd
  hi = max(X_N1.max(), 6.0) + 8 * sd
  num = int(math.ceil((hi - lo) / (sd / 20))) + 1
  g = np.linspace(lo, hi, num)
  p_hat = np.exp(kde_log_density(g[:, None], X_N1, t0))
  p0 = target.pdf0(g[:, None])
  return 0.5 * float(np.trapezoid(np.abs(p_hat - p0), g))


def tv_kde_2d(target: targets.Target, X_N2, t0: float,
              spacing_frac: float = 0.2) -> float:
  """TV(P_n * N(0, t0 I), p0) in 2-D by the trapezoid rule on a grid of
  spacing spacing_frac * sqrt(t0) over the data range +- 6 sd (float64;
  the KDE on the grid is the chunked lse, so memory stays flat)."""
  sd = math.sqrt(t0)
  h = spacing_frac * sd
  axes = []
  for k in range(2):
    lo = X_N2[:, k].min() - 6 * sd
    hi = X_N2[:, k].max() + 6 * sd
    axes.append(np.linspace(lo, hi, int(math.ceil((hi - lo) / h)) + 1))
  gx, gy = np.meshgrid(*axes, indexing="ij")
  pts = np.stack([gx.ravel(), gy.ravel()], 1)
  diff = np.abs(np.exp(kde_log_density(pts, X_N2, t0)) - target.pdf0(pts))
  diff = diff.reshape(gx.shape)
  return 0.5 * float(np.trapezoid(np.trapezoid(diff, axes[1], axis=1),
                                  axes[0]))


def tv_rate(target: targets.Target, n: int, seed: int, beta: float = 2.0
            ) -> float:
  """E3 at one (n, seed): TV of the early-stopped sampler's exact output
  (d = 1 or 2; t0 = n^{-2/(2 beta + d)})."""
  rng = np.random.default_rng((seed, n, 11))
  X = target.sample(rng, n)
  t0, _ = samplers.theory_schedule(n, target.dim, beta)
  if target.dim == 1:
    return tv_kde_1d(target, X, t0)
  if target.dim == 2:
    return tv_kde_2d(target, X, t0)
  raise ValueError(f"grid TV needs d <= 2, got d={target.dim}; use a "
                   "two-sample statistic in higher d")


def sampler_vs_identity(target: targets.Target, n: int, num: int, seed: int,
                        methods=("bridge", "em", "ei"), steps: int = 200,
                        truncate: bool = False) -> dict:
  """E4: KS between each sampler's output and direct draws of
  P_n * N(0, t0), with the noise floor of two independent direct draws."""
  rng = np.random.default_rng((seed, n, 13))
  X = target.sample(rng, n)
  t0, T = samplers.theory_schedule(n, target.dim)
  ref = samplers.kde_sample(rng, X, num, t0)[:, 0]
  floor = stats.ks_2samp(ref, samplers.kde_sample(rng, X, num, t0)[:, 0])
  out = {"n": n, "num": num, "t0": t0, "T": T,
         "floor_ks": float(floor.statistic), "samples": {}, "ks": {},
         "p": {}}
  with jax.enable_x64(True):
    for i, m in enumerate(methods):
      y, _ = samplers.sample(
          jax.random.key(seed * 100 + i), X, num,
          samplers.SamplerConfig(method=m, steps=steps),
          estimators.ScoreConfig(truncate=truncate and m != "bridge"))
      y = np.asarray(y)[:, 0]
      r = stats.ks_2samp(y, ref)
      out["ks"][m], out["p"][m] = float(r.statistic), float(r.pvalue)
      out["samples"][m] = y
  out["samples"]["kde"] = ref
  out["X"] = X[:, 0]
  return out
