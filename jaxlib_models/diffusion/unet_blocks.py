"""Building blocks of the SD UNet and ControlNet (diffusers semantics).

Flax linen ports of diffusers 0.39.0's `ResnetBlock2D`, `Downsample2D`,
`Upsample2D`, `Transformer2DModel` (continuous input) with
`BasicTransformerBlock` and a GEGLU `FeedForward`, the `CrossAttnDownBlock2D`
/ `DownBlock2D`, `UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D` /
`UpBlock2D` blocks, and the sinusoidal timestep embedding. Behaviour was read
from diffusers; no code was taken. Submodules carry the PyTorch state-dict
names (`resnets_0/conv1`, `attentions_0/transformer_blocks_0/attn1/to_out_0`,
`ff/net_0/proj`, `downsamplers_0/conv`, ...), so `diffusion.convert` maps
weights mechanically.

Everything is NHWC. Parameters are float32; convolutions, projections and
attention compute in `dtype`; GroupNorm and LayerNorm compute in float32 and
cast back; attention logits and softmax are float32 (`attention.attend`).

B: batch, H/W: height/width, C: channels, N: tokens (H*W), L: context
tokens, D: context width, T: time-embedding width.
"""

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.diffusion.attention import NO_HOOKS, Attention, SelfAttnHooks
from jaxlib_models.diffusion import winograd

Array = jax.Array

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
DTYPES = ("float32", "bfloat16", "float16")
# diffusers' Transformer2DModel hard-codes these (they are not UNet config).
TRANSFORMER_GROUPNORM_EPS = 1e-6
TRANSFORMER_LAYERNORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BlockCommon:
  """Settings shared by every block of one network (static, hashable)."""

  groups: int = 32  # GroupNorm groups of resnets and transformers.
  eps: float = 1e-5  # GroupNorm epsilon of the resnets.
  use_linear_projection: bool = False  # proj_in/out as Dense, not 1x1 conv.
  downsample_padding: int = 1  # 1: pad (1,1); 0: pad (0,1) (bottom/right).
  impl: str = "auto"  # attention.attend backend.
  dtype: str = "float32"  # Compute dtype.


def group_norm(x: Array, groups: int, eps: float, name: str) -> Array:
  """GroupNorm in float32 (two-pass variance), cast back to x's dtype."""
  y = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32,
                   param_dtype=jnp.float32, use_fast_variance=False,
                   name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def layer_norm(x: Array, eps: float, name: str) -> Array:
  """LayerNorm in float32 (two-pass variance), cast back to x's dtype."""
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                   use_fast_variance=False, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


# On CPU, 3x3 stride-1 convolutions on maps of at most this many pixels run
# as one im2col matmul: XLA's convolution reaches 158 GFLOP/s at 8x8 x 1280
# channels on 2 cores, the matmul 403 (same parameters, same function).
IM2COL_MAX_PIXELS = 64
# On CPU, 3x3 stride-1 convolutions with many input channels run as a sum of
# convolutions over input-channel chunks of this size (maps of at least
# SPLIT_BIG_PIXELS use the first, smaller ones the second), when the input
# has at least two chunks: XLA's convolution slows down on wide inputs (2
# cores: 64x64 960->320 channels 369 ms as one conv, 292 ms in 320-chunks;
# 32x32 1920->640 347 ms, 271 ms in 640-chunks; 16x16 2560->1280 235 ms,
# 197 ms in 640-chunks). Same parameters, same function up to float
# summation order. 0 disables.
SPLIT_CHUNKS = (320, 640)
SPLIT_BIG_PIXELS = 4096
# Nearest x2 upsampling followed by a 3x3 convolution equals, per output
# phase (row parity, column parity), a 2x2 convolution of the small map with
# summed taps: 16 taps at the input size instead of 9 at four times the size
# (0.44x the FLOPs). On CPU `Upsample2D` computes it as one valid 2x2
# convolution with the four phases' kernels side by side (4F outputs), from
# this many input pixels on (2 cores: 32x32 -> 64x64 at 640 channels 306 ms
# against 796 ms; at 8x8 inputs there is no gain). 0 disables.
SUBPIXEL_MIN_PIXELS = 256
# Small maps (at most this many input pixels) take the same sub-pixel route
# with the 2x2 convolution as one im2col matmul: SD's 8x8 -> 16x16
# upsampler at 1280 channels (batch 4, 2-core Zen 3, median of 7) took
# 270 ms as the chunked convolution of the upsampled map, 227 ms this way.
# 0 disables.
SUBPIXEL_IM2COL_MAX_PIXELS = 64


def _subpixel_kernel(k: Array) -> Array:
  """(3, 3, C, F) -> (2, 2, C, 4F): the four output phases' 2x2 kernels.

  Output row 2i reads small rows (i-1, i) with taps (w0, w1 + w2); row 2i+1
  reads (i, i+1) with (w0 + w1, w2); columns alike. Phases are ordered (row
  parity, column parity) = (0, 0), (0, 1), (1, 0), (1, 1).
  """
  rows = (jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]]))

  def cols(kr):
    return (jnp.stack([kr[:, 0], kr[:, 1] + kr[:, 2]], 1),
            jnp.stack([kr[:, 0] + kr[:, 1], kr[:, 2]], 1))

  return jnp.concatenate([c for r in rows for c in cols(r)], axis=-1)


class Conv2D(nn.Conv):
  """nn.Conv (same parameters) with fast paths for CPU.

  upsample=True: the input is first upsampled x2 by nearest neighbour (the
  convolution of diffusers' `Upsample2D`), computed without the large map
  where that pays (SUBPIXEL_MIN_PIXELS).
  """

  upsample: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.has_variable("params", winograd.KEY):
      return self._winograd(x)
    kh, kw = self.kernel_size
    if (kh == kw == 1 and x.ndim == 4 and not self.upsample
        and tuple(self.strides) == (1, 1) and jax.default_backend() == "cpu"
        and tuple(map(tuple, self.padding)) == ((0, 0), (0, 0))):
      return self._pointwise(x)
    cpu3x3 = (x.ndim == 4 and tuple(self.strides) == (1, 1) and kh == kw == 3
              and jax.default_backend() == "cpu")
    if self.upsample:
      same = tuple(map(tuple, self.padding)) == ((1, 1), (1, 1))
      if (cpu3x3 and same and SUBPIXEL_MIN_PIXELS
          and x.shape[1] * x.shape[2] >= SUBPIXEL_MIN_PIXELS):
        return self._subpixel(x)
      if (cpu3x3 and same and SUBPIXEL_IM2COL_MAX_PIXELS
          and x.shape[1] * x.shape[2] <= SUBPIXEL_IM2COL_MAX_PIXELS):
        return self._subpixel(x, im2col=True)
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if not cpu3x3:
      return super().__call__(x)
    pixels = x.shape[1] * x.shape[2]
    if pixels <= IM2COL_MAX_PIXELS:
      return self._im2col(x)
    chunk = SPLIT_CHUNKS[0 if pixels >= SPLIT_BIG_PIXELS else 1]
    if chunk and x.shape[-1] >= 2 * chunk:
      return self._split_conv(x, chunk)
    return super().__call__(x)

  def _pointwise(self, x: Array) -> Array:
    """A 1x1 convolution as one matmul over the flattened pixels: XLA:CPU's
    1x1 convolution ran 2.2x slower than the matmul at 64x64, 960 -> 320
    channels, batch 4 (271 against 117 ms, 2-core Zen 3)."""
    kern, bias, dt = self._kernel_bias(x)
    b, h, w, c = x.shape
    y = x.astype(dt).reshape(-1, c) @ kern.astype(dt).reshape(c,
                                                               self.features)
    return y.reshape(b, h, w, self.features) + bias.astype(dt)

  def _im2col(self, x: Array) -> Array:
    """The 3x3 convolution as one matmul over the 9 shifted copies."""
    kh, kw = self.kernel_size
    c = x.shape[-1]
    kern, bias, dt = self._kernel_bias(x)
    (pt, pb), (pl, pr) = self.padding
    b, h, w, _ = x.shape
    xp = jnp.pad(x.astype(dt), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh)
                            for j in range(kw)], axis=-1)
    y = cols.reshape(-1, kh * kw * c) @ kern.astype(dt).reshape(-1,
                                                              self.features)
    return y.reshape(b, ho, wo, self.features) + bias.astype(dt)

  def _kernel_bias(self, x: Array):
    """nn.Conv's parameters for input x, and the compute dtype."""
    kh, kw = self.kernel_size
    kern = self.param("kernel", self.kernel_init,
                      (kh, kw, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype)
    return kern, bias, self.dtype or x.dtype

  def _subpixel(self, x: Array, im2col: bool = False) -> Array:
    """conv3x3(nearest_x2(x)) as one 2x2 convolution of x (see
    SUBPIXEL_MIN_PIXELS) and an interleave of the four phases; im2col=True
    computes that convolution as one matmul (SUBPIXEL_IM2COL_MAX_PIXELS)."""
    b, h, w, c = x.shape
    f = self.features
    kern, bias, dt = self._kernel_bias(x)
    xp = jnp.pad(x.astype(dt), ((0, 0), (1, 1), (1, 1), (0, 0)))
    k2 = _subpixel_kernel(kern.astype(dt))
    if im2col:
      cols = jnp.concatenate([xp[:, i:i + h + 1, j:j + w + 1, :]
                              for i in (0, 1) for j in (0, 1)], axis=-1)
      z = (cols.reshape(-1, 4 * c) @ k2.reshape(4 * c, 4 * f)).reshape(
          b, h + 1, w + 1, 4 * f)
    else:
      z = jax.lax.conv_general_dilated(
          xp, k2, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=self.precision)
    # Phase (a, b) of output pixel (2i + a, 2j + b) sits at z[i + a, j + b].
    ph = [z[:, a:a + h, bb:bb + w, (2 * a + bb) * f:(2 * a + bb + 1) * f]
          for a in (0, 1) for bb in (0, 1)]
    y = jnp.stack([jnp.stack(ph[0:2], 3), jnp.stack(ph[2:4], 3)], 2)
    return y.reshape(b, 2 * h, 2 * w, f) + bias.astype(dt)

  def _winograd(self, x: Array) -> Array:
    """The convolution from a Winograd-prepared kernel
    (`winograd.prepare_params`), computed in float32."""
    if tuple(self.kernel_size) != (3, 3) or tuple(self.strides) != (1, 1):
      raise ValueError(
          f"{self.name}: its parameters hold a Winograd-prepared kernel"
          f" ({winograd.KEY!r}), which needs a stride-1 3x3 convolution, but"
          f" this one is {self.kernel_size} with strides {self.strides};"
          " prepare the parameters again with this module's path in"
          " winograd.prepare_params(skip=...)")
    u = self.get_variable("params", winograd.KEY)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype)
    if u.shape[-1] != self.features:
      raise ValueError(f"{self.name}: prepared kernel {u.shape} has"
                       f" {u.shape[-1]} outputs, the module {self.features}")
    dt = self.dtype or x.dtype
    if self.upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    y = winograd.conv3x3(x, u, tuple(map(tuple, self.padding)))
    return (y + bias.astype(jnp.float32)).astype(dt)

  def _split_conv(self, x: Array, chunk: int) -> Array:
    """Sum of convolutions over input-channel chunks (see SPLIT_CHUNKS)."""
    c = x.shape[-1]
    kern, bias, dt = self._kernel_bias(x)
    x, kern = x.astype(dt), kern.astype(dt)
    y = None
    for s in range(0, c, chunk):
      part = jax.lax.conv_general_dilated(
          x[..., s:s + chunk], kern[:, :, s:s + chunk], (1, 1),
          tuple(self.padding), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=self.precision)
      y = part if y is None else y + part
    return y + bias.astype(dt)


def conv(features: int, kernel: int, name: str, dtype: str, *,
         stride: int = 1, padding: int | None = None,
         zero_init: bool = False, upsample: bool = False) -> nn.Conv:
  """A Conv2d with PyTorch's explicit symmetric padding (default k // 2)."""
  p = kernel // 2 if padding is None else padding
  kw = {}
  if zero_init:
    kw = dict(kernel_init=nn.initializers.zeros,
              bias_init=nn.initializers.zeros)
  return Conv2D(features, (kernel, kernel), strides=(stride, stride),
                padding=((p, p), (p, p)), dtype=jnp.dtype(dtype),
                param_dtype=jnp.float32, name=name, upsample=upsample, **kw)


def dense(features: int, name: str, dtype: str, *,
          use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(dtype),
                  param_dtype=jnp.float32, name=name)


def timestep_embedding(t_B: Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0
                       ) -> Array:
  """diffusers' `get_timestep_embedding` (scale 1), float32, (B, dim).

  Frequencies exp(-log(max_period) * i / (dim // 2 - freq_shift)); the
  embedding is [sin, cos] ([cos, sin] when flip_sin_to_cos), zero-padded
  by one column when dim is odd.
  """
  half = dim // 2
  if half - freq_shift == 0:
    raise ValueError(f"timestep embedding: dim={dim} with"
                     f" freq_shift={freq_shift} divides by zero")
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - freq_shift))
  args_BF = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args_BF), jnp.cos(args_BF)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], -1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def broadcast_timesteps(timesteps, batch: int) -> Array:
  """A scalar or (B,) / (1,) timestep array -> float32 (B,)."""
  t = jnp.asarray(timesteps, jnp.float32)
  if t.ndim > 1:
    raise ValueError(f"timesteps must be a scalar or (B,), got {t.shape}")
  if t.ndim == 1 and t.shape[0] not in (1, batch):
    raise ValueError(f"timesteps {t.shape} do not match batch {batch}")
  return jnp.broadcast_to(t.reshape(-1), (batch,))


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (`time_embedding.linear_{1,2}`)."""

  features: int  # T, the time-embedding width.
  dtype: str = "float32"

  @nn.compact
  def __call__(self, t_emb_BF: Array) -> Array:
    x = dense(self.features, "linear_1", self.dtype)(
        t_emb_BF.astype(jnp.dtype(self.dtype)))
    return dense(self.features, "linear_2", self.dtype)(nn.silu(x))


def embed_time(timesteps, batch: int, *, channels: int, features: int,
               flip_sin_to_cos: bool, freq_shift: float,
               dtype: str) -> Array:
  """Sinusoidal projection + `time_embedding` MLP (call inside compact)."""
  t_B = broadcast_timesteps(timesteps, batch)
  t_emb = timestep_embedding(t_B, channels, flip_sin_to_cos=flip_sin_to_cos,
                             freq_shift=freq_shift)
  return TimestepEmbedding(features, dtype, name="time_embedding")(t_emb)


class ResnetBlock2D(nn.Module):
  """Pre-norm residual block with an additive time embedding."""

  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BHWC: Array, temb_BT: Array) -> Array:
    out, dt = self.out_channels, self.dtype
    h = nn.silu(group_norm(x_BHWC, self.groups, self.eps, "norm1"))
    h = conv(out, 3, "conv1", dt)(h)
    t = dense(out, "time_emb_proj", dt)(nn.silu(temb_BT))
    h = h + t[:, None, None, :].astype(h.dtype)
    h = nn.silu(group_norm(h, self.groups, self.eps, "norm2"))
    h = conv(out, 3, "conv2", dt)(h)
    x = x_BHWC.astype(h.dtype)
    if x.shape[-1] != out:
      x = conv(out, 1, "conv_shortcut", dt)(x)
    y = x + h
    if self.output_scale_factor != 1.0:
      y = y / self.output_scale_factor
    return y


class Downsample2D(nn.Module):
  """3x3 stride-2 conv; padding 1 pads (1, 1), padding 0 pads (0, 1)."""

  channels: int
  padding: int = 1
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    if self.padding == 0:
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, 3, "conv", self.dtype, stride=2,
                padding=self.padding)(x_BHWC)


def nearest_resize(x_BHWC: Array, size: tuple[int, int]) -> Array:
  """PyTorch `interpolate(mode="nearest", size=...)`: src = dst * in // out.

  The integer rule equals PyTorch's floor(dst * (in / out)) for the sizes
  the UNet produces (out = 2 in or 2 in - 1, where in / out never rounds
  onto an integer).
  """
  h, w = x_BHWC.shape[1:3]
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
  ih = (np.arange(oh) * h) // oh
  iw = (np.arange(ow) * w) // ow
  return x_BHWC[:, ih][:, :, iw]


class Upsample2D(nn.Module):
  """Nearest x2 (or to `output_size`) then a 3x3 conv."""

  channels: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BHWC: Array,
               output_size: tuple[int, int] | None = None) -> Array:
    if output_size is None:
      output_size = (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2])
    if tuple(output_size) == (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2]):
      return conv(self.channels, 3, "conv", self.dtype, upsample=True)(x_BHWC)
    x = nearest_resize(x_BHWC, tuple(output_size))
    return conv(self.channels, 3, "conv", self.dtype)(x)


class GEGLU(nn.Module):
  """proj -> split (hidden, gate) -> hidden * gelu(gate) (exact erf gelu)."""

  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(2 * self.features, "proj", self.dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="geglu")`: net.0 GEGLU, net.2."""

  dim: int
  mult: int = 4
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BNC: Array) -> Array:
    h = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x_BNC)
    return dense(self.dim, "net_2", self.dtype)(h)  # net.1 is dropout


class BasicTransformerBlock(nn.Module):
  """LayerNorm -> self-attn -> LayerNorm -> cross-attn -> LayerNorm -> FF.

  Only `attn1` (self-attention) receives `hooks`.
  """

  dim: int
  heads: int
  dim_head: int
  hooks: SelfAttnHooks = NO_HOOKS
  impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BNC: Array, ctx_BLD: Array) -> Array:
    eps = TRANSFORMER_LAYERNORM_EPS
    attn = lambda name, hooks: Attention(
        query_dim=self.dim, heads=self.heads, dim_head=self.dim_head,
        hooks=hooks, impl=self.impl, dtype=self.dtype, name=name)
    x = attn("attn1", self.hooks)(layer_norm(x_BNC, eps, "norm1")) + x_BNC
    x = attn("attn2", NO_HOOKS)(layer_norm(x, eps, "norm2"), ctx_BLD) + x
    x = FeedForward(self.dim, dtype=self.dtype, name="ff")(
        layer_norm(x, eps, "norm3")) + x
    return x


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, proj_in, blocks, proj_out, residual."""

  heads: int
  dim_head: int
  num_layers: int = 1
  common: BlockCommon = BlockCommon()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(self, x_BHWC: Array, ctx_BLD: Array) -> Array:
    cm = self.common
    b, h, w, c = x_BHWC.shape
    inner = self.heads * self.dim_head
    y = group_norm(x_BHWC, cm.groups, TRANSFORMER_GROUPNORM_EPS, "norm")
    if cm.use_linear_projection:
      y = dense(inner, "proj_in", cm.dtype)(y.reshape(b, h * w, c))
    else:
      y = conv(inner, 1, "proj_in", cm.dtype)(y).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(
          inner, self.heads, self.dim_head, hooks=self.hooks, impl=cm.impl,
          dtype=cm.dtype, name=f"transformer_blocks_{i}")(y, ctx_BLD)
    if cm.use_linear_projection:
      y = dense(c, "proj_out", cm.dtype)(y).reshape(b, h, w, c)
    else:
      y = conv(c, 1, "proj_out", cm.dtype)(y.reshape(b, h, w, inner))
    return y + x_BHWC.astype(y.dtype)


def _transformer(channels: int, heads: int, layers: int, common, hooks,
                 name: str) -> Transformer2DModel:
  # diffusers: Transformer2DModel(heads, channels // heads, ...).
  return Transformer2DModel(heads, channels // heads, layers, common, hooks,
                            name=name)


class DownBlock(nn.Module):
  """`CrossAttnDownBlock2D` (attention=True) or `DownBlock2D`.

  Returns the block output and its skip states (one per resnet, plus the
  downsampled output when `add_downsample`).
  """

  out_channels: int
  num_layers: int
  attention: bool
  add_downsample: bool
  heads: int = 8
  transformer_layers: int = 1
  common: BlockCommon = BlockCommon()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(self, x: Array, temb: Array, ctx: Array | None
               ) -> tuple[Array, tuple[Array, ...]]:
    cm = self.common
    skips = []
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, cm.groups, cm.eps, dtype=cm.dtype,
                        name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = _transformer(self.out_channels, self.heads,
                         self.transformer_layers, cm, self.hooks,
                         f"attentions_{i}")(x, ctx)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, cm.downsample_padding, cm.dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """`CrossAttnUpBlock2D` (attention=True) or `UpBlock2D`.

  Each resnet consumes the last remaining skip (concatenated on channels).
  """

  out_channels: int
  num_layers: int
  attention: bool
  add_upsample: bool
  heads: int = 8
  transformer_layers: int = 1
  common: BlockCommon = BlockCommon()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(self, x: Array, skips: tuple[Array, ...], temb: Array,
               ctx: Array | None,
               upsample_size: tuple[int, int] | None = None) -> Array:
    cm = self.common
    if len(skips) != self.num_layers:
      raise ValueError(f"{self.name}: {len(skips)} skip states for"
                       f" {self.num_layers} resnets")
    for i in range(self.num_layers):
      skip = skips[-1 - i]
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = ResnetBlock2D(self.out_channels, cm.groups, cm.eps, dtype=cm.dtype,
                        name=f"resnets_{i}")(x, temb)
      if self.attention:
        x = _transformer(self.out_channels, self.heads,
                         self.transformer_layers, cm, self.hooks,
                         f"attentions_{i}")(x, ctx)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, cm.dtype, name="upsamplers_0")(
          x, upsample_size)
    return x


class MidBlock(nn.Module):
  """`UNetMidBlock2DCrossAttn` with one attention layer."""

  channels: int
  heads: int = 8
  transformer_layers: int = 1
  output_scale_factor: float = 1.0
  common: BlockCommon = BlockCommon()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(self, x: Array, temb: Array, ctx: Array) -> Array:
    cm = self.common
    res = lambda i: ResnetBlock2D(
        self.channels, cm.groups, cm.eps, self.output_scale_factor,
        cm.dtype, name=f"resnets_{i}")
    x = res(0)(x, temb)
    x = _transformer(self.channels, self.heads, self.transformer_layers, cm,
                     self.hooks, "attentions_0")(x, ctx)
    return res(1)(x, temb)


def random_params(abstract, key: Array,
                  zero: Callable[[tuple[str, ...]], bool] = lambda p: False
                  ) -> dict:
  """Random float32 parameters shaped like `abstract`.

  Kernels are N(0, 1 / fan_in) (fan_in: every axis but the last), biases
  zero, norm scales one; leaves whose path satisfies `zero` are zero. One
  flat normal draw: initialising through `Module.init` costs a large RNG
  graph to compile (about 10 s even for a tiny UNet on a 2-core CPU).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  paths = [tuple(str(k.key) for k in p) for p, _ in flat]
  sizes = [int(np.prod(l.shape)) if p[-1] == "kernel" else 0
           for p, (_, l) in zip(paths, flat)]
  z = np.asarray(jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32))
  out, off = [], 0
  for path, (_, leaf), n in zip(paths, flat, sizes):
    shape = tuple(leaf.shape)
    if zero(path):
      x = np.zeros(shape, np.float32)
    elif n:
      fan_in = int(np.prod(shape[:-1]))
      x = z[off:off + n].reshape(shape) / np.float32(math.sqrt(fan_in))
    elif path[-1] == "scale":
      x = np.ones(shape, np.float32)
    else:
      x = np.zeros(shape, np.float32)
    off += n
    out.append(jnp.asarray(x))
  return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------
# Paths shared by the UNet and the ControlNet (call inside a compact method:
# the blocks attach to the calling module as `down_blocks_i`, `mid_block`).


def encoder_path(cfg, common: BlockCommon, hooks: SelfAttnHooks, x: Array,
                 temb: Array, ctx: Array) -> tuple[Array, list[Array]]:
  """All down blocks; returns (output, skips incl. the conv_in output).

  `cfg` is a UNet or ControlNet config (`block_out_channels`,
  `down_block_types` and the per-block tuples `layers`, `heads`,
  `transformer_layers`).
  """
  skips = [x]
  n = len(cfg.block_out_channels)
  for i, kind in enumerate(cfg.down_block_types):
    x, res = DownBlock(
        cfg.block_out_channels[i], cfg.layers[i],
        attention=kind == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
        heads=cfg.heads[i], transformer_layers=cfg.transformer_layers[i],
        common=common, hooks=hooks, name=f"down_blocks_{i}")(x, temb, ctx)
    skips.extend(res)
  return x, skips


def mid_path(cfg, common: BlockCommon, hooks: SelfAttnHooks, x: Array,
             temb: Array, ctx: Array) -> Array:
  return MidBlock(cfg.block_out_channels[-1], cfg.heads[-1],
                  cfg.transformer_layers[-1], cfg.mid_block_scale_factor,
                  common, hooks, name="mid_block")(x, temb, ctx)
