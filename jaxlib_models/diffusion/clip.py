"""CLIP text encoder (SD 1.5 conditioning) and CLIP vision tower (metrics).

Pure-functional Flax linen ports of transformers' `CLIPTextModel`,
`CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection` (Radford et
al., arXiv 2103.00020; behaviour read from transformers 5.x, no code taken).
Submodules are named after the PyTorch state-dict keys of the SD / transformers
4 layout, with an integer segment joined to its parent by `_`:

  torch `text_model.encoder.layers.3.self_attn.q_proj.weight` (out, in)
  flax  `params["text_model"]["encoder"]["layers_3"]["self_attn"]["q_proj"]
        ["kernel"]` (in, out)

so `diffusion.convert` maps one to the other mechanically.

B: batch, L: tokens, H: heads, K: head dim, D: width, F: MLP width,
P: patch size, C: image channels, E: projection dim.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
_DTYPES = ("float32", "bfloat16", "float16")

# CLIP image normalisation (openai/clip-vit-*; arXiv 2103.00020 code).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_common(c) -> None:
  if c.hidden_size % c.num_attention_heads:
    raise ValueError(
        f"hidden_size={c.hidden_size} is not a multiple of"
        f" num_attention_heads={c.num_attention_heads}")
  if c.hidden_act not in _ACTS:
    raise ValueError(f"hidden_act={c.hidden_act!r}: supported are {_ACTS}")
  if c.dtype not in _DTYPES:
    raise ValueError(f"dtype={c.dtype!r}: supported are {_DTYPES}")
  for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads"):
    if getattr(c, name) < 1:
      raise ValueError(f"{name}={getattr(c, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP text transformer; defaults are SD 1.5's (openai ViT-L/14 text)."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x); "gelu" for OpenCLIP.
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  # EOS rule of the pooled output: 2 (legacy configs) takes the argmax of the
  # ids, anything else the first position holding eos_token_id.
  eos_token_id: int = 49407
  # Width of `text_projection` (CLIPTextModelWithProjection / CLIPModel), or
  # None for the plain CLIPTextModel that SD uses.
  projection_dim: int | None = None
  dtype: str = "float32"  # Compute dtype; LayerNorm and softmax in float32.

  def __post_init__(self):
    _check_common(self)
    if self.vocab_size < 1 or self.max_position_embeddings < 1:
      raise ValueError("vocab_size and max_position_embeddings must be >= 1")
    if self.eos_token_id != 2 and not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(
          f"eos_token_id={self.eos_token_id} lies outside the vocabulary"
          f" (size {self.vocab_size}); the pooled output would never find it")
    if self.projection_dim is not None and self.projection_dim < 1:
      raise ValueError(f"projection_dim={self.projection_dim} must be >= 1")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, d: dict, *, with_projection: bool | None = None,
                   source: str = "config.json") -> "CLIPTextConfig":
    """From a transformers config dict (`clip_text_model` or `clip`).

    Args:
      d: the parsed `config.json`.
      with_projection: keep `text_projection`; None: only when the folder is a
        CLIPModel or a CLIPTextModelWithProjection.
      source: quoted in errors.
    """
    kind = d.get("model_type", "clip_text_model")
    archs = d.get("architectures") or []
    top = d
    if kind == "clip":
      d = dict(d.get("text_config") or {})
      proj = top.get("projection_dim", 512)
      has_proj = True
    elif kind == "clip_text_model":
      proj = d.get("projection_dim", 512)
      has_proj = "CLIPTextModelWithProjection" in archs
    else:
      raise ValueError(f"{source}: model_type {kind!r} is not a CLIP text"
                       " model (clip_text_model or clip)")
    if with_projection is None:
      with_projection = has_proj
    elif with_projection and not has_proj:
      raise ValueError(f"{source}: {archs or kind} has no text_projection")
    eos = d.get("eos_token_id", 49407)  # transformers' current default
    return cls(
        vocab_size=d.get("vocab_size", 49408),
        hidden_size=d.get("hidden_size", 512),
        intermediate_size=d.get("intermediate_size", 2048),
        num_hidden_layers=d.get("num_hidden_layers", 12),
        num_attention_heads=d.get("num_attention_heads", 8),
        max_position_embeddings=d.get("max_position_embeddings", 77),
        hidden_act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        pad_token_id=d.get("pad_token_id", 1),
        bos_token_id=d.get("bos_token_id", 49406),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        projection_dim=proj if with_projection else None,
    )

  def to_hf_dict(self) -> dict:
    arch = ("CLIPTextModel" if self.projection_dim is None
            else "CLIPTextModelWithProjection")
    return dict(
        architectures=[arch], model_type="clip_text_model",
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        max_position_embeddings=self.max_position_embeddings,
        hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
        pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
        eos_token_id=self.eos_token_id,
        projection_dim=self.projection_dim or 512,
        attention_dropout=0.0, dtype="float32")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """CLIP ViT tower; defaults are openai/clip-vit-base-patch32's."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Width of `visual_projection`, or None for the plain CLIPVisionModel.
  projection_dim: int | None = 512
  dtype: str = "float32"

  def __post_init__(self):
    _check_common(self)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of"
                       f" patch_size={self.patch_size}")
    if self.projection_dim is not None and self.projection_dim < 1:
      raise ValueError(f"projection_dim={self.projection_dim} must be >= 1")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_hf_dict(cls, d: dict, *, with_projection: bool | None = None,
                   source: str = "config.json") -> "CLIPVisionConfig":
    """From a transformers config dict (`clip_vision_model` or `clip`)."""
    kind = d.get("model_type", "clip_vision_model")
    archs = d.get("architectures") or []
    top = d
    if kind == "clip":
      d = dict(d.get("vision_config") or {})
      proj = top.get("projection_dim", 512)
      has_proj = True
    elif kind == "clip_vision_model":
      proj = d.get("projection_dim", 512)
      has_proj = "CLIPVisionModel" not in archs
    else:
      raise ValueError(f"{source}: model_type {kind!r} is not a CLIP vision"
                       " model (clip_vision_model or clip)")
    if with_projection is None:
      with_projection = has_proj
    elif with_projection and not has_proj:
      raise ValueError(f"{source}: {archs or kind} has no visual_projection")
    return cls(
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_hidden_layers=d.get("num_hidden_layers", 12),
        num_attention_heads=d.get("num_attention_heads", 12),
        num_channels=d.get("num_channels", 3),
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 32),
        hidden_act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        projection_dim=proj if with_projection else None,
    )

  def to_hf_dict(self) -> dict:
    arch = ("CLIPVisionModel" if self.projection_dim is None
            else "CLIPVisionModelWithProjection")
    return dict(
        architectures=[arch], model_type="clip_vision_model",
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_channels=self.num_channels, image_size=self.image_size,
        patch_size=self.patch_size, hidden_act=self.hidden_act,
        layer_norm_eps=self.layer_norm_eps,
        projection_dim=self.projection_dim or 512, attention_dropout=0.0,
        dtype="float32")


def sd15_text_config() -> CLIPTextConfig:
  """SD 1.5's text encoder (openai/clip-vit-large-patch14 text tower)."""
  return CLIPTextConfig()


# --------------------------------------------------------------------------
# Modules.


def _act(name: str, x: Array) -> Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  return jax.nn.gelu(x, approximate=True)  # gelu_new, gelu_pytorch_tanh


def _dense(features: int, name: str, dt, bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, name=name, dtype=dt,
                  param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02))


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Two-pass variance like torch; output in float32, cast by the caller.
  return nn.LayerNorm(epsilon=eps, name=name, dtype=jnp.float32,
                      param_dtype=jnp.float32, use_fast_variance=False)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with optional (B, L, L) boolean mask."""

  cfg: Any

  @nn.compact
  def __call__(self, x_BLD: Array, mask_BLL: Array | None) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    b, l, d = x_BLD.shape
    h, k = c.num_attention_heads, c.head_dim
    q_BLHK = _dense(d, "q_proj", dt)(x_BLD).reshape(b, l, h, k)
    k_BLHK = _dense(d, "k_proj", dt)(x_BLD).reshape(b, l, h, k)
    v_BLHK = _dense(d, "v_proj", dt)(x_BLD).reshape(b, l, h, k)
    logits_BHLM = jnp.einsum("BLHK,BMHK->BHLM", q_BLHK, k_BLHK,
                             preferred_element_type=jnp.float32)
    logits_BHLM = logits_BHLM * (k ** -0.5)
    if mask_BLL is not None:
      logits_BHLM = jnp.where(mask_BLL[:, None], logits_BHLM,
                              jnp.finfo(jnp.float32).min)
    probs_BHLM = jax.nn.softmax(logits_BHLM, axis=-1).astype(dt)
    o_BLHK = jnp.einsum("BHLM,BMHK->BLHK", probs_BHLM, v_BLHK)
    return _dense(d, "out_proj", dt)(o_BLHK.reshape(b, l, d))


class CLIPMLP(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x_BLD: Array) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h_BLF = _act(c.hidden_act, _dense(c.intermediate_size, "fc1", dt)(x_BLD))
    return _dense(c.hidden_size, "fc2", dt)(h_BLF)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN1 x), then + mlp(LN2 x)."""

  cfg: Any

  @nn.compact
  def __call__(self, x_BLD: Array, mask_BLL: Array | None) -> Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h = _layer_norm(c.layer_norm_eps, "layer_norm1")(x_BLD).astype(dt)
    x_BLD = x_BLD + CLIPAttention(c, name="self_attn")(h, mask_BLL)
    h = _layer_norm(c.layer_norm_eps, "layer_norm2")(x_BLD).astype(dt)
    return x_BLD + CLIPMLP(c, name="mlp")(h)


class CLIPEncoder(nn.Module):
  cfg: Any

  def setup(self):
    # A list attribute: flax names the entries layers_0, layers_1, ...
    self.layers = [CLIPEncoderLayer(self.cfg)
                   for _ in range(self.cfg.num_hidden_layers)]

  def __call__(self, x_BLD: Array, mask_BLL: Array | None) -> Array:
    for layer in self.layers:
      x_BLD = layer(x_BLD, mask_BLL)
    return x_BLD


class CLIPTextEmbeddings(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BL: Array, pos_BL: Array) -> Array:
    c = self.cfg
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init,
                   param_dtype=jnp.float32, name="token_embedding")
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size,
                   embedding_init=init, param_dtype=jnp.float32,
                   name="position_embedding")
    return tok(ids_BL) + pos(pos_BL)


class CLIPTextTransformer(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BL, pos_BL, mask_BLL):
    c = self.cfg
    x_BLD = CLIPTextEmbeddings(c, name="embeddings")(ids_BL, pos_BL)
    x_BLD = x_BLD.astype(jnp.dtype(c.dtype))
    x_BLD = CLIPEncoder(c, name="encoder")(x_BLD, mask_BLL)
    return _layer_norm(c.layer_norm_eps, "final_layer_norm")(x_BLD)


class CLIPTextModule(nn.Module):
  """`text_model` (+ `text_projection` when cfg.projection_dim is set)."""

  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BL, pos_BL, mask_BLL):
    c = self.cfg
    hidden_BLD = CLIPTextTransformer(c, name="text_model")(ids_BL, pos_BL,
                                                           mask_BLL)
    if c.eos_token_id == 2:  # legacy configs: EOS has the largest id
      eos_B = jnp.argmax(ids_BL, axis=-1)
    else:  # first EOS (padding may repeat it)
      eos_B = jnp.argmax(ids_BL == c.eos_token_id, axis=-1)
    pooled_BD = jnp.take_along_axis(hidden_BLD, eos_B[:, None, None],
                                    axis=1)[:, 0]
    embeds_BE = None
    if c.projection_dim is not None:
      embeds_BE = _dense(c.projection_dim, "text_projection", jnp.float32,
                         bias=False)(pooled_BD)
    return hidden_BLD, pooled_BD, embeds_BE


class CLIPVisionEmbeddings(nn.Module):
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BHWC: Array) -> Array:
    c = self.cfg
    d = c.hidden_size
    cls_D = self.param("class_embedding", nn.initializers.normal(d ** -0.5),
                       (d,), jnp.float32)
    p = c.patch_size
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID",
                      use_bias=False, dtype=jnp.dtype(c.dtype),
                      param_dtype=jnp.float32,
                      kernel_init=nn.initializers.normal(0.02),
                      name="patch_embedding")(pixels_BHWC)
    b = patches.shape[0]
    patches_BND = patches.reshape(b, -1, d).astype(jnp.float32)
    cls_B1D = jnp.broadcast_to(cls_D, (b, 1, d))
    x_BLD = jnp.concatenate([cls_B1D, patches_BND], axis=1)
    pos = nn.Embed(c.num_positions, d,
                   embedding_init=nn.initializers.normal(0.02),
                   param_dtype=jnp.float32, name="position_embedding")
    return x_BLD + pos(jnp.arange(c.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BHWC):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    x_BLD = CLIPVisionEmbeddings(c, name="embeddings")(pixels_BHWC)
    # "pre_layrnorm" (sic) is the PyTorch module name.
    x_BLD = _layer_norm(c.layer_norm_eps, "pre_layrnorm")(x_BLD).astype(dt)
    x_BLD = CLIPEncoder(c, name="encoder")(x_BLD, None)
    pooled_BD = _layer_norm(c.layer_norm_eps, "post_layernorm")(x_BLD[:, 0])
    return x_BLD.astype(jnp.float32), pooled_BD


class CLIPVisionModule(nn.Module):
  """`vision_model` (+ `visual_projection` when cfg.projection_dim is set)."""

  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BHWC):
    c = self.cfg
    hidden_BLD, pooled_BD = CLIPVisionTransformer(c, name="vision_model")(
        pixels_BHWC)
    embeds_BE = None
    if c.projection_dim is not None:
      embeds_BE = _dense(c.projection_dim, "visual_projection", jnp.float32,
                         bias=False)(pooled_BD)
    return hidden_BLD, pooled_BD, embeds_BE


# --------------------------------------------------------------------------
# Public functions.


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: Array  # (B, L, D) float32, after final_layer_norm.
  pooler_output: Array  # (B, D) float32, hidden state at the EOS position.
  text_embeds: Array | None  # (B, E) projected pooled output, or None.


@flax.struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: Array  # (B, 1 + (S/P)^2, D) float32, no post-LN.
  pooler_output: Array  # (B, D) float32: post_layernorm(class token).
  image_embeds: Array | None  # (B, E) visual_projection(pooled), or None.


@functools.partial(jax.jit, static_argnums=1)
def _text_apply(params, cfg, ids_BL, pos_BL, mask_BLL) -> CLIPTextOutput:
  hidden, pooled, embeds = CLIPTextModule(cfg).apply(
      {"params": params}, ids_BL, pos_BL, mask_BLL)
  return CLIPTextOutput(hidden, pooled, embeds)


@functools.partial(jax.jit, static_argnums=1)
def _vision_apply(params, cfg, pixels_BHWC) -> CLIPVisionOutput:
  hidden, pooled, embeds = CLIPVisionModule(cfg).apply({"params": params},
                                                       pixels_BHWC)
  return CLIPVisionOutput(hidden, pooled, embeds)


def _text_mask(attention_mask, b: int, l: int) -> Array:
  causal_LL = jnp.tril(jnp.ones((l, l), bool))
  if attention_mask is None:
    return jnp.broadcast_to(causal_LL, (b, l, l))
  keep_BL = jnp.asarray(attention_mask).astype(bool)
  return causal_LL[None] & keep_BL[:, None, :]


def encode_text(
    params,
    cfg: CLIPTextConfig,
    input_ids: jax.typing.ArrayLike,
    *,
    attention_mask: jax.typing.ArrayLike | None = None,
    position_ids: jax.typing.ArrayLike | None = None,
) -> CLIPTextOutput:
  """Runs the CLIP text transformer (causal mask, as transformers does).

  Args:
    params: tree of `init_text_params` / `convert.load_clip_text`.
    cfg: architecture.
    input_ids: (B, L) ids, L <= max_position_embeddings (SD: L = 77, padded
      with the tokenizer's pad id, no attention mask).
    attention_mask: optional (B, L), 0 on padding keys; combined with the
      causal mask.
    position_ids: optional (B, L) positions; default arange(L).

  Returns:
    CLIPTextOutput; SD consumes `last_hidden_state`.
  """
  ids_BL = jnp.asarray(input_ids, jnp.int32)
  if ids_BL.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got {ids_BL.shape}")
  b, l = ids_BL.shape
  if l > cfg.max_position_embeddings:
    raise ValueError(f"sequence length {l} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if position_ids is None:
    pos_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  else:
    pos_BL = jnp.broadcast_to(jnp.asarray(position_ids, jnp.int32), (b, l))
  mask_BLL = _text_mask(attention_mask, b, l)
  return _text_apply(params, cfg, ids_BL, pos_BL, mask_BLL)


def encode_image(
    params,
    cfg: CLIPVisionConfig,
    pixel_values: jax.typing.ArrayLike,
    *,
    data_format: str = "NHWC",
) -> CLIPVisionOutput:
  """Runs the CLIP vision tower on normalised pixels.

  Args:
    params: tree of `init_vision_params` / `convert.load_clip_vision`.
    cfg: architecture.
    pixel_values: (B, S, S, C) with `data_format="NHWC"` (default), or
      (B, C, S, S) with "NCHW" (PyTorch layout); S must equal cfg.image_size,
      values already normalised with CLIP_MEAN / CLIP_STD.
    data_format: "NHWC" or "NCHW".

  Returns:
    CLIPVisionOutput; CLIP scores use `image_embeds`.
  """
  x = jnp.asarray(pixel_values, jnp.float32)
  if data_format == "NCHW":
    x = jnp.transpose(x, (0, 2, 3, 1))
  elif data_format != "NHWC":
    raise ValueError(f"data_format={data_format!r}: use 'NHWC' or 'NCHW'")
  s, c = cfg.image_size, cfg.num_channels
  if x.ndim != 4 or x.shape[1:] != (s, s, c):
    raise ValueError(
        f"pixel_values {data_format} shape {tuple(jnp.shape(pixel_values))}"
        f" does not match image_size={s}, num_channels={c}")
  return _vision_apply(params, cfg, x)


def init_text_params(cfg: CLIPTextConfig, rng: Array) -> dict:
  """Random float32 parameters (normal 0.02; a smoke-test initialiser)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  fn = lambda r: CLIPTextModule(cfg).init(
      r, ids, ids, jnp.ones((1, 2, 2), bool))["params"]
  return jax.jit(fn)(rng)


def init_vision_params(cfg: CLIPVisionConfig, rng: Array) -> dict:
  """Random float32 parameters (normal 0.02; a smoke-test initialiser)."""
  s, c = cfg.image_size, cfg.num_channels
  x = jnp.zeros((1, s, s, c), jnp.float32)
  fn = lambda r: CLIPVisionModule(cfg).init(r, x)["params"]
  return jax.jit(fn)(rng)


def normalize_image(images: jax.typing.ArrayLike) -> Array:
  """(…, C=3) RGB in [0, 1] -> CLIP-normalised pixels (resizing not done)."""
  x = jnp.asarray(images, jnp.float32)
  mean = jnp.asarray(CLIP_MEAN, jnp.float32).reshape((1,) * (x.ndim - 1) + (3,))
  std = jnp.asarray(CLIP_STD, jnp.float32).reshape((1,) * (x.ndim - 1) + (3,))
  return (x - mean) / std


def cosine_similarity(a: Array, b: Array) -> Array:
  """Row-wise cosine of (…, E) embeddings (CLIP score building block)."""
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  return jnp.sum(a * b, axis=-1)
