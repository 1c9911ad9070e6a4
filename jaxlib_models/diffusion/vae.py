"""SD VAE: a Flax linen port of diffusers' `AutoencoderKL`.

Kingma & Welling (arXiv 1312.6114) autoencoder as used by latent diffusion
(Rombach et al., arXiv 2112.10752); behaviour read from diffusers 0.39.0
(`AutoencoderKL`, `Encoder`, `Decoder`, `UNetMidBlock2D`, `ResnetBlock2D`,
`Attention` with group norm), no code taken. Submodules are named after the
PyTorch state-dict keys, an integer segment joined to its parent by `_`:

  torch `encoder.down_blocks.0.resnets.1.conv1.weight` (O, I, kh, kw)
  flax  `params["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]`
        (kh, kw, I, O)

so `diffusion.convert.params_from_torch_state` maps one to the other with no
`literal` names. The public API is NHWC; images live in [-1, 1].

Mixed precision: parameters are float32, convolutions and projections run in
`cfg.dtype`, GroupNorm and the attention softmax in float32.

B: batch, H/W: height/width, C: channels, N: tokens (H * W), Z: latent
channels.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlib_models.diffusion import unet_blocks
from jaxlib_models.diffusion.attention import IMPLS, attend

Array = jax.Array

_DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "mish")
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Config keys that only steer diffusers' PyTorch runtime (tiling, upcasting).
_IGNORED_KEYS = ("sample_size", "force_upcast")


def activation(name: str, x: Array) -> Array:
  """diffusers' `get_activation` set (torch nn.GELU is the exact erf form)."""
  if name in ("silu", "swish"):
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "mish":
    return x * jnp.tanh(jax.nn.softplus(x))
  raise ValueError(f"activation {name!r}: supported are {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL architecture; defaults are SD 1.5's VAE."""

  in_channels: int = 3  # Image channels in.
  out_channels: int = 3  # Image channels out.
  latent_channels: int = 4  # Z; the encoder emits 2 * Z (mean, logvar).
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # Resnets per down block (up blocks: + 1).
  norm_num_groups: int = 32
  norm_eps: float = 1e-6  # Every GroupNorm of the VAE (diffusers: 1e-6).
  act_fn: str = "silu"
  # Latent scaling used by pipelines: z_scaled = (z - shift) * scale.
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True  # 1x1 conv on the 2 * Z encoder moments.
  use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder.
  mid_block_add_attention: bool = True
  dtype: str = "float32"  # Compute dtype; GroupNorm and softmax in float32.
  # Mid-block attention backend (`attention.attend`). The single head is as
  # wide as the last block (512 for SD), beyond cuDNN flash head sizes, hence
  # XLA by default.
  attention_impl: str = "xla"

  def __post_init__(self):
    if not self.block_out_channels:
      raise ValueError("block_out_channels must not be empty")
    for name in ("in_channels", "out_channels", "latent_channels",
                 "layers_per_block", "norm_num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for ch in self.block_out_channels:
      if ch < 1 or ch % self.norm_num_groups:
        raise ValueError(
            f"block_out_channels={self.block_out_channels}: every entry must"
            f" be a positive multiple of norm_num_groups="
            f"{self.norm_num_groups}")
    if self.norm_eps <= 0:
      raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
    if self.act_fn not in ACTIVATIONS:
      raise ValueError(f"act_fn={self.act_fn!r}: supported are {ACTIVATIONS}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: supported are {_DTYPES}")
    if self.attention_impl not in IMPLS:
      raise ValueError(
          f"attention_impl={self.attention_impl!r}: supported are {IMPLS}")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size: 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_dict(cls, d: dict, *, source: str = "config.json",
                          **overrides) -> "VAEConfig":
    """From a diffusers `AutoencoderKL` config dict (its `config.json`).

    Args:
      d: the parsed config.
      source: quoted in errors.
      **overrides: fields diffusers does not store (e.g. `dtype`).

    Raises:
      ValueError: a key or value this port does not implement (named).
    """
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"{source}: _class_name {name!r} is not AutoencoderKL")
    known = {"in_channels", "out_channels", "down_block_types",
             "up_block_types", "block_out_channels", "layers_per_block",
             "act_fn", "latent_channels", "norm_num_groups", "scaling_factor",
             "shift_factor", "latents_mean", "latents_std",
             "use_quant_conv", "use_post_quant_conv",
             "mid_block_add_attention", *_IGNORED_KEYS}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
      raise ValueError(f"{source}: unsupported AutoencoderKL config key(s)"
                       f" {unknown}")
    for key in ("latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise ValueError(f"{source}: {key}={d[key]} (per-channel latent"
                         " statistics) is not supported; only None")
    blocks = tuple(d.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", _DOWN_BLOCK),
                      ("up_block_types", _UP_BLOCK)):
      types = tuple(d.get(key, (want,)))
      bad = [t for t in types if t != want]
      if bad:
        raise ValueError(f"{source}: {key} {bad} unsupported; only {want!r}")
      if len(types) != len(blocks):
        raise ValueError(f"{source}: {key} has {len(types)} entries but"
                         f" block_out_channels has {len(blocks)}")
    shift = d.get("shift_factor")
    kw = dict(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        block_out_channels=blocks,
        layers_per_block=d.get("layers_per_block", 1),
        norm_num_groups=d.get("norm_num_groups", 32),
        act_fn=d.get("act_fn", "silu"),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
    )
    kw.update(overrides)
    try:
      return cls(**kw)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None


# --------------------------------------------------------------------------
# Modules.


def _conv(features: int, kernel: int, name: str, dt, stride: int = 1,
          padding: int | str = 1) -> nn.Conv:
  pad = padding if isinstance(padding, str) else ((padding, padding),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=pad, dtype=dt, param_dtype=jnp.float32, name=name)


def _group_norm(c: VAEConfig, name: str):
  """GroupNorm in float32 (two-pass variance like torch), output in dtype."""
  norm = nn.GroupNorm(num_groups=c.norm_num_groups, epsilon=c.norm_eps,
                      dtype=jnp.float32, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)
  dt = jnp.dtype(c.dtype)
  return lambda x: norm(x.astype(jnp.float32)).astype(dt)


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding (pre-norm)."""

  cfg: VAEConfig
  out_channels: int

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h = activation(c.act_fn, _group_norm(c, "norm1")(x_BHWC))
    h = _conv(self.out_channels, 3, "conv1", dt)(h)
    h = activation(c.act_fn, _group_norm(c, "norm2")(h))
    h = _conv(self.out_channels, 3, "conv2", dt)(h)
    if x_BHWC.shape[-1] != self.out_channels:
      x_BHWC = _conv(self.out_channels, 1, "conv_shortcut", dt, padding=0)(
          x_BHWC)
    return x_BHWC + h  # output_scale_factor is 1 in the VAE


class Downsample(nn.Module):
  """Pad bottom/right by one, then a 3x3 stride-2 conv without padding."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x_BHWC.shape[-1], 3, "conv", jnp.dtype(self.cfg.dtype),
                 stride=2, padding="VALID")(x_BHWC)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (on CPU as one 2x2 conv of the
  small map: `unet_blocks.SUBPIXEL_MIN_PIXELS`)."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    return unet_blocks.conv(x_BHWC.shape[-1], 3, "conv", self.cfg.dtype,
                            upsample=True)(x_BHWC)


class MidAttention(nn.Module):
  """diffusers `Attention` of the VAE mid block: one head over H*W tokens.

  out = x + to_out(attend(group_norm(x))); rescale_output_factor is 1.
  """

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    b, hh, ww, ch = x_BHWC.shape
    h_BNC = _group_norm(c, "group_norm")(x_BHWC).reshape(b, hh * ww, ch)
    dense = lambda name: nn.Dense(ch, dtype=dt, param_dtype=jnp.float32,
                                  name=name)
    q_BNC = dense("to_q")(h_BNC)
    k_BNC = dense("to_k")(h_BNC)
    v_BNC = dense("to_v")(h_BNC)
    o_BNC = attend(q_BNC, k_BNC, v_BNC, heads=1, impl=c.attention_impl)
    o_BNC = dense("to_out_0")(o_BNC)
    return x_BHWC + o_BNC.reshape(b, hh, ww, ch)


class MidBlock(nn.Module):
  """resnets_0, then (attentions_0, resnets_1)."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    ch = x_BHWC.shape[-1]
    x_BHWC = ResnetBlock(self.cfg, ch, name="resnets_0")(x_BHWC)
    if self.cfg.mid_block_add_attention:
      x_BHWC = MidAttention(self.cfg, name="attentions_0")(x_BHWC)
    return ResnetBlock(self.cfg, ch, name="resnets_1")(x_BHWC)


class DownBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`."""

  cfg: VAEConfig
  out_channels: int
  num_layers: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock(self.cfg, self.out_channels,
                           name=f"resnets_{j}")(x_BHWC)
    if self.add_downsample:
      x_BHWC = Downsample(self.cfg, name="downsamplers_0")(x_BHWC)
    return x_BHWC


class UpBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`."""

  cfg: VAEConfig
  out_channels: int
  num_layers: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock(self.cfg, self.out_channels,
                           name=f"resnets_{j}")(x_BHWC)
    if self.add_upsample:
      x_BHWC = Upsample(self.cfg, name="upsamplers_0")(x_BHWC)
    return x_BHWC


class Encoder(nn.Module):
  """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 Z), before quant_conv."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    blocks = c.block_out_channels
    h = _conv(blocks[0], 3, "conv_in", dt)(x_BHWC.astype(dt))
    for i, ch in enumerate(blocks):
      h = DownBlock(c, ch, c.layers_per_block, i < len(blocks) - 1,
                    name=f"down_blocks_{i}")(h)
    h = MidBlock(c, name="mid_block")(h)
    h = activation(c.act_fn, _group_norm(c, "conv_norm_out")(h))
    return _conv(2 * c.latent_channels, 3, "conv_out", dt)(h)


class Decoder(nn.Module):
  """Latent (B, h, w, Z) -> image (B, h f, w f, out), after post_quant_conv."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, z_BHWZ: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    blocks = tuple(reversed(c.block_out_channels))
    h = _conv(blocks[0], 3, "conv_in", dt)(z_BHWZ.astype(dt))
    h = MidBlock(c, name="mid_block")(h)
    for i, ch in enumerate(blocks):
      h = UpBlock(c, ch, c.layers_per_block + 1, i < len(blocks) - 1,
                  name=f"up_blocks_{i}")(h)
    h = activation(c.act_fn, _group_norm(c, "conv_norm_out")(h))
    return _conv(c.out_channels, 3, "conv_out", dt)(h)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL` (NHWC). Use with `apply(..., method=...)`.

  `encode(x) -> (mean, logvar)`, `decode(z) -> image`, `__call__(x, key)`:
  reconstruction from the posterior mode (key None) or a sample.
  """

  config: VAEConfig

  def setup(self):
    c = self.config
    dt = jnp.dtype(c.dtype)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    if c.use_quant_conv:
      self.quant_conv = _conv(2 * c.latent_channels, 1, "quant_conv", dt,
                              padding=0)
    if c.use_post_quant_conv:
      self.post_quant_conv = _conv(c.latent_channels, 1, "post_quant_conv",
                                   dt, padding=0)

  def encode(self, x_BHWC: Array) -> tuple[Array, Array]:
    """Posterior moments of images in [-1, 1].

    Args:
      x_BHWC: (B, H, W, in_channels); H and W multiples of
        `config.downsample_factor`.

    Returns:
      (mean, logvar), each (B, H/f, W/f, Z) float32; logvar clipped to
      [-30, 20] like diffusers' `DiagonalGaussianDistribution`.
    """
    c = self.config
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != c.in_channels:
      raise ValueError(f"images must be (B, H, W, {c.in_channels}) NHWC, got"
                       f" {x_BHWC.shape}")
    f = c.downsample_factor
    hh, ww = x_BHWC.shape[1:3]
    if hh % f or ww % f:
      raise ValueError(
          f"image size {hh}x{ww} is not divisible by the VAE downsampling"
          f" factor {f} (2 ** (len(block_out_channels) - 1))")
    moments = self.encoder(x_BHWC)
    if c.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z_BHWZ: Array) -> Array:
    """Unscaled latents (B, h, w, Z) -> float32 images (B, h f, w f, out)."""
    c = self.config
    if z_BHWZ.ndim != 4 or z_BHWZ.shape[-1] != c.latent_channels:
      raise ValueError(f"latents must be (B, h, w, {c.latent_channels})"
                       f" NHWC, got {z_BHWZ.shape}")
    z_BHWZ = z_BHWZ.astype(jnp.dtype(c.dtype))
    if c.use_post_quant_conv:
      z_BHWZ = self.post_quant_conv(z_BHWZ)
    return self.decoder(z_BHWZ).astype(jnp.float32)

  def __call__(self, x_BHWC: Array, key: Array | None = None) -> Array:
    mean, logvar = self.encode(x_BHWC)
    return self.decode(_posterior(mean, logvar, key))


def _posterior(mean: Array, logvar: Array, key: Array | None) -> Array:
  """mode() (= mean) when key is None, else mean + std * N(0, 1)."""
  if key is None:
    return mean
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


# --------------------------------------------------------------------------
# Public functions.


def _unwrap(params) -> Any:
  """Accepts the bare tree or `{"params": tree}`."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def init_vae_params(cfg: VAEConfig, key: Array) -> dict:
  """Random float32 parameters (flax default initialisers; smoke tests)."""
  f = cfg.downsample_factor
  x = jnp.zeros((1, f, f, cfg.in_channels), jnp.float32)
  return jax.jit(lambda k: AutoencoderKL(cfg).init(k, x)["params"])(key)


def abstract_vae_params(cfg: VAEConfig) -> dict:
  """`init_vae_params` shapes as ShapeDtypeStructs (no computation)."""
  return jax.eval_shape(lambda: init_vae_params(cfg, jax.random.key(0)))


@functools.partial(jax.jit, static_argnums=2)
def _encode_latents(params, x_BHWC, cfg, key):
  mean, logvar = AutoencoderKL(cfg).apply({"params": params}, x_BHWC,
                                          method="encode")
  z = _posterior(mean, logvar, key)
  shift = cfg.shift_factor or 0.0
  return (z - shift) * cfg.scaling_factor


@functools.partial(jax.jit, static_argnums=2)
def _decode_latents(params, z_BHWZ, cfg):
  shift = cfg.shift_factor or 0.0
  z = z_BHWZ.astype(jnp.float32) / cfg.scaling_factor + shift
  return AutoencoderKL(cfg).apply({"params": params}, z, method="decode")


def encode_latents(params, x: jax.typing.ArrayLike, cfg: VAEConfig,
                   key: Array | None = None) -> Array:
  """Images in [-1, 1] -> latents in the diffusion model's scaled space.

  Args:
    params: tree of `init_vae_params` or a converted checkpoint.
    x: (B, H, W, in_channels) NHWC images in [-1, 1].
    cfg: architecture.
    key: None for the posterior mode (mean), else a PRNG key to sample.

  Returns:
    (B, H/f, W/f, Z) float32: (z - shift_factor) * scaling_factor.
  """
  return _encode_latents(_unwrap(params), jnp.asarray(x, jnp.float32), cfg,
                         key)


def decode_latents(params, z_scaled: jax.typing.ArrayLike,
                   cfg: VAEConfig) -> Array:
  """Scaled latents -> float32 images in (about) [-1, 1], NHWC.

  Inverts `encode_latents`' scaling: z = z_scaled / scaling_factor + shift.
  """
  return _decode_latents(_unwrap(params), jnp.asarray(z_scaled), cfg)


DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
