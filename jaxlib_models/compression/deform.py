"""Modulated deformable convolution (DCNv2) and the deformable residual
module (DRM) of Fu et al. (arXiv 2309.02529), NHWC, by bilinear gathers.

B: batch, H/W: input pixels, h/w: output pixels, C: input channels,
O: output channels, T: kernel taps (kh * kw, row-major), K: kernel side.

For output position (i, j) and tap t = (a, b) the sample point is
  p = (i * stride - pad + a * dilation + dy, j * stride - pad + b * dilation
       + dx),  pad = dilation * (K - 1) // 2 (symmetric, PyTorch/DCN style),
where offsets[..., t, :] = (dy, dx) (rows first). x(p) is bilinear in the
four neighbouring pixels, each counting as zero outside the image; the output
is sum_t m_t * W_t^T x(p_t) + bias with the modulation m_t. JAX has no
deformable convolution, so this gathers the T shifted copies explicitly:
memory is B*h*w*T*C (memory-bound; keep channels small in tests, brief
pitfall 10).

`DeformConv` predicts the 2T offsets and T modulation logits with a regular
conv whose kernel and bias start at zero. Modulation choice (the paper's is
unknown): m = 2 * sigmoid(logit) by default, so a fresh layer has m = 1 and
zero offsets, i.e. it is exactly an ordinary convolution (and a fresh DRM an
ordinary residual block); `modulation="sigmoid"` is DCNv2's original (m = 0.5
at zero init), "none" drops the mask.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

MODULATIONS = ("2sigmoid", "sigmoid", "none")
DRM_LAYOUTS = ("deform_act_conv", "conv_act_deform", "deform_act_deform")


def _out_size(n: int, k: int, stride: int, dilation: int) -> int:
  pad = dilation * (k - 1) // 2
  return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _grid(n_out: int, k: int, stride: int, dilation: int):
  """Undeformed sample coordinates along one axis, shape (n_out, k)."""
  pad = dilation * (k - 1) // 2
  return (jnp.arange(n_out)[:, None] * stride - pad
          + jnp.arange(k)[None, :] * dilation)


def bilinear_sample(x_BHWC: jax.Array, py_BhwT: jax.Array,
                    px_BhwT: jax.Array) -> jax.Array:
  """x at fractional (row, col) points, zero outside: (B, h, w, T, C)."""
  b, hh, ww, c = x_BHWC.shape
  x_BNC = x_BHWC.reshape(b, hh * ww, c)
  y0 = jnp.floor(py_BhwT)
  x0 = jnp.floor(px_BhwT)
  ly, lx = py_BhwT - y0, px_BhwT - x0  # Carry the gradient w.r.t. offsets.
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  gather = jax.vmap(lambda xs_NC, idx_n: xs_NC[idx_n])
  out = jnp.zeros(py_BhwT.shape + (c,), x_BHWC.dtype)
  for dy, wy in ((0, 1.0 - ly), (1, ly)):
    for dx, wx in ((0, 1.0 - lx), (1, lx)):
      yy, xx = y0 + dy, x0 + dx
      inside = (yy >= 0) & (yy < hh) & (xx >= 0) & (xx < ww)
      idx = jnp.clip(yy, 0, hh - 1) * ww + jnp.clip(xx, 0, ww - 1)
      vals = gather(x_BNC, idx.reshape(b, -1)).reshape(out.shape)
      wgt = jnp.where(inside, wy * wx, 0.0).astype(x_BHWC.dtype)
      out = out + vals * wgt[..., None]
  return out


def deform_conv(x_BHWC: jax.Array, kernel_KKCO: jax.Array,
                bias_O: jax.Array | None, offsets_BhwT2: jax.Array,
                mask_BhwT: jax.Array | None = None, *, stride: int = 1,
                dilation: int = 1, precision=None) -> jax.Array:
  """Modulated deformable convolution (DCNv2, Zhu et al. 2019, Eq. 3).

  Args:
    x_BHWC: input.
    kernel_KKCO: weights in Flax's HWIO layout (kh, kw, C, O).
    bias_O: bias or None.
    offsets_BhwT2: per output position and tap, (dy, dx) in pixels.
    mask_BhwT: modulation per position and tap; None means 1.
    stride, dilation: of the sampling grid (padding dilation*(K-1)//2).
    precision: of the final tap contraction (lax precision).

  Returns:
    (B, h, w, O), h = (H + 2 pad - dilation (kh - 1) - 1) // stride + 1.
  """
  b, hh, ww, c = x_BHWC.shape
  kh, kw, kc, o = kernel_KKCO.shape
  if kc != c:
    raise ValueError(f"kernel has {kc} input channels, x has {c}")
  h_out = _out_size(hh, kh, stride, dilation)
  w_out = _out_size(ww, kw, stride, dilation)
  t = kh * kw
  if offsets_BhwT2.shape != (b, h_out, w_out, t, 2):
    raise ValueError(f"offsets shape {offsets_BhwT2.shape}, expected "
                     f"{(b, h_out, w_out, t, 2)}")
  if mask_BhwT is not None and mask_BhwT.shape != (b, h_out, w_out, t):
    raise ValueError(f"mask shape {mask_BhwT.shape}, expected "
                     f"{(b, h_out, w_out, t)}")
  gy_hK = _grid(h_out, kh, stride, dilation)
  gx_wK = _grid(w_out, kw, stride, dilation)
  base_y_hwT = jnp.broadcast_to(gy_hK[:, None, :, None],
                                (h_out, w_out, kh, kw)).reshape(h_out, w_out, t)
  base_x_hwT = jnp.broadcast_to(gx_wK[None, :, None, :],
                                (h_out, w_out, kh, kw)).reshape(h_out, w_out, t)
  dtype = x_BHWC.dtype
  py = base_y_hwT.astype(dtype)[None] + offsets_BhwT2[..., 0]
  px = base_x_hwT.astype(dtype)[None] + offsets_BhwT2[..., 1]
  cols_BhwTC = bilinear_sample(x_BHWC, py, px)
  if mask_BhwT is not None:
    cols_BhwTC = cols_BhwTC * mask_BhwT[..., None]
  out = jnp.einsum("BhwTC,TCO->BhwO", cols_BhwTC,
                   kernel_KKCO.reshape(t, c, o), precision=precision)
  if bias_O is not None:
    out = out + bias_O
  return out


class DeformConv(nn.Module):
  """Modulated deformable conv with learned offsets and modulation.

  Offsets and modulation logits come from a zero-initialised regular conv
  (`conv_offset`, same stride/dilation/padding) whose 3T output channels are
  [T (dy, dx) pairs interleaved | T modulation logits]; see the module
  docstring for the modulation choice.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  use_bias: bool = True
  modulation: str = "2sigmoid"  # "2sigmoid" (1 at init) | "sigmoid" | "none"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  precision: jax.lax.Precision | None = None

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if self.modulation not in MODULATIONS:
      raise ValueError(f"modulation={self.modulation!r}; use {MODULATIONS}")
    k, c = self.kernel_size, x_BHWC.shape[-1]
    t = k * k
    pad = self.dilation * (k - 1) // 2
    n_pred = 2 * t if self.modulation == "none" else 3 * t
    pred = nn.Conv(n_pred, (k, k), strides=(self.stride, self.stride),
                   padding=((pad, pad), (pad, pad)),
                   kernel_dilation=(self.dilation, self.dilation),
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, name="conv_offset")(x_BHWC)
    b, h, w, _ = pred.shape
    offsets = pred[..., :2 * t].reshape(b, h, w, t, 2)
    mask = None
    if self.modulation == "2sigmoid":
      mask = 2.0 * jax.nn.sigmoid(pred[..., 2 * t:])
    elif self.modulation == "sigmoid":
      mask = jax.nn.sigmoid(pred[..., 2 * t:])
    kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,),
                       jnp.float32) if self.use_bias else None)
    return deform_conv(x_BHWC, kernel.astype(x_BHWC.dtype),
                       None if bias is None else bias.astype(x_BHWC.dtype),
                       offsets, mask, stride=self.stride,
                       dilation=self.dilation, precision=self.precision)


class DeformResidualModule(nn.Module):
  """DRM: a residual block with a deformable conv (Fu et al., §III).

  The paper's exact layout is unknown (brief §2.3); `layout` picks one of
  DRM_LAYOUTS, default "deform_act_conv": x + conv(LeakyReLU(deform(x)))
  with 3x3 kernels keeping the channel count. "conv_act_deform" swaps the
  two convs; "deform_act_deform" uses two deformable convs. With zero-init
  offsets and 2*sigmoid modulation a fresh DRM is an ordinary residual block.
  """

  kernel_size: int = 3
  layout: str = "deform_act_conv"
  negative_slope: float = 0.01  # LeakyReLU slope (CompressAI's default).
  modulation: str = "2sigmoid"

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if self.layout not in DRM_LAYOUTS:
      raise ValueError(f"layout={self.layout!r}; use {DRM_LAYOUTS}")
    c, k = x_BHWC.shape[-1], self.kernel_size
    act = functools.partial(nn.leaky_relu, negative_slope=self.negative_slope)

    def conv(name):
      return nn.Conv(c, (k, k), padding="SAME", name=name)

    def dcn(name):
      return DeformConv(c, k, modulation=self.modulation, name=name)

    if self.layout == "deform_act_conv":
      r = conv("conv")(act(dcn("deform")(x_BHWC)))
    elif self.layout == "conv_act_deform":
      r = dcn("deform")(act(conv("conv")(x_BHWC)))
    else:
      r = dcn("deform1")(act(dcn("deform0")(x_BHWC)))
    return x_BHWC + r
