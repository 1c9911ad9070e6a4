"""Mean-scale hyperprior codec (Balle et al. 2018; Minnen et al. 2018), NHWC.

B: batch, H/W: pixels, N: hyper channels, M: latent channels.
g_a: 4 x (conv5 s2, GDN between); g_s mirrors it with inverse GDN; h_a:
conv3 s1, conv5 s2, conv5 s2 (leaky ReLU); h_s: deconv5 s2, deconv5 s2,
conv3 s1 -> 2M channels split (scales, means) in that order (brief
learned_image_compression.md §2.1). Training: noisy y for the likelihood,
STE-rounded y - mu + mu for the synthesis; test: q = round(y - mu).

Context models are opt-in (`HyperpriorConfig.context`): "checkerboard"
(Fu et al.'s improved checkerboard, `checkerboard.py`, params under `ckbd`)
or "serial" (Minnen 2018 autoregressive, `serial.py`, params under
`serial`); both take psi = cat(scales, means) of h_s. With every new field
at its default the parameter tree and outputs are those of the plain
hyperprior.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlib_models.compression import (bottleneck, checkerboard, entropy,
                                       serial)

CONTEXTS = ("none", "checkerboard", "serial")


# g_s stages whose input and output shapes agree (the IGDNs).
SYNTHESIS_BYPASSABLE = ("g_s_igdn0", "g_s_igdn1", "g_s_igdn2")


@dataclasses.dataclass(frozen=True)
class HyperpriorConfig:
  """Channel widths, the conditional's family and the context model.

  Every field after `kind` is opt-in: its default reproduces the plain
  mean-scale hyperprior (parameter tree, outputs, .jlic v1 files, model id).
  """

  N: int = 128  # Transform / hyper channels.
  M: int = 192  # Latent channels.
  kind: str = "gaussian"  # Conditional family of y ("none", "serial").
  # Context model: "none" (hyperprior only), "checkerboard" (Fu et al.'s
  # two parameter networks) or "serial" (Minnen 2018 masked 5x5 AR).
  context: str = "none"
  # Checkerboard families per set, from entropy.FAMILIES (single kinds or
  # "gmm" / "gllmm" mixtures). Paper value unknown: library default gmm for
  # anchors (no spatial context), gaussian for non-anchors (brief §2.3).
  anchor_family: str = "gmm"
  nonanchor_family: str = "gaussian"
  mixture_components: int = 3  # K of the mixtures (paper value unknown).
  # Channel skipping (Fu technique 4): write an M-bit occupancy bitmap and
  # code only channels with a non-zero symbol (context models only).
  skip_channels: bool = False
  # Training only (not part of the model id): weight alpha_1 of the L1 term
  # alpha_1 * sum|y^| / (H W) that drives whole channels to zero (Fu
  # preset 0.01, paper value unknown).
  l1_weight: float = 0.0
  # Width of g_s (distillation students); None = N.
  N_dec: int | None = None
  # Synthesis stages replaced by the identity (pruned students, KD step
  # iii); part of the model id, so a pruned decoder has its own .jlic files.
  # Only shape-preserving stages qualify (`SYNTHESIS_BYPASSABLE`); their
  # parameters are absent from a pruned model (`distill.prune_params`).
  synthesis_bypass: tuple[str, ...] = ()

  def __post_init__(self):
    if self.N < 1 or self.M < 1:
      raise ValueError(f"N={self.N}, M={self.M} must be >= 1")
    if self.kind not in entropy.KINDS:
      raise ValueError(f"kind={self.kind!r}; use one of {entropy.KINDS}")
    if self.context not in CONTEXTS:
      raise ValueError(f"context={self.context!r}; use one of {CONTEXTS}")
    for f in (self.anchor_family, self.nonanchor_family):
      if f not in entropy.FAMILIES:
        raise ValueError(f"family {f!r}; use one of {entropy.FAMILIES}")
    if self.mixture_components < 1:
      raise ValueError(f"{self.mixture_components=} must be >= 1")
    if self.skip_channels and self.context == "none":
      raise ValueError("skip_channels needs a context model (the plain "
                       "hyperprior writes .jlic v1 files without a bitmap)")
    if self.l1_weight < 0:
      raise ValueError(f"{self.l1_weight=} must be >= 0")
    if self.N_dec is not None and self.N_dec < 1:
      raise ValueError(f"{self.N_dec=} must be >= 1 or None")
    object.__setattr__(self, "synthesis_bypass",
                       tuple(self.synthesis_bypass))
    bad = [b for b in self.synthesis_bypass if b not in SYNTHESIS_BYPASSABLE]
    if bad:
      raise ValueError(f"synthesis_bypass {bad}: only the shape-preserving"
                       f" stages {SYNTHESIS_BYPASSABLE} can be bypassed")

  @property
  def decoder_width(self) -> int:
    return self.N if self.N_dec is None else self.N_dec


class GDN(nn.Module):
  """Generalised divisive normalisation (inverse=True: IGDN)."""

  inverse: bool = False

  @nn.compact
  def __call__(self, x_BHWC):
    c = x_BHWC.shape[-1]
    beta = self.param("beta", nn.initializers.ones, (c,))
    gamma = self.param("gamma", lambda k, s: 0.1 * jnp.eye(s[0]), (c, c))
    # Non-negative by squaring a bounded raw value (CompressAI-style).
    b = jnp.maximum(beta, 1e-3) ** 2
    g = jnp.maximum(gamma, 0.0) ** 2
    norm = jnp.sqrt(b + jnp.einsum("BHWC,CD->BHWD", x_BHWC ** 2, g))
    return x_BHWC * norm if self.inverse else x_BHWC / norm


def _conv(c, k, s, name):
  return nn.Conv(c, (k, k), strides=(s, s), padding="SAME", name=name)


def _deconv(c, k, s, name):
  return nn.ConvTranspose(c, (k, k), strides=(s, s), padding="SAME",
                          name=name)


# out[2i + a] = sum over taps t with a + t odd of K[t] x[i + (a + t - 3) / 2]
# for lax.conv_transpose(k=5, s=2, "SAME") (pads 3 before, 2 after the
# 2x-dilated input): phase a, 3-tap offset u - 1 -> kernel tap (None: zero).
_PHASE_TAPS = ((1, 3, None), (0, 2, 4))


class SubpixelConvTranspose(nn.ConvTranspose):
  """A 5x5 stride-2 "SAME" transposed convolution computed as one 3x3
  convolution to 4x the channels plus depth-to-space.

  Same parameters (names, shapes, init) and the same function as
  nn.ConvTranspose(features, (5, 5), strides=(2, 2), padding="SAME"), to
  float rounding. XLA:CPU runs the transposed convolution as a convolution
  over the zero-dilated input (4x the positions, most taps multiplying
  zeros); this form does 36/100 of those multiply-adds and measured ~2x
  faster on g_s (benchmarks/RESULTS.md, learned codec). Used for the
  synthesis transform only, so the entropy-parameter path (h_s), and hence
  every bitstream, is unchanged.
  """

  @nn.compact
  def __call__(self, x):
    if (tuple(self.kernel_size) != (5, 5) or tuple(self.strides) != (2, 2)
        or self.padding != "SAME"):
      raise ValueError("SubpixelConvTranspose is 5x5, stride 2, SAME only")
    c, d = x.shape[-1], self.features
    kernel = self.param("kernel", self.kernel_init, (5, 5, c, d),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (d,), self.param_dtype)
    zero = jnp.zeros((c, d), kernel.dtype)
    phases = []
    for a in range(2):
      for b in range(2):
        rows = []
        for u in range(3):
          ta = _PHASE_TAPS[a][u]
          rows.append(jnp.stack([
              zero if ta is None or _PHASE_TAPS[b][v] is None
              else kernel[ta, _PHASE_TAPS[b][v]] for v in range(3)]))
        phases.append(jnp.stack(rows))  # (3, 3, C, D)
    k3 = jnp.concatenate(phases, axis=-1)  # (3, 3, C, 4D): (a, b) major
    y = jax.lax.conv_general_dilated(
        x, k3.astype(x.dtype), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    bsz, h, w, _ = y.shape
    y = y.reshape(bsz, h, w, 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(bsz, 2 * h, 2 * w, d) + bias


def _subpixel_deconv(c, name):
  return SubpixelConvTranspose(c, (5, 5), strides=(2, 2), padding="SAME",
                               name=name)


class Hyperprior(nn.Module):
  cfg: HyperpriorConfig

  def setup(self):
    n, m = self.cfg.N, self.cfg.M
    self.g_a = [_conv(n, 5, 2, "g_a0"), GDN(name="g_a_gdn0"),
                _conv(n, 5, 2, "g_a1"), GDN(name="g_a_gdn1"),
                _conv(n, 5, 2, "g_a2"), GDN(name="g_a_gdn2"),
                _conv(m, 5, 2, "g_a3")]
    nd = self.cfg.decoder_width
    self.g_s = [_subpixel_deconv(nd, "g_s0"), GDN(True, name="g_s_igdn0"),
                _subpixel_deconv(nd, "g_s1"), GDN(True, name="g_s_igdn1"),
                _subpixel_deconv(nd, "g_s2"), GDN(True, name="g_s_igdn2"),
                _subpixel_deconv(3, "g_s3")]
    self.h_a = [_conv(n, 3, 1, "h_a0"), _conv(n, 5, 2, "h_a1"),
                _conv(n, 5, 2, "h_a2")]
    self.h_s = [_deconv(m, 5, 2, "h_s0"), _deconv(m * 3 // 2, 5, 2, "h_s1"),
                _conv(2 * m, 3, 1, "h_s2")]
    self.entropy_bottleneck = bottleneck.EntropyBottleneck(n)
    c = self.cfg
    if c.context == "checkerboard":
      self.ckbd = checkerboard.CheckerboardContext(
          m, c.anchor_family, c.nonanchor_family, c.mixture_components)
    elif c.context == "serial":
      self.serial = serial.SerialContext(m, c.kind)

  def analysis(self, x_BHW3):
    h = x_BHW3
    for layer in self.g_a:
      h = layer(h)
    return h

  def synthesis(self, y_BhwM):
    h = y_BhwM
    for layer in self.g_s:
      if layer.name not in self.cfg.synthesis_bypass:
        h = layer(h)
    return h

  def hyper_analysis(self, y_BhwM):
    h = jnp.abs(y_BhwM)
    for i, layer in enumerate(self.h_a):
      h = layer(h)
      if i < len(self.h_a) - 1:
        h = nn.leaky_relu(h)
    return h

  def hyper_synthesis(self, z_hat):
    """(scales, means), scales first."""
    h = z_hat
    for i, layer in enumerate(self.h_s):
      h = layer(h)
      if i < len(self.h_s) - 1:
        h = nn.leaky_relu(h)
    scales, means = jnp.split(h, 2, axis=-1)
    return scales, means

  def context_model(self):
    """The context submodule (None for context="none")."""
    if self.cfg.context == "checkerboard":
      return self.ckbd
    if self.cfg.context == "serial":
      return self.serial
    return None

  def __call__(self, x_BHW3, rng=None, training: bool = False):
    """Returns dict(x_hat, y_hat, y_lik, z_lik)."""
    y = self.analysis(x_BHW3)
    return self.from_latents(y, self.hyper_analysis(y), rng, training)

  def from_latents(self, y, z, rng=None, training: bool = False):
    """The model after the two analysis transforms: quantization (noise in
    training), likelihoods and synthesis from given latents y and z (the
    encoder-side refinement optimizes them). Same dict as `__call__`."""
    kz = ky = None
    if training:
      if rng is None:
        raise ValueError("training=True needs an rng for the noise")
      kz, ky = jax.random.split(rng)
    z_hat, z_lik = self.entropy_bottleneck(z, kz, training)
    scales, means = self.hyper_synthesis(z_hat)
    if self.cfg.context != "none":
      psi = jnp.concatenate([scales, means], -1)
      y_hat, y_lik = self.context_model()(y, psi, ky, training)
    elif training:
      y_noisy = y + jax.random.uniform(ky, y.shape, y.dtype, -0.5, 0.5)
      y_lik = entropy.likelihood(y_noisy, means, scales, self.cfg.kind)
      r = y - means
      y_hat = r + jax.lax.stop_gradient(jnp.round(r) - r) + means
    else:
      y_hat = jnp.round(y - means) + means
      y_lik = entropy.likelihood(y_hat, means, scales, self.cfg.kind)
    return {"x_hat": self.synthesis(y_hat), "y_hat": y_hat, "y_lik": y_lik,
            "z_lik": z_lik}

  def aux_loss(self):
    return self.entropy_bottleneck.aux_loss()
