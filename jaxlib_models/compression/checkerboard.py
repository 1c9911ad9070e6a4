"""Checkerboard utilities and Fu et al.'s improved checkerboard context
(arXiv 2309.02529 §III-B; He et al. 2021 checkerboard, arXiv 2103.15306).

h/w: latent grid, M: latent channels, K: mixture components, C: parameter
channels. Anchors are A = {(r, c): r + c odd} (the MLIC++ `ckbd`
convention, brief learned_image_compression.md §2.1), non-anchors the rest.
`squeeze` keeps, row by row, the w/2 positions of one set ((..., h, w, C) ->
(..., h, w/2, C)); `unsqueeze` is its inverse with zeros elsewhere.

Fu et al.'s two parameter networks (structure reconstructed, brief §2.3):
anchors EP_a(psi) from the hyperprior only; non-anchors EP_n(cat(psi, ctx))
with ctx = 5x5 convolution over the anchor-only map of y^. Each set has its
own probability family (`anchor_family`, `nonanchor_family`): a single kind
(coded with the scale table, q = round(y - mu)) or a mixture ("gmm",
"gllmm"; coded as q = round(y) with per-symbol rows from snapped
parameters, brief §2.4 rule 2). Training uses the merged likelihood of both
sets. Real coding (`Coder`) runs in two passes, anchors then non-anchors,
every coder input computed from decoded quantities; with channel skipping
(Fu technique 4) channels whose q is zero in both sets are not coded and an
M-bit occupancy bitmap goes into the file header.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import coder, entropy, serial


def anchor_mask(h: int, w: int) -> np.ndarray:
  """(h, w) bool, True on anchors (r + c odd)."""
  r, c = np.mgrid[:h, :w]
  return (r + c) % 2 == 1


def nonanchor_mask(h: int, w: int) -> np.ndarray:
  return ~anchor_mask(h, w)


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def _odd_slot(h: int, anchor: bool, lead: int) -> np.ndarray:
  """(1,) * lead + (h, 1, 1) bool: True where row r's set sits at odd
  columns."""
  # Anchors: r + c odd, so c odd on even rows; non-anchors the other way.
  rows = np.arange(h)
  odd = (rows % 2 == 0) if anchor else (rows % 2 == 1)
  return odd.reshape((1,) * lead + (h, 1, 1))


def squeeze(x, anchor: bool):
  """(..., h, w, C) -> (..., h, w/2, C): the positions of one set, row by
  row in column order (numpy or jax input)."""
  *lead, h, w, c = x.shape
  if w % 2:
    raise ValueError(f"checkerboard squeeze needs an even width, got {w}")
  xp = _xp(x)
  pairs = x.reshape(tuple(lead) + (h, w // 2, 2, c))
  odd = _odd_slot(h, anchor, len(lead))
  return xp.where(odd, pairs[..., 1, :], pairs[..., 0, :])


def unsqueeze(xs, anchor: bool):
  """(..., h, w/2, C) -> (..., h, w, C), zeros on the other set."""
  *lead, h, w2, c = xs.shape
  xp = _xp(xs)
  odd = _odd_slot(h, anchor, len(lead))
  zero = xp.zeros_like(xs)
  pairs = xp.stack([xp.where(odd, zero, xs), xp.where(odd, xs, zero)], -2)
  return pairs.reshape(tuple(lead) + (h, 2 * w2, c))


class CheckerboardContext(nn.Module):
  """Two parameter networks and the checkerboard context (params under
  `context_prediction`, `ep_anchor`, `ep_nonanchor`).

  Defaults anchor_family="gmm" (K=3) and nonanchor_family="gaussian":
  which set gets which model in the paper is unknown (paper value unknown,
  brief §2.3 library choice).
  """

  M: int
  anchor_family: str = "gmm"
  nonanchor_family: str = "gaussian"
  K: int = 3  # Mixture components (paper value unknown).

  def setup(self):
    m, k = self.M, self.K
    self.context_prediction = nn.Conv(2 * m, (5, 5), padding="SAME")
    self.ep_anchor = serial.EntropyParameters(
        entropy.param_channels(self.anchor_family, m, k), serial.ep_hidden(m))
    self.ep_nonanchor = serial.EntropyParameters(
        entropy.param_channels(self.nonanchor_family, m, k),
        serial.ep_hidden(m))

  def anchor_raw(self, psi):
    """EP_a(psi): raw parameter channels at every position."""
    return self.ep_anchor(psi)

  def nonanchor_raw(self, psi, y_hat):
    """EP_n(cat(psi, ctx)), ctx = conv5x5 of y^ restricted to anchors."""
    h, w = y_hat.shape[-3], y_hat.shape[-2]
    amask = jnp.asarray(anchor_mask(h, w), y_hat.dtype)[None, :, :, None]
    ctx = self.context_prediction(y_hat * amask)
    return self.ep_nonanchor(jnp.concatenate([psi, ctx], -1))

  def __call__(self, y_BhwM, psi_Bhw2M, rng=None, training: bool = False):
    """(y^, likelihood of y), both sets merged."""
    m, k = self.M, self.K
    fa, fn = self.anchor_family, self.nonanchor_family
    pa = entropy.split_params(self.anchor_raw(psi_Bhw2M), fa, m, k)
    yh_a = entropy.family_quantize(y_BhwM, pa, fa, training)
    pn = entropy.split_params(self.nonanchor_raw(psi_Bhw2M, yh_a), fn, m, k)
    yh_n = entropy.family_quantize(y_BhwM, pn, fn, training)
    h, w = y_BhwM.shape[-3], y_BhwM.shape[-2]
    amask = jnp.asarray(anchor_mask(h, w))[None, :, :, None]
    y_hat = jnp.where(amask, yh_a, yh_n)
    if training:
      if rng is None:
        raise ValueError("training=True needs an rng for the noise")
      v = y_BhwM + jax.random.uniform(rng, y_BhwM.shape, y_BhwM.dtype, -0.5,
                                      0.5)
      va = vn = v
    else:
      va, vn = yh_a, yh_n
    lik = jnp.where(amask, entropy.family_likelihood(va, pa, fa, k),
                    entropy.family_likelihood(vn, pn, fn, k))
    return y_hat, lik


@dataclasses.dataclass
class _Set:
  """Coding parameters of one set: integers only reach the coder."""

  family: str
  ints: tuple  # (index,) (h, w/2, M) or (wq, mq, sq) (h, w/2, M, K).
  shift: np.ndarray | None  # Means (single kinds); None: q = round(y).

  def symbols(self, y_sq) -> np.ndarray:
    y_sq = np.asarray(y_sq, np.float32)
    r = y_sq if self.shift is None else y_sq - self.shift
    return np.round(r).astype(np.int64)

  def dequantize(self, q) -> np.ndarray:
    if self.shift is None:
      return q.astype(np.float32)
    return (q + self.shift).astype(np.float32)


class Coder:
  """Two-pass range coding of y for a `CheckerboardContext`."""

  def __init__(self, module: CheckerboardContext,
               scales: np.ndarray | None = None,
               grid: entropy.MixtureGrid = entropy.MixtureGrid()):
    self.module, self.grid = module, grid
    self.scales = np.asarray(entropy.default_scale_table() if scales is None
                             else scales, np.float64)
    self.tables = {f: coder.CodingTable.build(f, self.scales)
                   for f in (module.anchor_family, module.nonanchor_family)
                   if not entropy.is_mixture(f)}

  def _coding(self, raw_hwC, family):
    prm = entropy.split_params(raw_hwC, family, self.module.M, self.module.K)
    if entropy.is_mixture(family):
      return entropy.quantize_mixture(prm, self.scales, self.grid), None
    return (entropy.scale_index(prm["scales"], self.scales),), prm["means"]

  @functools.cached_property
  def fns(self):
    """Jitted (params, psi) -> anchors' coding parameters and (params, psi,
    y^ of anchors (h, w/2, M)) -> non-anchors' (squeezed, batch 1)."""
    mod = self.module

    def anchors(p, psi):
      raw = mod.apply({"params": p}, psi, method="anchor_raw")
      return self._coding(squeeze(raw[0], True), mod.anchor_family)

    def nonanchors(p, psi, yh_a):
      y_map = unsqueeze(yh_a, True)[None]
      raw = mod.apply({"params": p}, psi, y_map, method="nonanchor_raw")
      return self._coding(squeeze(raw[0], False), mod.nonanchor_family)

    return jax.jit(anchors), jax.jit(nonanchors)

  def _set(self, out, family) -> _Set:
    ints, shift = out
    return _Set(family, tuple(np.asarray(a) for a in ints),
                None if shift is None else np.asarray(shift, np.float32))

  def _encode_set(self, enc, q, st: _Set, occ):
    if st.shift is None:
      wq, mq, sq = (a[..., occ, :] for a in st.ints)
      k = wq.shape[-1]
      enc.mixture(q[..., occ].ravel(), wq.reshape(-1, k), mq.reshape(-1, k),
                  sq.reshape(-1, k),
                  entropy.mixture_kinds(st.family, k), self.scales,
                  self.grid)
    else:
      enc.table(q[..., occ], st.ints[0][..., occ], self.tables[st.family])

  def _decode_set(self, dec, st: _Set, occ) -> np.ndarray:
    shape = st.ints[0].shape[:3]
    q = np.zeros(shape, np.int64)
    if st.shift is None:
      wq, mq, sq = (a[..., occ, :] for a in st.ints)
      k = wq.shape[-1]
      vals = dec.mixture(wq.reshape(-1, k), mq.reshape(-1, k),
                         sq.reshape(-1, k),
                         entropy.mixture_kinds(st.family, k), self.scales,
                         self.grid)
      q[..., occ] = vals.reshape(shape[:2] + (-1,))
    else:
      q[..., occ] = dec.table(st.ints[0][..., occ], self.tables[st.family])
    return q

  def encode_y(self, p, y, psi, skip: bool = False):
    """(stream bytes, occupancy (M,) bool or None, y^ (1, h, w, M)) for
    latents y (1, h, w, M) and psi (1, h, w, 2M)."""
    mod = self.module
    anchors, nonanchors = self.fns
    y = np.asarray(y, np.float32)[0]
    psi = jnp.asarray(psi)
    sa = self._set(anchors(p, psi), mod.anchor_family)
    qa = sa.symbols(squeeze(y, True))
    yh_a = sa.dequantize(qa)
    sn = self._set(nonanchors(p, psi, jnp.asarray(yh_a)),
                   mod.nonanchor_family)
    qn = sn.symbols(squeeze(y, False))
    yh_n = sn.dequantize(qn)
    if skip:
      occ = (qa != 0).any((0, 1)) | (qn != 0).any((0, 1))
    else:
      occ = np.ones(mod.M, bool)
    enc = coder.StreamEncoder()
    self._encode_set(enc, qa, sa, occ)
    self._encode_set(enc, qn, sn, occ)
    y_hat = unsqueeze(yh_a, True) + unsqueeze(yh_n, False)
    return enc.finish(), (occ if skip else None), y_hat[None]

  def decode_y(self, p, data: bytes, psi, occ=None):
    """y^ (1, h, w, M) float32 from `encode_y`'s stream."""
    mod = self.module
    anchors, nonanchors = self.fns
    occ = np.ones(mod.M, bool) if occ is None else np.asarray(occ, bool)
    psi = jnp.asarray(psi)
    dec = coder.StreamDecoder(data)
    sa = self._set(anchors(p, psi), mod.anchor_family)
    yh_a = sa.dequantize(self._decode_set(dec, sa, occ))
    sn = self._set(nonanchors(p, psi, jnp.asarray(yh_a)),
                   mod.nonanchor_family)
    yh_n = sn.dequantize(self._decode_set(dec, sn, occ))
    dec.finish()
    return (unsqueeze(yh_a, True) + unsqueeze(yh_n, False))[None]
