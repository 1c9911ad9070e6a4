"""Target densities with closed-form p_t = p0 * N(0, t I) and score.

M: points, D: dimension, K: mixture components.

- `mixture`: isotropic Gaussian mixture (the brief's anchor:
  0.5 N(-2 e1, 0.25 I) + 0.5 N(2 e1, 0.25 I)); p_t is the same mixture with
  variance var + t.
- `biweight`: product of p0(x) = 15/16 (1 - x^2)^2 on [-1, 1], a Sobolev
  density (H^beta for every beta < 5/2, so beta = 2 holds) with compact
  support that vanishes at its boundary: no lower bound on the support. p_t
  by 1-D Gauss-Legendre quadrature (exact for the polynomial part up to the
  Gaussian factor; 400 nodes resolve t >= 1e-4).
- `x2gauss`: product of p0(x) = x^2 phi(x), smooth on R and zero at x = 0 (no
  lower bound inside the support); p_t(x) = phi_{1+t}(x) ((x/(1+t))^2 +
  t/(1+t)) in closed form.
Every method works in numpy float64 (the truth side of every experiment).
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
from scipy import special

_LOG2PI = np.log(2.0 * np.pi)


@dataclasses.dataclass(frozen=True)
class Target(abc.ABC):
  """A target density p0 on R^D and its Gaussian smoothings p_t."""

  name: str
  dim: int
  beta: float  # Smoothness used by the theory's schedule.

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    raise NotImplementedError

  @abc.abstractmethod
  def log_pt(self, x_MD: np.ndarray, t: float) -> np.ndarray:
    raise NotImplementedError

  @abc.abstractmethod
  def score(self, x_MD: np.ndarray, t: float) -> np.ndarray:
    raise NotImplementedError

  @abc.abstractmethod
  def pdf0(self, x_MD: np.ndarray) -> np.ndarray:
    """p0 itself (for TV at t0)."""
    raise NotImplementedError

  def sample_pt(self, rng: np.random.Generator, n: int, t: float):
    x = self.sample(rng, n)
    return x + np.sqrt(t) * rng.standard_normal(x.shape)


@dataclasses.dataclass(frozen=True)
class Mixture(Target):
  means_KD: tuple = ((-2.0,), (2.0,))
  weights_K: tuple = (0.5, 0.5)
  var: float = 0.25

  def _m(self):
    m = np.asarray(self.means_KD, np.float64)
    if m.shape[1] != self.dim:  # Pad the 1-D anchor means to D dimensions.
      m = np.concatenate([m, np.zeros((m.shape[0], self.dim - m.shape[1]))], 1)
    return m, np.asarray(self.weights_K, np.float64)

  def sample(self, rng, n):
    m, w = self._m()
    k = rng.choice(len(w), size=n, p=w)
    return m[k] + np.sqrt(self.var) * rng.standard_normal((n, self.dim))

  def _comp_logp(self, x_MD, v):
    m, w = self._m()
    sq_MK = ((x_MD[:, None, :] - m[None]) ** 2).sum(-1)
    return (np.log(w)[None] - sq_MK / (2 * v)
            - 0.5 * self.dim * (_LOG2PI + np.log(v)))

  def log_pt(self, x_MD, t):
    return special.logsumexp(self._comp_logp(x_MD, self.var + t), axis=1)

  def score(self, x_MD, t):
    v = self.var + t
    lp_MK = self._comp_logp(x_MD, v)
    r_MK = np.exp(lp_MK - special.logsumexp(lp_MK, axis=1, keepdims=True))
    m, _ = self._m()
    return (r_MK @ m - x_MD) / v

  def pdf0(self, x_MD):
    return np.exp(self.log_pt(x_MD, 0.0))


class _Product(Target):
  """Product of a 1-D density over D coordinates."""

  @abc.abstractmethod
  def _lp1(self, x, t):  # log p_t per coordinate, elementwise.
    raise NotImplementedError

  @abc.abstractmethod
  def _s1(self, x, t):  # d/dx log p_t per coordinate.
    raise NotImplementedError

  def log_pt(self, x_MD, t):
    return self._lp1(x_MD, t).sum(-1)

  def score(self, x_MD, t):
    return self._s1(x_MD, t)

  def pdf0(self, x_MD):
    return np.exp(self.log_pt(x_MD, 0.0))


_GL_X, _GL_W = np.polynomial.legendre.leggauss(400)


@dataclasses.dataclass(frozen=True)
class Biweight(_Product):

  def sample(self, rng, n):
    return 2.0 * rng.beta(3.0, 3.0, size=(n, self.dim)) - 1.0

  def _p1(self, x, t):
    if t == 0.0:
      return np.where(np.abs(x) < 1, 15 / 16 * (1 - x * x) ** 2, 0.0), None
    # Integrate over the support, split into panels so that the Gaussian
    # (sd sqrt(t)) is resolved wherever it sits.
    panels = max(1, int(np.ceil(2.0 / (4.0 * np.sqrt(t)))))
    edges = np.linspace(-1.0, 1.0, panels + 1)
    p = np.zeros_like(x)
    dp = np.zeros_like(x)
    for a, b in zip(edges[:-1], edges[1:]):
      y = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
      w = 0.5 * (b - a) * _GL_W * 15 / 16 * (1 - y * y) ** 2
      u = x[..., None] - y
      g = np.exp(-u * u / (2 * t)) / np.sqrt(2 * np.pi * t)
      p += (g * w).sum(-1)
      dp += (g * w * (-u / t)).sum(-1)
    return p, dp

  def _lp1(self, x, t):
    with np.errstate(divide="ignore"):
      return np.log(self._p1(x, t)[0])

  def _s1(self, x, t):
    p, dp = self._p1(x, t)
    return dp / np.maximum(p, 1e-300)


@dataclasses.dataclass(frozen=True)
class X2Gauss(_Product):

  def sample(self, rng, n):
    # |X| ~ chi with 3 degrees of freedom, random sign: density x^2 phi(x).
    r = np.sqrt(rng.chisquare(3.0, size=(n, self.dim)))
    return r * rng.choice([-1.0, 1.0], size=(n, self.dim))

  def _lp1(self, x, t):
    v = 1.0 + t
    with np.errstate(divide="ignore"):
      return (-x * x / (2 * v) - 0.5 * (_LOG2PI + np.log(v))
              + np.log((x / v) ** 2 + t / v))

  def _s1(self, x, t):
    v = 1.0 + t
    q = (x / v) ** 2 + t / v
    return -x / v + (2 * x / v**2) / np.maximum(q, 1e-300)


def make(name: str, dim: int = 1, beta: float = 2.0) -> Target:
  """A target by name: 'mixture', 'biweight' or 'x2gauss'."""
  if dim < 1:
    raise ValueError(f"dim must be >= 1, got {dim}")
  if name == "mixture":
    return Mixture(name, dim, beta)
  if name == "biweight":
    return Biweight(name, dim, beta)
  if name == "x2gauss":
    return X2Gauss(name, dim, beta)
  raise ValueError(f"unknown target {name!r}; use 'mixture', 'biweight' or "
                   "'x2gauss'")
