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

import dataclasses

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


# Families of the context models' conditionals: a single kind (coded with a
# scale table, mean trick) or a mixture (coded with per-symbol rows).
MIXTURES = {"gmm": ("gaussian",), "gllmm": ("gaussian", "laplace", "logistic")}
FAMILIES = KINDS + tuple(MIXTURES)


def is_mixture(family: str) -> bool:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
  return family in MIXTURES


def mixture_kinds(family: str, k: int) -> tuple[str, ...]:
  """Component kinds of a K-component mixture (gllmm cycles G, L, logistic)."""
  base = MIXTURES[family]
  return tuple(base[i % len(base)] for i in range(k))


def param_channels(family: str, m: int, k: int) -> int:
  """Output channels of a parameter network for `family` over M latents:
  2M (scales, means) or 3KM (scales, means, logits), scales first."""
  return 3 * k * m if is_mixture(family) else 2 * m


def split_params(raw, family: str, m: int, k: int) -> dict:
  """Parameter-network output (..., C) -> dict(scales, means[, logits]);
  single kinds give (..., M), mixtures (..., M, K). Channel layout: scales
  block first, then means, then logits; inside a mixture block component k
  holds channels k*M .. (k+1)*M - 1."""
  if raw.shape[-1] != param_channels(family, m, k):
    raise ValueError(f"{raw.shape[-1]} parameter channels, {family} with "
                     f"M={m}, K={k} needs {param_channels(family, m, k)}")
  if not is_mixture(family):
    scales, means = jnp.split(raw, 2, axis=-1)
    return {"scales": scales, "means": means}
  blocks = jnp.split(raw, 3, axis=-1)
  names = ("scales", "means", "logits")
  lead = raw.shape[:-1]
  return {n: jnp.moveaxis(b.reshape(lead + (k, m)), -2, -1)
          for n, b in zip(names, blocks)}


def family_quantize(y, prm: dict, family: str, training: bool):
  """y^ seen by synthesis and context: single kinds STE-round(y - mu) + mu
  (test: round(y - mu) + mu), mixtures STE-round(y) (test: round(y)): a
  mixture has no single mean to subtract (brief §2.3)."""
  shift = 0.0 if is_mixture(family) else prm["means"]
  r = y - shift
  if training:
    return r + jax.lax.stop_gradient(jnp.round(r) - r) + shift
  return jnp.round(r) + shift


def family_likelihood(v, prm: dict, family: str, k: int):
  """P of (noisy or rounded) values v (..., M) under the set's family."""
  if not is_mixture(family):
    return likelihood(v, prm["means"], prm["scales"], family)
  return mixture_likelihood(v, prm["means"], prm["scales"], prm["logits"],
                            mixture_kinds(family, k))


def interval_np(kind: str, d: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """Float64 mass of [d - 1/2, d + 1/2] under the zero-mean `kind` with
  per-element scales (host side; stable side as in `_interval`)."""
  s = np.maximum(np.asarray(scale, np.float64), SCALE_MIN)
  a = np.abs(np.asarray(d, np.float64))
  return _cdf_np(kind, (0.5 - a) / s) - _cdf_np(kind, (-0.5 - a) / s)


@dataclasses.dataclass(frozen=True)
class MixtureGrid:
  """Fixed grids that mixture parameters are snapped to before coding (brief
  §2.4 rule 2): only these integers reach the host-side PMF rows, which are
  rebuilt from them in float64 on both sides. Library choice."""

  weight_levels: int = 64  # pi_k snapped to multiples of 1/64.
  mean_step: float = 1.0 / 16  # mu_k snapped to multiples of 1/16 (2^-n).
  mean_max: float = 1024.0  # |mu_k| clipped here first.
  window: float = 8.0  # PMF rows span min(mu - 8 s) .. max(mu + 8 s).

  def __post_init__(self):
    if self.weight_levels < 1:
      raise ValueError(f"{self.weight_levels=} must be >= 1")
    if self.mean_step <= 0 or self.window <= 0:
      raise ValueError(f"{self.mean_step=} and {self.window=} must be > 0")


def quantize_mixture(prm: dict, table: np.ndarray, grid: MixtureGrid):
  """(weight levels, mean steps, scale indexes), int32 (..., M, K), from the
  float mixture parameters (jittable; deterministic given its inputs)."""
  w = jax.nn.softmax(prm["logits"], axis=-1)
  wq = jnp.round(w * grid.weight_levels).astype(jnp.int32)
  mu = jnp.clip(prm["means"], -grid.mean_max, grid.mean_max)
  mq = jnp.round(mu / grid.mean_step).astype(jnp.int32)
  return wq, mq, scale_index(prm["scales"], table)
