"""Discretised conditional likelihoods and the scale table (codec core).

Brief learned_image_compression.md §2.1. For a latent y with predicted mean mu
and scale s, the coded symbol is q = round(y - mu) and

  P(q) = F((q + 1/2) / s) - F((q - 1/2) / s)

with F the standard Gaussian, Laplace or logistic CDF (scale s lower-bounded
at 0.11, P at 1e-9, the CompressAI defaults); a K-component mixture sums
pi_k (F_k(...) - F_k(...)) with pi = softmax(logits). The Gaussian upper tail
uses the complementary form erfc so that far-tail probabilities stay exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

SCALE_MIN = 0.11  # Lower bound on scales (CompressAI's default).
P_MIN = 1e-9  # Lower bound on likelihoods.
KINDS = ("gaussian", "laplace", "logistic")


def _cdf(kind: str, x):
  if kind == "gaussian":
    return 0.5 * jax.scipy.special.erfc(-x / jnp.sqrt(2.0))
  if kind == "laplace":
    return jnp.where(x < 0, 0.5 * jnp.exp(x), 1.0 - 0.5 * jnp.exp(-x))
  if kind == "logistic":
    return jax.nn.sigmoid(x)
  raise ValueError(f"unknown distribution {kind!r}; use one of {KINDS}")


def _interval(kind: str, v, scale):
  """F((v + 1/2)/s) - F((v - 1/2)/s), evaluated on the stable side: for
  v > 0 through the mirrored upper tail (symmetric F), so no 1 - 1 cancels."""
  s = jnp.maximum(scale, SCALE_MIN)
  a = jnp.abs(v)
  return _cdf(kind, (0.5 - a) / s) - _cdf(kind, (-0.5 - a) / s)


def likelihood(y, mean, scale, kind: str = "gaussian"):
  """P(round(y - mean)) under the discretised `kind` (training: y noisy)."""
  return jnp.maximum(_interval(kind, y - mean, scale), P_MIN)


def mixture_likelihood(y, means_K, scales_K, logits_K, kinds: tuple[str, ...]):
  """K-component mixture; the component axis is the last one, kinds[k] is
  component k's family (e.g. GLLMM's Gaussian-Laplace-logistic)."""
  if len(kinds) != means_K.shape[-1]:
    raise ValueError(f"{len(kinds)} kinds for {means_K.shape[-1]} components")
  w_K = jax.nn.softmax(logits_K, axis=-1)
  p = sum(w_K[..., k] * _interval(kinds[k], y - means_K[..., k],
                                  scales_K[..., k])
          for k in range(len(kinds)))
  return jnp.maximum(p, P_MIN)


def default_scale_table(levels: int = 64, s_min: float = SCALE_MIN,
                        s_max: float = 256.0) -> np.ndarray:
  """Log-spaced scales (CompressAI's 64 levels from 0.11 to 256)."""
  return np.exp(np.linspace(np.log(s_min), np.log(s_max), levels))


def scale_index(scale, table: np.ndarray):
  """Index of the smallest table scale >= scale (clipped to the table):
  rounding up never makes the coding model narrower than the prediction."""
  idx = jnp.searchsorted(jnp.asarray(table, jnp.float32),
                         jnp.asarray(scale, jnp.float32), side="left")
  return jnp.clip(idx, 0, len(table) - 1).astype(jnp.int32)


def _cdf_np(kind: str, x):
  if kind == "gaussian":
    return 0.5 * special.erfc(-x / np.sqrt(2.0))
  if kind == "laplace":
    return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0)),
                    1.0 - 0.5 * np.exp(-np.maximum(x, 0)))
  if kind == "logistic":
    return special.expit(x)
  raise ValueError(f"unknown distribution {kind!r}; use one of {KINDS}")


def pmf_np(kind: str, v: np.ndarray, scale: float) -> np.ndarray:
  """Float64 discretised PMF at integers v (host side, for coding tables)."""
  s = max(float(scale), SCALE_MIN)
  a = np.abs(v.astype(np.float64))
  return _cdf_np(kind, (0.5 - a) / s) - _cdf_np(kind, (-0.5 - a) / s)
