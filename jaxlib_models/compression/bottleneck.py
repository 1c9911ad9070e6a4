"""Factorised prior for the hyper-latent z (Balle et al. 2018, the
"EntropyBottleneck"): a learned monotone CDF per channel.

C: channels, F: filter width. Per channel, c(x) = sigmoid(l(x)) with
l = a small 1 -> 3 -> 3 -> 3 -> 1 network whose layers are
x <- softplus(H) x + b followed (except the last) by x <- x + tanh(a) tanh(x):
softplus weights keep l increasing. P(z^) = c(z^ + 1/2) - c(z^ - 1/2),
evaluated on the side of the median where it is stable (sign flip).
Learned quantiles (aux loss, tail mass 1e-9) give each channel's coding range
and median; z is coded as round(z - median) with a `CodingTable` built once
from these PMFs (brief learned_image_compression.md §2.1, pitfall 5).
Inputs are channel-last (..., C).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import coder, entropy

FILTERS = (3, 3, 3)
TAIL_MASS = 1e-9


class EntropyBottleneck(nn.Module):
  """Per-channel factorised density for channel-last latents."""

  channels: int
  filters: tuple[int, ...] = FILTERS
  init_scale: float = 10.0
  tail_mass: float = TAIL_MASS

  def setup(self):
    dims = (1,) + tuple(self.filters) + (1,)
    scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
    mats, biases, factors = [], [], []
    for i in range(len(dims) - 1):
      init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
      mats.append(self.param(
          f"matrix_{i}", nn.initializers.constant(init),
          (self.channels, dims[i + 1], dims[i])))
      biases.append(self.param(
          f"bias_{i}", lambda k, s: jax.random.uniform(k, s, minval=-0.5,
                                                       maxval=0.5),
          (self.channels, dims[i + 1], 1)))
      if i < len(dims) - 2:
        factors.append(self.param(
            f"factor_{i}", nn.initializers.zeros,
            (self.channels, dims[i + 1], 1)))
    self.mats, self.biases, self.factors = mats, biases, factors
    q = np.array([-self.init_scale, 0.0, self.init_scale], np.float32)
    self.quantiles = self.param(
        "quantiles", lambda k, s: jnp.broadcast_to(jnp.asarray(q), s),
        (self.channels, 1, 3))

  def logits_cdf(self, x_CN, stop_gradient: bool = False):
    """l(x) per channel for x of shape (C, 1, N) -> (C, 1, N)."""
    h = x_CN
    for i in range(len(self.mats)):
      mat, bias = self.mats[i], self.biases[i]
      if stop_gradient:
        mat, bias = jax.lax.stop_gradient(mat), jax.lax.stop_gradient(bias)
      h = jnp.einsum("cij,cjn->cin", nn.softplus(mat), h) + bias
      if i < len(self.factors):
        f = self.factors[i]
        if stop_gradient:
          f = jax.lax.stop_gradient(f)
        h = h + jnp.tanh(f) * jnp.tanh(h)
    return h

  def _flat(self, z):
    c = z.shape[-1]
    if c != self.channels:
      raise ValueError(f"latent has {c} channels, the bottleneck "
                       f"{self.channels}")
    return jnp.moveaxis(z.reshape(-1, c), -1, 0)[:, None, :]  # (C, 1, N)

  def likelihood(self, z_hat):
    """P(z^) of (noisy or rounded) values, shape of z_hat."""
    x = self._flat(z_hat)
    lower = self.logits_cdf(x - 0.5)
    upper = self.logits_cdf(x + 0.5)
    sign = -jnp.sign(lower + upper)
    sign = jnp.where(sign == 0, 1.0, sign)
    p = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
    p = jnp.maximum(p, entropy.P_MIN)
    return jnp.moveaxis(p[:, 0, :], 0, -1).reshape(z_hat.shape)

  def medians(self):
    return jax.lax.stop_gradient(self.quantiles[:, 0, 1])

  def aux_loss(self):
    """Pulls the quantiles to c^-1(tail/2), c^-1(1/2), c^-1(1 - tail/2)."""
    t = float(np.log(2.0 / self.tail_mass - 1.0))
    target = jnp.asarray([-t, 0.0, t])
    logits = self.logits_cdf(self.quantiles, stop_gradient=True)
    return jnp.sum(jnp.abs(logits - target[None, None, :]))

  def __call__(self, z, rng=None, training: bool = False):
    """(z^, likelihood): uniform noise in training, rounding around the
    median at test time."""
    self._flat(z)  # Channel check with a clear message.
    med = self.medians()
    if training:
      if rng is None:
        raise ValueError("training=True needs an rng for the noise")
      z_hat = z + jax.random.uniform(rng, z.shape, z.dtype, -0.5, 0.5)
    else:
      z_hat = jnp.round(z - med) + med
    return z_hat, self.likelihood(z_hat)

  def pmf_table(self):
    """Per channel: (low, PMF over low..high of round(z - median)).

    Called through `apply(..., method=...)`; returns jnp arrays on a common
    padded grid plus the per-channel (low, length), see `coding_table`.
    """
    med = self.medians()
    q = jax.lax.stop_gradient(self.quantiles[:, 0, :])
    low = jnp.floor(q[:, 0] - med).astype(jnp.int32)
    high = jnp.ceil(q[:, 2] - med).astype(jnp.int32)
    return med, low, high


def coding_table(module: EntropyBottleneck, params, max_len: int = 4096):
  """Builds the stored `CodingTable` for z from trained params (host,
  float64 PMFs from the float32 network). Call after training (the
  quantiles must have converged: pitfall 5 of the brief)."""
  med, low, high = module.apply({"params": params}, method="pmf_table")
  med, low, high = map(np.asarray, (med, low, high))
  length = high - low + 1
  if (length > max_len).any() or (length < 1).any():
    raise ValueError(f"coding range of {int(length.max())} symbols; the "
                     "quantiles have not converged (train the aux loss)")
  lmax = int(length.max())
  grid = low[:, None] + np.arange(lmax)[None, :]  # (C, L) offsets.
  vals = jnp.asarray(grid + med[:, None], jnp.float32)  # (C, L) values.
  p = np.asarray(module.apply({"params": params}, jnp.moveaxis(vals, 0, -1),
                              method="likelihood"), np.float64).T
  pmfs = [p[c, :length[c]] for c in range(len(low))]
  return coder.CodingTable.from_pmfs(low, pmfs), med


def encode_z(z, table: coder.CodingTable, medians) -> bytes:
  """Codes channel-last z (..., C) as round(z - median) per channel."""
  z = np.asarray(z)
  q = np.round(z - medians).astype(np.int64)
  idx = np.broadcast_to(np.arange(z.shape[-1]), z.shape)
  return coder.encode(q, idx, table)


def decode_z(data: bytes, shape, table: coder.CodingTable, medians):
  """z^ = q + median, float32, of the given channel-last shape."""
  idx = np.broadcast_to(np.arange(shape[-1]), shape)
  q = coder.decode(data, idx, table)
  return (q + medians).astype(np.float32)
