"""ControlNet (diffusers `ControlNetModel`) in Flax linen.

A port of diffusers 0.39.0's `ControlNetModel` (Zhang et al., arXiv
2302.05543; behaviour read from diffusers, no code taken): a trainable copy
of the UNet encoder and mid block (`down_blocks_i`, `mid_block`, same
modules as `unet.UNet2DConditionModel`), a small conv network
`controlnet_cond_embedding` that maps the image-space condition to latent
resolution and is added to `conv_in`'s output, and zero-initialised 1x1
convs `controlnet_down_blocks_i` (one per UNet skip state) and
`controlnet_mid_block`. The returned residuals are multiplied by
`conditioning_scale` and feed `UNet2DConditionModel`'s
`down_block_additional_residuals` / `mid_block_additional_residual`.

Choices where the brief or diffusers leave room: the condition image is
NHWC with values as the pipeline prepares them (diffusers: [0, 1]); its size
must be exactly 2^(len(conditioning_embedding_out_channels) - 1) times the
latent size (x8 for SD), else a ValueError (diffusers would fail inside the
addition); `guess_mode` and `global_pool_conditions` follow diffusers; the
number of heads follows `num_attention_heads or attention_head_dim` exactly
as diffusers' ControlNetModel does (unlike its UNet, it accepts
`num_attention_heads`). Parameter names follow the PyTorch state dict, with
`time_embedding.linear_{1,2}` literal (`CONTROLNET_LITERAL`).

B: batch, H/W: latent height/width, C: channels, L: context tokens,
D: context width, S: condition-image channels.
"""

import dataclasses
import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.diffusion import convert
from jaxlib_models.diffusion.attention import NO_HOOKS, SelfAttnHooks
from jaxlib_models.diffusion.unet import (
  FEATURE_DEFAULTS,
  SD15_DOWN_BLOCKS,
  UNET_LITERAL,
  BackboneConfigMixin,
  UNetConfig,
  parse_diffusers_dict,
)
from jaxlib_models.diffusion.unet_blocks import (
  conv,
  embed_time,
  encoder_path,
  mid_path,
  random_params,
)

Array = jax.Array

CONTROLNET_LITERAL = UNET_LITERAL


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(BackboneConfigMixin):
  """ControlNetModel hyper-parameters; defaults are SD 1.5 ControlNet's."""

  in_channels: int = 4
  conditioning_channels: int = 3  # S, channels of the condition image.
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = SD15_DOWN_BLOCKS
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  layers_per_block: int | tuple[int, ...] = 2
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8  # diffusers: = heads.
  num_attention_heads: int | tuple[int, ...] | None = None  # Overrides it.
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  use_linear_projection: bool = False
  # "bgr": the condition's channels are reversed before embedding.
  controlnet_conditioning_channel_order: str = "rgb"
  # Widths of the condition embedding; len - 1 stride-2 convs (x8 for 4).
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False  # Residuals averaged over H, W.
  dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    self._tuplify("block_out_channels", "down_block_types",
                  "layers_per_block", "transformer_layers_per_block",
                  "attention_head_dim", "num_attention_heads",
                  "conditioning_embedding_out_channels")
    self._check_backbone()
    if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
      raise ValueError(
          "controlnet_conditioning_channel_order="
          f"{self.controlnet_conditioning_channel_order!r}: 'rgb' or 'bgr'")
    emb = self.conditioning_embedding_out_channels
    if not emb or any(c < 1 for c in emb):
      raise ValueError(f"conditioning_embedding_out_channels={emb} needs at"
                       " least one positive width")
    if self.conditioning_channels < 1:
      raise ValueError(f"{self.conditioning_channels=} must be >= 1")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def cond_downscale(self) -> int:
    """Condition-image size / latent size (8 for SD)."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @property
  def num_down_residuals(self) -> int:
    n = len(self.block_out_channels)
    return 1 + sum(self.layers) + n - 1

  @classmethod
  def from_diffusers_dict(cls, d: Mapping, *, source: str = "config.json",
                          **overrides) -> "ControlNetConfig":
    """From a diffusers `ControlNetModel` config.json dict (missing keys take
    diffusers' defaults, e.g. cross_attention_dim 1280).

    Raises:
      ValueError: naming an unsupported or unknown key.
    """
    kw = parse_diffusers_dict(d, _CN_DEFAULTS, FEATURE_DEFAULTS, source)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_unet_config(cls, unet: UNetConfig, **overrides
                       ) -> "ControlNetConfig":
    """diffusers `ControlNetModel.from_unet`: copy the encoder settings."""
    keys = ("in_channels", "block_out_channels", "down_block_types",
            "mid_block_type", "layers_per_block",
            "transformer_layers_per_block", "attention_head_dim",
            "num_attention_heads", "cross_attention_dim", "norm_num_groups",
            "norm_eps", "flip_sin_to_cos", "freq_shift",
            "downsample_padding", "mid_block_scale_factor",
            "use_linear_projection", "dtype", "attention_impl")
    if unet.time_embedding_dim not in (None, unet.time_embed_dim) or (
        unet.center_input_sample):
      raise ValueError("time_embedding_dim / center_input_sample have no"
                       " ControlNet counterpart")
    kw = {k: getattr(unet, k) for k in keys}
    kw.update(overrides)
    return cls(**kw)


_CN_DEFAULTS = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=SD15_DOWN_BLOCKS,
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, num_attention_heads=None,
    use_linear_projection=False,
    controlnet_conditioning_channel_order="rgb",
    conditioning_embedding_out_channels=(16, 32, 96, 256),
    global_pool_conditions=False)


class ControlNetConditioningEmbedding(nn.Module):
  """conv_in, then (3x3, 3x3 stride 2) pairs `blocks_i`, SiLU after each,
  and a zero-initialised conv_out to the UNet width."""

  out_channels: int
  widths: tuple[int, ...] = (16, 32, 96, 256)
  dtype: str = "float32"

  @nn.compact
  def __call__(self, cond_BhwS: Array) -> Array:
    dt = self.dtype
    x = nn.silu(conv(self.widths[0], 3, "conv_in", dt)(cond_BhwS))
    for i in range(len(self.widths) - 1):
      x = nn.silu(conv(self.widths[i], 3, f"blocks_{2 * i}", dt)(x))
      x = nn.silu(conv(self.widths[i + 1], 3, f"blocks_{2 * i + 1}", dt,
                       stride=2)(x))
    return conv(self.out_channels, 3, "conv_out", dt, zero_init=True)(x)


class ControlNetModel(nn.Module):
  """diffusers `ControlNetModel`, NHWC; top-level like the UNet."""

  config: ControlNetConfig = ControlNetConfig()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(
      self,
      sample: Array,
      timesteps: Array | float,
      encoder_hidden_states: Array,
      controlnet_cond: Array,
      conditioning_scale: float | Array = 1.0,
      guess_mode: bool = False,
  ) -> tuple[tuple[Array, ...], Array]:
    """Residuals for the UNet.

    Args:
      sample: (B, H, W, in_channels) noisy latents.
      timesteps: scalar, (1,) or (B,).
      encoder_hidden_states: (B, L, D).
      controlnet_cond: (B, 8H, 8W, S) condition image (x cond_downscale).
      conditioning_scale: multiplies every residual.
      guess_mode: diffusers' guess mode: residual k of n is additionally
        scaled by logspace(-1, 0, n + 1)[k] (the mid one by 1).

    Returns:
      (down residuals, one per UNet skip state, each (B, h, w, C)),
      mid residual (B, h, w, C_last); the compute dtype.
    """
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample {sample.shape} must be (B, H, W,"
                       f" {cfg.in_channels}) (NHWC)")
    b, h, w, _ = sample.shape
    f = cfg.cond_downscale
    want = (b, h * f, w * f, cfg.conditioning_channels)
    if tuple(controlnet_cond.shape) != want:
      raise ValueError(f"controlnet_cond {controlnet_cond.shape} must be"
                       f" {want}: {f}x the latent size (NHWC)")
    cond = controlnet_cond.astype(dt)
    if cfg.controlnet_conditioning_channel_order == "bgr":
      cond = cond[..., ::-1]
    ctx = encoder_hidden_states.astype(dt)
    temb = embed_time(timesteps, b, channels=cfg.block_out_channels[0],
                      features=cfg.time_embed_dim,
                      flip_sin_to_cos=cfg.flip_sin_to_cos,
                      freq_shift=cfg.freq_shift, dtype=cfg.dtype)
    c0 = cfg.block_out_channels[0]
    x = conv(c0, 3, "conv_in", cfg.dtype)(sample.astype(dt))
    x = x + ControlNetConditioningEmbedding(
        c0, cfg.conditioning_embedding_out_channels, cfg.dtype,
        name="controlnet_cond_embedding")(cond)
    x, skips = encoder_path(cfg, cfg.common, self.hooks, x, temb, ctx)
    x = mid_path(cfg, cfg.common, self.hooks, x, temb, ctx)
    down = [conv(s.shape[-1], 1, f"controlnet_down_blocks_{i}", cfg.dtype,
                 zero_init=True)(s) for i, s in enumerate(skips)]
    mid = conv(x.shape[-1], 1, "controlnet_mid_block", cfg.dtype,
               zero_init=True)(x)
    if guess_mode and not cfg.global_pool_conditions:
      scales = np.logspace(-1, 0, len(down) + 1, dtype=np.float32)
      down = [r * (s * conditioning_scale) for r, s in zip(down, scales)]
      mid = mid * conditioning_scale
    else:
      down = [r * conditioning_scale for r in down]
      mid = mid * conditioning_scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return tuple(r.astype(dt) for r in down), mid.astype(dt)


def _is_zero_conv(path: tuple[str, ...]) -> bool:
  return (path[0].startswith("controlnet_down_blocks_")
          or path[0] == "controlnet_mid_block"
          or path[:2] == ("controlnet_cond_embedding", "conv_out"))


def init_controlnet_params(cfg: ControlNetConfig, key: Array) -> dict:
  """Random float32 parameters (`unet_blocks.random_params`); the 1x1
  residual convs and the condition embedding's conv_out are zero, as in
  diffusers."""
  return random_params(abstract_controlnet_params(cfg), key,
                       zero=_is_zero_conv)


@functools.lru_cache(maxsize=8)
def _abstract(cfg: ControlNetConfig) -> dict:
  size = 2 ** (len(cfg.block_out_channels) - 1)
  big = size * cfg.cond_downscale
  sample = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels),
                                jnp.float32)
  cond = jax.ShapeDtypeStruct((1, big, big, cfg.conditioning_channels),
                              jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(ControlNetModel(cfg).init, jax.random.key(0),
                        sample, t, ctx, cond)["params"]


def abstract_controlnet_params(cfg: ControlNetConfig) -> dict:
  """The parameter tree as ShapeDtypeStructs (for loaders)."""
  return jax.tree.map(lambda x: x, _abstract(cfg))


def controlnet_params_from_state(cfg: ControlNetConfig,
                                 state: Mapping[str, np.ndarray], *,
                                 source: str = "state dict",
                                 dtype=np.float32) -> dict:
  """A diffusers ControlNet state dict (PyTorch layout, numpy) -> params.

  Raises:
    convert.ConversionError: a missing, extra or misshapen tensor (named).
  """
  return convert.params_from_torch_state(
      state.__getitem__, state.keys(), abstract_controlnet_params(cfg),
      literal=CONTROLNET_LITERAL, source=source, dtype=dtype)


def controlnet_params_from_unet(unet_params: Mapping,
                                controlnet_params: Mapping) -> dict:
  """diffusers `from_unet(load_weights_from_unet=True)`: copy conv_in,
  time_embedding, down_blocks_* and mid_block from the UNet; the condition
  embedding and the zero convs keep their values."""
  out = dict(controlnet_params)
  for name in unet_params:
    if name in ("conv_in", "time_embedding", "mid_block") or (
        name.startswith("down_blocks_")):
      if name not in out:
        raise ValueError(f"UNet module {name!r} has no ControlNet"
                         " counterpart (configs differ)")
      ok = jax.tree.map(lambda a, b: a.shape == b.shape, unet_params[name],
                        out[name])
      if not all(jax.tree.leaves(ok)):
        raise ValueError(f"UNet module {name!r} does not fit the ControlNet"
                         " (configs differ)")
      out[name] = unet_params[name]
  return out
