"""TAESD: a Flax linen port of diffusers' `AutoencoderTiny`.

Tiny distilled autoencoder of madebyollin/taesd, producing latents in SD's
*scaled* latent space (diffusers `scaling_factor=1.0`). Behaviour read from
diffusers 0.39.0 (`AutoencoderTiny`, `EncoderTiny`, `DecoderTiny`,
`AutoencoderTinyBlock`), no code taken:

- encoder: x in [-1, 1] -> (x + 1) / 2 -> conv stages (3x3 stride-2 convs
  without bias between them, residual blocks) -> latents;
- decoder: clamp tanh(z / 3) * 3 (a fixed 3, not `latent_magnitude`) ->
  conv + act -> stages of residual blocks, upsampling and convs -> y ->
  2 y - 1.

diffusers keeps the layers in one `nn.Sequential`, so state-dict keys carry
the position in that sequence (activations and upsamplers take an index but
hold no tensors): torch `decoder.layers.2.conv.4.weight` <-> flax
`params["decoder"]["layers_2"]["conv_4"]["kernel"]`; the generic
`diffusion.convert` rule maps them with no `literal` names.

B: batch, H/W: height/width, C: channels, Z: latent channels.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlib_models.diffusion.vae import ACTIVATIONS, activation

Array = jax.Array

_DTYPES = ("float32", "bfloat16", "float16")
UPSAMPLE_FNS = ("nearest", "bilinear")
DECODER_CLAMP = 3.0  # tanh(z / 3) * 3 on the decoder input (diffusers).


@dataclasses.dataclass(frozen=True)
class TAESDConfig:
  """AutoencoderTiny architecture; defaults are madebyollin/taesd's."""

  in_channels: int = 3
  out_channels: int = 3
  # diffusers convolves stage i from block_out_channels[i] channels, so every
  # entry of a tuple must be equal (anything else fails in diffusers too).
  encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
  decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
  act_fn: str = "relu"
  upsample_fn: str = "nearest"  # Decoder upsampling (torch interpolate).
  latent_channels: int = 4
  upsampling_scaling_factor: int = 2
  # Residual blocks per stage; stage i > 0 starts with a stride-2 conv.
  num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
  # Residual blocks per stage; every stage but the last ends upsampling.
  num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
  # uint8 storage of latents: q = clip(z / (2 m) + shift, 0, 1) (`forward`).
  latent_magnitude: float = 3.0
  latent_shift: float = 0.5
  force_upcast: bool = False  # Recorded only (a diffusers pipeline flag).
  # Pipeline latent scaling: z_scaled = (z - shift_factor) * scaling_factor.
  scaling_factor: float = 1.0
  shift_factor: float = 0.0
  dtype: str = "float32"  # Compute dtype; outputs are float32.

  def __post_init__(self):
    for name in ("in_channels", "out_channels", "latent_channels",
                 "upsampling_scaling_factor"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for part in ("encoder", "decoder"):
      chans = getattr(self, f"{part}_block_out_channels")
      blocks = getattr(self, f"num_{part}_blocks")
      if not chans or len(chans) != len(blocks):
        raise ValueError(
            f"{part}_block_out_channels={chans} and num_{part}_blocks="
            f"{blocks} must be non-empty and of equal length")
      if len(set(chans)) != 1 or chans[0] < 1:
        raise ValueError(
            f"{part}_block_out_channels={chans}: diffusers builds every stage"
            " with equal input and output channels, so all entries must be"
            " the same positive number")
      if min(blocks) < 0:
        raise ValueError(f"num_{part}_blocks={blocks} must be >= 0")
    if self.act_fn not in ACTIVATIONS:
      raise ValueError(f"act_fn={self.act_fn!r}: supported are {ACTIVATIONS}")
    if self.upsample_fn not in UPSAMPLE_FNS:
      raise ValueError(
          f"upsample_fn={self.upsample_fn!r}: supported are {UPSAMPLE_FNS}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: supported are {_DTYPES}")
    if self.latent_magnitude <= 0:
      raise ValueError(f"latent_magnitude={self.latent_magnitude} must be > 0")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")

  @property
  def downsample_factor(self) -> int:
    """Encoder stride: 2 ** (len(num_encoder_blocks) - 1)."""
    return 2 ** (len(self.num_encoder_blocks) - 1)

  @property
  def upsample_factor(self) -> int:
    """Decoder scale: upsampling_scaling_factor ** (stages - 1)."""
    return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)

  @classmethod
  def from_diffusers_dict(cls, d: dict, *, source: str = "config.json",
                          **overrides) -> "TAESDConfig":
    """From a diffusers `AutoencoderTiny` config dict (its `config.json`).

    Args:
      d: the parsed config.
      source: quoted in errors.
      **overrides: fields diffusers does not store (e.g. `dtype`).

    Raises:
      ValueError: a key or value this port does not implement (named).
    """
    name = d.get("_class_name", "AutoencoderTiny")
    if name != "AutoencoderTiny":
      raise ValueError(f"{source}: _class_name {name!r} is not"
                       " AutoencoderTiny")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    # `block_out_channels` is a copy diffusers registers of the decoder's.
    unknown = sorted(k for k in d if not k.startswith("_")
                     and k not in fields and k != "block_out_channels")
    if unknown:
      raise ValueError(f"{source}: unsupported AutoencoderTiny config key(s)"
                       f" {unknown}")
    kw = {}
    for k in fields:
      if k in d:
        v = d[k]
        kw[k] = tuple(v) if isinstance(v, list) else v
    if "block_out_channels" in d and "decoder_block_out_channels" in d and (
        tuple(d["block_out_channels"]) != tuple(
            d["decoder_block_out_channels"])):
      raise ValueError(
          f"{source}: block_out_channels={d['block_out_channels']} differs"
          f" from decoder_block_out_channels="
          f"{d['decoder_block_out_channels']}")
    shift = kw.get("shift_factor")
    kw["shift_factor"] = 0.0 if shift is None else float(shift)
    kw.update(overrides)
    try:
      return cls(**kw)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{source}: {e}") from None


# --------------------------------------------------------------------------
# Modules.


def _conv(features: int, name: str, dt, stride: int = 1, bias: bool = True,
          kernel: int = 3) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dt,
                 param_dtype=jnp.float32, name=name)


class TinyBlock(nn.Module):
  """diffusers `AutoencoderTinyBlock`: relu(conv(act(conv(act(conv x)))) + x).

  The sequential `conv` holds convs at 0, 2, 4; in == out channels always,
  so the skip is the identity.
  """

  cfg: TAESDConfig
  channels: int

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h = activation(c.act_fn, _conv(self.channels, "conv_0", dt)(x_BHWC))
    h = activation(c.act_fn, _conv(self.channels, "conv_2", dt)(h))
    h = _conv(self.channels, "conv_4", dt)(h)
    return jax.nn.relu(h + x_BHWC)


class EncoderTiny(nn.Module):
  """[0, 1] images (B, H, W, in) -> latents (B, H/f, W/f, Z)."""

  cfg: TAESDConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h = x_BHWC.astype(dt)
    idx = 0
    for i, (ch, n) in enumerate(zip(c.encoder_block_out_channels,
                                    c.num_encoder_blocks)):
      if i == 0:
        h = _conv(ch, f"layers_{idx}", dt)(h)
      else:
        h = _conv(ch, f"layers_{idx}", dt, stride=2, bias=False)(h)
      idx += 1
      for _ in range(n):
        h = TinyBlock(c, ch, name=f"layers_{idx}")(h)
        idx += 1
    return _conv(c.latent_channels, f"layers_{idx}", dt)(h)


def _upsample(x_BHWC: Array, s: int, method: str) -> Array:
  if method == "nearest":  # torch: source index floor(i / s)
    return jnp.repeat(jnp.repeat(x_BHWC, s, axis=1), s, axis=2)
  b, hh, ww, ch = x_BHWC.shape
  # Half-pixel centres and edge clamping, as torch align_corners=False.
  return jax.image.resize(x_BHWC, (b, hh * s, ww * s, ch), "linear",
                          antialias=False)


class DecoderTiny(nn.Module):
  """Latents (B, h, w, Z) -> [0, 1]-range images before the 2 y - 1 map."""

  cfg: TAESDConfig

  @nn.compact
  def __call__(self, z_BHWZ: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    chans = c.decoder_block_out_channels
    h = _conv(chans[0], "layers_0", dt)(z_BHWZ.astype(dt))
    h = activation(c.act_fn, h)  # layers.1
    idx = 2
    last = len(chans) - 1
    for i, (ch, n) in enumerate(zip(chans, c.num_decoder_blocks)):
      for _ in range(n):
        h = TinyBlock(c, ch, name=f"layers_{idx}")(h)
        idx += 1
      if i < last:
        h = _upsample(h, c.upsampling_scaling_factor, c.upsample_fn)
        idx += 1
      out = ch if i < last else c.out_channels
      h = _conv(out, f"layers_{idx}", dt, bias=i == last)(h)
      idx += 1
    return h


class AutoencoderTiny(nn.Module):
  """diffusers `AutoencoderTiny` (NHWC). Use with `apply(..., method=...)`.

  `encode(x)` returns the latents diffusers' `.encode(x).latents` returns
  (unscaled by `scaling_factor`), `decode(z)` the image of `.decode(z)
  .sample`, and `__call__(x)` diffusers' `forward`: encode, store as uint8,
  decode.
  """

  config: TAESDConfig

  def setup(self):
    self.encoder = EncoderTiny(self.config)
    self.decoder = DecoderTiny(self.config)

  def encode(self, x_BHWC: Array) -> Array:
    """Images in [-1, 1], (B, H, W, in) -> float32 latents (B, h, w, Z)."""
    c = self.config
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != c.in_channels:
      raise ValueError(f"images must be (B, H, W, {c.in_channels}) NHWC, got"
                       f" {x_BHWC.shape}")
    x_BHWC = (x_BHWC.astype(jnp.float32) + 1.0) / 2.0
    return self.encoder(x_BHWC).astype(jnp.float32)

  def decode(self, z_BHWZ: Array) -> Array:
    """Latents (B, h, w, Z) -> float32 images in (about) [-1, 1]."""
    c = self.config
    if z_BHWZ.ndim != 4 or z_BHWZ.shape[-1] != c.latent_channels:
      raise ValueError(f"latents must be (B, h, w, {c.latent_channels})"
                       f" NHWC, got {z_BHWZ.shape}")
    z_BHWZ = z_BHWZ.astype(jnp.float32)
    z_BHWZ = jnp.tanh(z_BHWZ / DECODER_CLAMP) * DECODER_CLAMP
    y = self.decoder(z_BHWZ).astype(jnp.float32)
    return y * 2.0 - 1.0

  def __call__(self, x_BHWC: Array) -> Array:
    z = self.encode(x_BHWC)
    q = jnp.round(scale_latents(z, self.config) * 255.0)
    return self.decode(unscale_latents(q / 255.0, self.config))


def scale_latents(z: Array, cfg: TAESDConfig) -> Array:
  """Raw latents -> [0, 1] (for uint8 storage): clip(z / 2m + shift)."""
  return jnp.clip(z / (2 * cfg.latent_magnitude) + cfg.latent_shift, 0, 1)


def unscale_latents(q: Array, cfg: TAESDConfig) -> Array:
  """Inverse of `scale_latents` on [0, 1] values."""
  return (q - cfg.latent_shift) * (2 * cfg.latent_magnitude)


# --------------------------------------------------------------------------
# Public functions.


def _unwrap(params):
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def init_taesd_params(cfg: TAESDConfig, key: Array) -> dict:
  """Random float32 parameters (flax default initialisers; smoke tests)."""
  f = cfg.downsample_factor
  x = jnp.zeros((1, f, f, cfg.in_channels), jnp.float32)
  return jax.jit(lambda k: AutoencoderTiny(cfg).init(k, x)["params"])(key)


def abstract_taesd_params(cfg: TAESDConfig) -> dict:
  """`init_taesd_params` shapes as ShapeDtypeStructs (no computation)."""
  return jax.eval_shape(lambda: init_taesd_params(cfg, jax.random.key(0)))


@functools.partial(jax.jit, static_argnums=2)
def _encode_latents(params, x_BHWC, cfg):
  z = AutoencoderTiny(cfg).apply({"params": params}, x_BHWC, method="encode")
  return (z - cfg.shift_factor) * cfg.scaling_factor


@functools.partial(jax.jit, static_argnums=2)
def _decode_latents(params, z_BHWZ, cfg):
  z = z_BHWZ.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
  return AutoencoderTiny(cfg).apply({"params": params}, z, method="decode")


def encode_latents(params, x: jax.typing.ArrayLike,
                   cfg: TAESDConfig) -> Array:
  """Images in [-1, 1] (B, H, W, in) -> pipeline latents.

  Returns (z - shift_factor) * scaling_factor, the convention of diffusers
  pipelines; TAESD's defaults (1, 0) leave `encode`'s latents unchanged,
  which are already in SD's scaled latent space.
  """
  return _encode_latents(_unwrap(params), jnp.asarray(x, jnp.float32), cfg)


def decode_latents(params, z_scaled: jax.typing.ArrayLike,
                   cfg: TAESDConfig) -> Array:
  """Pipeline latents -> float32 images (B, H, W, out), inverse scaling."""
  return _decode_latents(_unwrap(params), jnp.asarray(z_scaled), cfg)


DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
