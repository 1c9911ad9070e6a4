"""SD 1.5-family UNet (diffusers `UNet2DConditionModel`) in Flax linen.

A pure-functional port of diffusers 0.39.0's `UNet2DConditionModel` for the
SD 1.x / 2.x / InstructPix2Pix configurations (video-editing brief §2.1);
behaviour read from diffusers, no code taken. Parameter paths mirror the
PyTorch state dict (`down_blocks.0.resnets.1.conv1.weight` <->
`down_blocks_0/resnets_1/conv1/kernel`); `time_embedding.linear_1` keeps its
literal `_1`, hence `UNET_LITERAL` for `convert.path_to_torch_key`.

Choices where the brief or diffusers leave room:
- Heads: diffusers' `attention_head_dim` is (for historical reasons) the
  number of heads, and the head width is `channels // heads`; we do the
  same. diffusers' UNet rejects a non-null `num_attention_heads`, so
  `from_diffusers_dict` rejects it too; the dataclass accepts it (it then
  names the head count and overrides `attention_head_dim`).
- Odd latent sizes are supported as diffusers does (`forward_upsample_size`):
  every upsampler resizes (nearest) to the spatial size of the skip it meets
  next, which is the plain x2 when sizes divide 2^(blocks-1).
- `down_block_additional_residuals` is ControlNet's only: it must come
  together with `mid_block_additional_residual` (diffusers' deprecated T2I-
  Adapter reading of a lone down tuple is not supported).
- Dropout is absent (inference semantics); `upcast_attention` is accepted
  and moot because logits and softmax are always float32.
- The output has the compute dtype (`config.dtype`); parameters stay float32
  and GroupNorm/LayerNorm compute in float32.
- Random initialisation (`init_unet_params`) is N(0, 1/fan_in) kernels, zero
  biases and unit norm scales from one flat draw, not PyTorch's or flax's
  defaults: it only serves tests, benchmarks and smoke runs, and a flax
  `init` of the UNet costs ~10 s of RNG-graph compilation on a 2-core CPU.

B: batch, H/W: latent height/width, C: channels, L: context tokens,
D: context width.
"""

import dataclasses
import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.diffusion import convert
from jaxlib_models.diffusion.attention import IMPLS, NO_HOOKS, SelfAttnHooks
from jaxlib_models.diffusion.unet_blocks import (
  DOWN_BLOCK_TYPES,
  DTYPES,
  MID_BLOCK_TYPES,
  UP_BLOCK_TYPES,
  BlockCommon,
  UpBlock,
  conv,
  embed_time,
  encoder_path,
  group_norm,
  mid_path,
  random_params,
)

Array = jax.Array

# Module names whose `_<int>` suffix is part of the PyTorch name.
UNET_LITERAL = frozenset({"linear_1", "linear_2"})

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"{name}={tuple(value)} needs one entry per block"
                       f" ({n} blocks)")
    return tuple(value)
  return (value,) * n


class BackboneConfigMixin:
  """Per-down-block tuples derived from int-or-tuple config fields."""

  @property
  def layers(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.down_block_types),
                      "layers_per_block")

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per block (diffusers: num_attention_heads or
    attention_head_dim); head width is channels // heads."""
    h = (self.attention_head_dim if self.num_attention_heads is None
         else self.num_attention_heads)
    return _per_block(h, len(self.down_block_types), "attention heads")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return _per_block(self.transformer_layers_per_block,
                      len(self.down_block_types),
                      "transformer_layers_per_block")

  @property
  def common(self) -> BlockCommon:
    return BlockCommon(groups=self.norm_num_groups, eps=self.norm_eps,
                       use_linear_projection=self.use_linear_projection,
                       downsample_padding=self.downsample_padding,
                       impl=self.attention_impl, dtype=self.dtype)

  def _tuplify(self, *names: str) -> None:
    for name in names:
      v = getattr(self, name)
      if isinstance(v, list):
        object.__setattr__(self, name, tuple(v))

  def _check_backbone(self) -> None:
    """Checks shared by the UNet and ControlNet configs."""
    n = len(self.block_out_channels)
    if n < 1 or len(self.down_block_types) != n:
      raise ValueError(
          f"down_block_types={self.down_block_types} needs one entry per"
          f" block_out_channels={self.block_out_channels}")
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"down_block_types: {t!r} is not supported (choose"
                         f" from {DOWN_BLOCK_TYPES})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"mid_block_type={self.mid_block_type!r} is not"
                       f" supported (choose from {MID_BLOCK_TYPES})")
    for name in ("layers", "heads", "transformer_layers"):
      for v in getattr(self, name):
        if not isinstance(v, int) or v < 1:
          raise ValueError(f"{name}={getattr(self, name)}: every entry must"
                           " be an int >= 1")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels entry {c} is not a multiple of"
                         f" norm_num_groups={self.norm_num_groups}")
    for c, h in zip(self.block_out_channels, self.heads):
      if c // h < 1:
        raise ValueError(f"{h} heads leave no width for {c} channels")
    if self.downsample_padding < 0:
      raise ValueError(f"{self.downsample_padding=} must be >= 0")
    if self.cross_attention_dim < 1 or self.in_channels < 1:
      raise ValueError("cross_attention_dim and in_channels must be >= 1")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: choose from {DTYPES}")
    if self.attention_impl not in IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: choose"
                       f" from {IMPLS}")


@dataclasses.dataclass(frozen=True)
class UNetConfig(BackboneConfigMixin):
  """UNet2DConditionModel hyper-parameters; defaults are SD 1.5's."""

  in_channels: int = 4  # 8 for InstructPix2Pix (latent ++ image latent).
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = SD15_DOWN_BLOCKS
  up_block_types: tuple[str, ...] = SD15_UP_BLOCKS
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  layers_per_block: int | tuple[int, ...] = 2  # Resnets per down block.
  transformer_layers_per_block: int | tuple[int, ...] = 1
  # diffusers' name for the number of heads per block (SD 1.5: 8; SD 2:
  # (5, 10, 20, 20)); head width is channels // heads.
  attention_head_dim: int | tuple[int, ...] = 8
  # The same, under its honest name; overrides attention_head_dim if set.
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 768  # D, the text-encoder width.
  norm_num_groups: int = 32
  norm_eps: float = 1e-5  # Resnet and output GroupNorm epsilon.
  flip_sin_to_cos: bool = True  # Timestep embedding is [cos, sin].
  freq_shift: float = 0  # Timestep frequency denominator half - shift.
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0  # Mid-block resnet output divisor.
  use_linear_projection: bool = False  # SD 2: Dense proj_in/out.
  center_input_sample: bool = False  # Feed 2 * sample - 1.
  time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0].
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  dtype: str = "float32"  # Compute dtype; params float32.
  attention_impl: str = "auto"  # attention.attend backend.

  def __post_init__(self):
    self._tuplify("block_out_channels", "down_block_types", "up_block_types",
                  "layers_per_block", "transformer_layers_per_block",
                  "attention_head_dim", "num_attention_heads")
    self._check_backbone()
    n = len(self.block_out_channels)
    if len(self.up_block_types) != n:
      raise ValueError(f"up_block_types={self.up_block_types} needs {n}"
                       " entries (one per block)")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"up_block_types: {t!r} is not supported (choose"
                         f" from {UP_BLOCK_TYPES})")
    if self.out_channels < 1:
      raise ValueError(f"{self.out_channels=} must be >= 1")
    for name in ("conv_in_kernel", "conv_out_kernel"):
      k = getattr(self, name)
      if k < 1 or k % 2 == 0:
        raise ValueError(f"{name}={k} must be odd and >= 1")
    if self.time_embedding_dim is not None and self.time_embedding_dim < 1:
      raise ValueError(f"{self.time_embedding_dim=} must be >= 1")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_self_attention_layers(self) -> int:
    """Number of `attn1` modules (SD 1.5: 16)."""
    tl = self.transformer_layers
    down = sum(l * t for kind, l, t in zip(self.down_block_types,
                                            self.layers, tl)
               if kind == "CrossAttnDownBlock2D")
    up = sum((l + 1) * t for kind, l, t in zip(self.up_block_types,
                                               self.layers[::-1], tl[::-1])
             if kind == "CrossAttnUpBlock2D")
    return down + tl[-1] + up

  @classmethod
  def from_diffusers_dict(cls, d: Mapping, *, source: str = "config.json",
                          **overrides) -> "UNetConfig":
    """From a diffusers `UNet2DConditionModel` config.json dict.

    Keys missing from `d` take diffusers' defaults (e.g.
    cross_attention_dim 1280), not SD 1.5's.

    Args:
      d: the parsed config.
      source: quoted in errors.
      **overrides: our own fields (`dtype`, `attention_impl`, ...).

    Raises:
      ValueError: a key names a feature this port lacks (or an unknown
        key); the message names the key.
    """
    if d.get("num_attention_heads") is not None:
      raise ValueError(
          f"{source}: num_attention_heads={d['num_attention_heads']}:"
          " diffusers' UNet2DConditionModel rejects this key (its"
          " attention_head_dim already means the number of heads)")
    kw = parse_diffusers_dict(d, _UNET_DEFAULTS, _UNET_FIXED, source)
    kw.pop("num_attention_heads", None)
    kw.update(overrides)
    return cls(**kw)


def sd15_unet_config(**overrides) -> UNetConfig:
  """SD 1.5 (`runwayml/stable-diffusion-v1-5` unet/config.json)."""
  return UNetConfig(**overrides)


# --------------------------------------------------------------------------
# diffusers config.json parsing (shared with the ControlNet).

# Keys that change nothing here.
_IGNORED = frozenset({"sample_size", "dropout", "upcast_attention",
                      "addition_embed_type_num_heads"})
FEATURE_DEFAULTS = dict(
    only_cross_attention=False, encoder_hid_dim=None,
    encoder_hid_dim_type=None, class_embed_type=None,
    addition_embed_type=None, addition_time_embed_dim=None,
    num_class_embeds=None, resnet_time_scale_shift="default",
    projection_class_embeddings_input_dim=None)
# Supported keys with diffusers' defaults (used when the key is absent).
_UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0, down_block_types=SD15_DOWN_BLOCKS,
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=SD15_UP_BLOCKS,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, num_attention_heads=None,
    use_linear_projection=False, time_embedding_dim=None, conv_in_kernel=3,
    conv_out_kernel=3)
# Unsupported features: each key must hold this value (or be absent).
_UNET_FIXED = dict(
    FEATURE_DEFAULTS, dual_cross_attention=False,
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None,
    attention_type="default", class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None,
    reverse_transformer_layers_per_block=None)


def _fixed_ok(key: str, value, want) -> bool:
  if value == want:
    return True
  if key in ("only_cross_attention", "mid_block_only_cross_attention"):
    vals = value if isinstance(value, (list, tuple)) else [value]
    return all(v in (False, None) for v in vals)
  if key == "act_fn":
    return value in ("silu", "swish")
  return False


def parse_diffusers_dict(d: Mapping, defaults: dict, fixed: dict,
                         source: str) -> dict:
  """Supported keys of a diffusers config dict, as dataclass kwargs.

  Args:
    d: the config dict.
    defaults: supported key -> diffusers' default.
    fixed: unsupported key -> the only value accepted (diffusers' default).
    source: quoted in errors.

  Raises:
    ValueError: naming the first unsupported or unknown key.
  """
  fixed = dict(fixed, act_fn="silu")
  out = dict(defaults)
  for key, value in d.items():
    if key.startswith("_") or key in _IGNORED:
      continue
    if key in fixed:
      if not _fixed_ok(key, value, fixed[key]):
        raise ValueError(
            f"{source}: {key}={value!r} is not supported by this port (only"
            f" {fixed[key]!r})")
    elif key in defaults:
      out[key] = tuple(value) if isinstance(value, list) else value
    else:
      raise ValueError(f"{source}: unknown config key {key!r}")
  if out.get("norm_num_groups") is None:
    raise ValueError(f"{source}: norm_num_groups=None (no output norm) is"
                     " not supported")
  cad = out.get("cross_attention_dim")
  if isinstance(cad, tuple):
    if len(set(cad)) != 1:
      raise ValueError(f"{source}: per-block cross_attention_dim={cad} is"
                       " not supported (one context width only)")
    out["cross_attention_dim"] = cad[0]
  return out


# --------------------------------------------------------------------------
# The model.


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  """Whether a residual of `shape` adds onto `target` without growing it
  (pooled ControlNet residuals are (B, 1, 1, C))."""
  try:
    return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
  except ValueError:
    return False


class UNet2DConditionModel(nn.Module):
  """diffusers `UNet2DConditionModel`, NHWC.

  Must be the top-level module (its blocks are `down_blocks_i`, `mid_block`,
  `up_blocks_i`): `SelfAttnHooks.fuse_paths` matches the first path entry.
  Self-attention layers (`attn1`) use `hooks`; cross-attention ones never do.
  """

  config: UNetConfig = UNetConfig()
  hooks: SelfAttnHooks = NO_HOOKS

  @nn.compact
  def __call__(
      self,
      sample: Array,
      timesteps: Array | float,
      encoder_hidden_states: Array,
      down_block_additional_residuals: tuple[Array, ...] | None = None,
      mid_block_additional_residual: Array | None = None,
  ) -> Array:
    """Predicts noise (or v) for `sample`.

    Args:
      sample: (B, H, W, in_channels) noisy latents.
      timesteps: scalar, (1,) or (B,).
      encoder_hidden_states: (B, L, D) text states.
      down_block_additional_residuals: ControlNet residuals, one per skip
        state (NHWC, 3 * len(blocks) for SD-like configs); added to the skips.
      mid_block_additional_residual: ControlNet residual added to the mid
        block output; required with the down residuals and vice versa.

    Returns:
      (B, H, W, out_channels) in the compute dtype.
    """
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    cm = cfg.common
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample {sample.shape} must be (B, H, W,"
                       f" {cfg.in_channels}) (NHWC)")
    if (down_block_additional_residuals is None) != (
        mid_block_additional_residual is None):
      raise ValueError("ControlNet residuals come in pairs: pass both"
                       " down_block_additional_residuals and"
                       " mid_block_additional_residual, or neither")
    n = len(cfg.block_out_channels)
    n_skips = 1 + sum(cfg.layers) + n - 1
    if down_block_additional_residuals is not None and len(
        down_block_additional_residuals) != n_skips:
      raise ValueError(f"{len(down_block_additional_residuals)} down"
                       f" residuals for {n_skips} skip states")
    b = sample.shape[0]
    x = sample.astype(dt)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    ctx = encoder_hidden_states.astype(dt)
    temb = embed_time(timesteps, b, channels=cfg.block_out_channels[0],
                      features=cfg.time_embed_dim,
                      flip_sin_to_cos=cfg.flip_sin_to_cos,
                      freq_shift=cfg.freq_shift, dtype=cfg.dtype)
    x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, "conv_in",
             cfg.dtype)(x)
    x, skips = encoder_path(cfg, cm, self.hooks, x, temb, ctx)
    if down_block_additional_residuals is not None:
      res = tuple(down_block_additional_residuals)
      for i, (s, r) in enumerate(zip(skips, res)):
        if not _broadcasts(r.shape, s.shape):
          raise ValueError(f"down residual {i} has shape {r.shape}, the skip"
                           f" state has {s.shape}")
      skips = [s + r.astype(dt) for s, r in zip(skips, res)]
    x = mid_path(cfg, cm, self.hooks, x, temb, ctx)
    if mid_block_additional_residual is not None:
      if not _broadcasts(mid_block_additional_residual.shape, x.shape):
        raise ValueError(f"mid residual {mid_block_additional_residual.shape}"
                         f" does not match the mid block output {x.shape}")
      x = x + mid_block_additional_residual.astype(dt)
    chans = cfg.block_out_channels[::-1]
    heads = cfg.heads[::-1]
    layers = cfg.layers[::-1]
    tls = cfg.transformer_layers[::-1]
    for i, kind in enumerate(cfg.up_block_types):
      k = layers[i] + 1
      res_i, skips = tuple(skips[-k:]), skips[:-k]
      last = i == n - 1
      size = None if last else tuple(skips[-1].shape[1:3])
      x = UpBlock(chans[i], k, attention=kind == "CrossAttnUpBlock2D",
                  add_upsample=not last, heads=heads[i],
                  transformer_layers=tls[i], common=cm, hooks=self.hooks,
                  name=f"up_blocks_{i}")(x, res_i, temb, ctx, size)
    x = nn.silu(group_norm(x, cfg.norm_num_groups, cfg.norm_eps,
                           "conv_norm_out"))
    return conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out",
                cfg.dtype)(x)


def _dummy_inputs(cfg) -> tuple[Array, Array, Array]:
  size = 2 ** (len(cfg.block_out_channels) - 1)
  sample = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
  ctx = jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32)
  return sample, jnp.zeros((1,), jnp.float32), ctx


def init_unet_params(cfg: UNetConfig, key: Array) -> dict:
  """Random float32 parameters (`unet_blocks.random_params`: N(0, 1/fan_in)
  kernels, zero biases, unit norm scales)."""
  return random_params(abstract_unet_params(cfg), key)


@functools.lru_cache(maxsize=8)
def _abstract(cfg: UNetConfig) -> dict:
  model = UNet2DConditionModel(cfg)
  return jax.eval_shape(model.init, jax.random.key(0),
                        *_dummy_inputs(cfg))["params"]


def abstract_unet_params(cfg: UNetConfig) -> dict:
  """The parameter tree as ShapeDtypeStructs (no compute, for loaders)."""
  return jax.tree.map(lambda x: x, _abstract(cfg))


def unet_params_from_state(cfg: UNetConfig,
                           state: Mapping[str, np.ndarray], *,
                           source: str = "state dict",
                           dtype=np.float32) -> dict:
  """A diffusers UNet state dict (PyTorch layout, numpy) -> our params.

  Raises:
    convert.ConversionError: a missing, extra or misshapen tensor (named).
  """
  return convert.params_from_torch_state(
      state.__getitem__, state.keys(), abstract_unet_params(cfg),
      literal=UNET_LITERAL, source=source, dtype=dtype)
