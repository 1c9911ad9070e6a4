"""Serial autoregressive context model (Minnen, Balle, Toderici 2018,
"Joint autoregressive and hierarchical priors", NeurIPS; CompressAI's
`mbt2018` read for behaviour), NHWC.

B: batch, h/w: latent grid, M: latent channels. A 5x5 masked convolution
(mask type A: only positions before the current one in raster order) over
y^ gives ctx (2M channels); EP(cat(psi, ctx)) -> 2M channels split (scales,
means), scales first, with psi = h_s(z^) (brief learned_image_compression.md
§2.1). EP = three 1x1 convolutions, widths 10M/3, 8M/3, 2M, leaky ReLU.

Training (library choice, documented): the likelihood sees noisy y + u and
synthesis STE-round(y - mu) + mu, as in the plain hyperprior; the context
path sees STE-round(y), because mu itself depends on the context (the test
path decodes y^ = q + mu position by position instead). Real coding
(`Coder`) is serial at both ends: for each latent position in raster order
one jitted step runs the masked convolution over the padded 5x5 window of
already decoded y^ plus EP, then that position's M symbols q = round(y - mu)
are coded under the Gaussian scale table (index from scale, mean 0; brief
§2.4 rule 1). Encoder and decoder call the same compiled step on the same
shapes with the same decoded inputs, so the indexes agree bit for bit.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import coder, entropy

SIZE = 5  # Context kernel size.


def causal_mask(size: int = SIZE) -> np.ndarray:
  """(size, size) float32: 1 on the positions strictly before the centre in
  raster order (mask type A), 0 on the centre and after."""
  m = np.zeros((size, size), np.float32)
  c = size // 2
  m[:c] = 1.0
  m[c, :c] = 1.0
  return m


def ep_hidden(m: int) -> tuple[int, int]:
  """Hidden widths of the parameter networks (CompressAI mbt2018: 10M/3,
  8M/3)."""
  return (max(1, m * 10 // 3), max(1, m * 8 // 3))


class MaskedConv(nn.Module):
  """size x size convolution whose kernel is multiplied by `causal_mask`."""

  features: int
  size: int = SIZE

  @nn.compact
  def __call__(self, x_BHWC, padding: str = "SAME"):
    c = x_BHWC.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.size, self.size, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    k = kernel * jnp.asarray(causal_mask(self.size))[:, :, None, None]
    out = jax.lax.conv_general_dilated(
        x_BHWC, k, (1, 1), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


class EntropyParameters(nn.Module):
  """Three 1x1 convolutions with leaky ReLU: in -> hidden -> out."""

  out: int
  hidden: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    h = nn.leaky_relu(nn.Conv(self.hidden[0], (1, 1), name="conv0")(x))
    h = nn.leaky_relu(nn.Conv(self.hidden[1], (1, 1), name="conv1")(h))
    return nn.Conv(self.out, (1, 1), name="conv2")(h)


class SerialContext(nn.Module):
  """Masked 5x5 context + entropy parameters (params under
  `context_prediction`, `entropy_parameters`)."""

  M: int
  kind: str = "gaussian"

  def setup(self):
    self.context_prediction = MaskedConv(2 * self.M)
    self.entropy_parameters = EntropyParameters(2 * self.M,
                                                ep_hidden(self.M))

  def params_from_context(self, psi, ctx):
    """(scales, means) = split(EP(cat(psi, ctx)))."""
    raw = self.entropy_parameters(jnp.concatenate([psi, ctx], -1))
    scales, means = jnp.split(raw, 2, axis=-1)
    return scales, means

  def __call__(self, y_BhwM, psi_Bhw2M, rng=None, training: bool = False):
    """(y^, likelihood of y) for training or the batched test path."""
    if training:
      if rng is None:
        raise ValueError("training=True needs an rng for the noise")
      y_ctx = y_BhwM + jax.lax.stop_gradient(jnp.round(y_BhwM) - y_BhwM)
    else:
      y_ctx = jnp.round(y_BhwM)
    scales, means = self.params_from_context(
        psi_Bhw2M, self.context_prediction(y_ctx))
    prm = {"scales": scales, "means": means}
    y_hat = entropy.family_quantize(y_BhwM, prm, self.kind, training)
    if training:
      v = y_BhwM + jax.random.uniform(rng, y_BhwM.shape, y_BhwM.dtype, -0.5,
                                      0.5)
    else:
      v = y_hat
    return y_hat, entropy.family_likelihood(v, prm, self.kind, 1)

  def step(self, window_155M, psi_112M):
    """(scales, means) (1, 1, 1, M) at the centre of a 5x5 window of y^
    (zeros outside the image and at not yet decoded positions): the
    reference for `Coder.step`, which skips the masked-out taps."""
    ctx = self.context_prediction(window_155M, padding="VALID")
    return self.params_from_context(psi_112M, ctx)


class Coder:
  """Position-by-position range coding of y for a `SerialContext`."""

  def __init__(self, module: SerialContext, table: coder.CodingTable):
    if table.kind != module.kind:
      raise ValueError(f"{table.kind} table for a {module.kind} model")
    self.module, self.table = module, table

  @staticmethod
  @jax.jit
  def prepare(p):
    """Step inputs from the context params: the masked kernel restricted to
    its causal taps as a (taps * M, 2M) matrix (done once per image, not
    per position)."""
    k = p["context_prediction"]["kernel"]
    r, c = np.nonzero(causal_mask(k.shape[0]))
    return {"ep": p["entropy_parameters"],
            "kernel": k[r, c].reshape(-1, k.shape[-1]),
            "bias": p["context_prediction"]["bias"]}

  @functools.cached_property
  def step(self):
    """Jitted (prepared params, causal window (taps * M,), psi (2M,)) ->
    (index (M,) int32, mean (M,) float32)."""
    table = self.table.scales
    mod = self.module

    def f(prep, win, psi):
      ctx = win @ prep["kernel"] + prep["bias"]
      scales, means = mod.apply({"params": {"entropy_parameters":
                                            prep["ep"]}},
                                psi[None, None, None], ctx[None, None, None],
                                method="params_from_context")
      return entropy.scale_index(scales[0, 0, 0], table), means[0, 0, 0]

    return jax.jit(f)

  def _loop(self, p, psi, visit):
    """Runs the step over the grid in raster order; visit(r, c, idx, mu)
    returns y^ at (r, c) (M,) float32. Returns y^ (1, h, w, M)."""
    _, h, w, m2 = psi.shape
    m, half = m2 // 2, SIZE // 2
    pad = np.zeros((h + 2 * half, w + 2 * half, m), np.float32)
    psi = np.asarray(psi, np.float32)[0]
    prep, step = self.prepare(p), self.step
    for r in range(h):
      for c in range(w):
        # Causal taps in raster order: rows r-2, r-1 (5 wide), then 2 left.
        win = np.concatenate([pad[r:r + half, c:c + SIZE].ravel(),
                              pad[r + half, c:c + half].ravel()])
        idx, mu = step(prep, win, psi[r, c])
        pad[r + half, c + half] = visit(r, c, np.asarray(idx),
                                        np.asarray(mu))
    return pad[None, half:half + h, half:half + w]

  def encode_y(self, p, y, psi, skip: bool = False):
    """(stream bytes, channel occupancy (M,) bool or None, y^) for latents
    y (1, h, w, M) and hyper parameters psi (1, h, w, 2M)."""
    y = np.asarray(y, np.float32)
    q = np.zeros(y.shape[1:], np.int64)
    idx = np.zeros(y.shape[1:], np.int64)

    def visit(r, c, i, mu):
      q[r, c] = np.round(y[0, r, c] - mu)
      idx[r, c] = i
      return (q[r, c] + mu).astype(np.float32)

    y_hat = self._loop(p, psi, visit)
    occ = (q != 0).any((0, 1)) if skip else np.ones(q.shape[-1], bool)
    enc = coder.StreamEncoder()
    for r in range(q.shape[0]):
      for c in range(q.shape[1]):
        enc.table(q[r, c, occ], idx[r, c, occ], self.table)
    return enc.finish(), (occ if skip else None), y_hat

  def decode_y(self, p, data: bytes, psi, occ=None):
    """y^ (1, h, w, M) float32 from `encode_y`'s stream."""
    dec = coder.StreamDecoder(data)
    m = psi.shape[-1] // 2
    occ = np.ones(m, bool) if occ is None else np.asarray(occ, bool)

    def visit(r, c, i, mu):
      q = np.zeros(m, np.int64)
      q[occ] = dec.table(i[occ], self.table)
      return (q + mu).astype(np.float32)

    y_hat = self._loop(p, psi, visit)
    dec.finish()
    return y_hat
