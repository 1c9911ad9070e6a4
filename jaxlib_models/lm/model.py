"""Pure-functional Flax Llama-family causal LM with a KV cache and early exits.

One pass returns the final logits and, for any static set of exit layers,
early-exit logits `z_j = head(RMSNorm_final(h_j))` (exit j = output of block j,
0 = the embeddings, L = the ordinary output); the final norm is applied exactly
once per exit. Submodules are named after the PyTorch state-dict keys (see
`lm.config` for the tree), blocks run under `nn.scan` so parameters are
stacked on a leading layer axis and compile time does not grow with depth.

The KV cache is explicit state: `KVCache(k, v, valid, index)` with k/v of shape
(L, B, S, n_kv, d_h). A call writes its T new keys at slots [index, index+T)
and attends over all S slots that are valid and not in the future. The same
call does prefill (empty cache), decode (T = 1) and shared-prefix scoring (a
prefix cache broadcast to a batch of candidates).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlib_models.lm.config import LlamaConfig

Array = jax.Array
_NEG = -1e30


@flax.struct.dataclass
class KVCache:
  """Per-layer keys/values, slot validity and the next write slot."""

  k: Array  # (L, B, S, n_kv, d_h)
  v: Array  # (L, B, S, n_kv, d_h)
  valid: Array  # (B, S) bool: slot holds a real (non-pad) token.
  index: Array  # () int32: first free slot.

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def broadcast(self, batch: int) -> "KVCache":
    """Repeats a batch-1 cache `batch` times (shared-prefix scoring)."""
    if self.k.shape[1] != 1:
      raise ValueError(f"broadcast needs a batch-1 cache, got {self.k.shape}")
    rep = lambda x, ax: jnp.repeat(x, batch, axis=ax)
    return KVCache(rep(self.k, 1), rep(self.v, 1), rep(self.valid, 0),
                   self.index)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int,
               dtype=jnp.float32) -> KVCache:
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads,
           cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def rope_inv_freq(cfg: LlamaConfig) -> jnp.ndarray:
  """Inverse frequencies, with the Llama-3 scaling when configured."""
  dh = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  rs = cfg.rope_scaling_dict
  if rs and rs.get("rope_type", rs.get("type")) == "llama3":
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / low, old / high
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    inv = jnp.where(is_mid, mid, scaled)
  return inv


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Half-layout RoPE: dims j and j + d_h/2 form a rotated pair."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * w).astype(self.dtype)


def _dense(features, name, bias, dtype):
  return nn.Dense(features, use_bias=bias, name=name, dtype=dtype,
                  param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02))


class LlamaAttention(nn.Module):
  """Grouped-query attention over the new tokens and the cache.

  `kv` is either None (no cache), the stacked (K, V) cache of every layer,
  each (L, B, S, n_kv, d_h), which this layer updates at (layer, :, index)
  and returns, or with `shared_prefix` a read-only batch-1 stacked prefix.
  """

  cfg: LlamaConfig
  shared_prefix: bool = False

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, layer, cache_index):
    c = self.cfg
    b, t, _ = x.shape
    h, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    dt = jnp.dtype(c.dtype)
    q = _dense(h * dh, "q_proj", c.attention_bias, dt)(x).reshape(b, t, h, dh)
    k = _dense(hkv * dh, "k_proj", c.attention_bias, dt)(x)
    v = _dense(hkv * dh, "v_proj", c.attention_bias, dt)(x)
    k, v = k.reshape(b, t, hkv, dh), v.reshape(b, t, hkv, dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    g = h // hkv
    q = q.reshape(b, t, hkv, g, dh)
    if self.shared_prefix:  # read-only batch-1 prefix + own causal keys
      ck, cv = (_layer_slice(a, layer)[0].astype(dt) for a in kv)
      prefix_mask, own_mask = mask
      s1 = jnp.einsum("btkgd,skd->bkgts", q, ck,
                      preferred_element_type=jnp.float32)
      s2 = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)
      s1 = jnp.where(prefix_mask[None, None, None, None], s1, _NEG)
      s2 = jnp.where(own_mask[:, None, None], s2, _NEG)
      sc = jnp.concatenate([s1, s2], -1) / math.sqrt(dh)
      p = jax.nn.softmax(sc, axis=-1).astype(dt)
      n = ck.shape[0]
      o = (jnp.einsum("bkgts,skd->btkgd", p[..., :n], cv)
           + jnp.einsum("bkgts,bskd->btkgd", p[..., n:], v))
      o = o.reshape(b, t, h * dh)
      return _dense(c.hidden_size, "o_proj", False, dt)(o), kv
    if kv is not None:
      # Write this layer's new keys into the stacked cache (an in-place
      # update of the scan carry) and attend over the layer's slots.
      start = (layer, 0, cache_index, 0, 0)
      kv = tuple(jax.lax.dynamic_update_slice(a, n[None].astype(a.dtype),
                                              start)
                 for a, n in zip(kv, (k, v)))
      k, v = (_layer_slice(a, layer).astype(dt) for a in kv)
    if mask is None and c.attention == "fused":  # plain causal, no cache
      o = jax.nn.dot_product_attention(
          q.reshape(b, t, h, dh), k, v, is_causal=True,
          implementation=_fused_impl(dt, dh)).reshape(b, t, h * dh)
      return _dense(c.hidden_size, "o_proj", False, dt)(o), kv
    s = jnp.einsum("btkgd,bskd->bkgts", q, k,
                   preferred_element_type=jnp.float32) / math.sqrt(dh)
    if mask is None:
      mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None]
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(dt)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h * dh)
    o = _dense(c.hidden_size, "o_proj", False, dt)(o)
    return o, kv


def _fused_impl(dt, dh: int) -> str | None:
  """cuDNN flash attention where it applies (a GPU, 16-bit compute, head
  size a multiple of 8 up to 128); otherwise XLA's implementation (None:
  jax.nn.dot_product_attention does not pick cuDNN by itself)."""
  if (jax.default_backend() == "gpu" and dt in (jnp.bfloat16, jnp.float16)
      and dh % 8 == 0 and dh <= 128):
    return "cudnn"
  return None


def _layer_slice(a: Array, layer: Array) -> Array:
  return jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)


class LlamaMLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    gate = _dense(c.intermediate_size, "gate_proj", False, dt)(x)
    up = _dense(c.intermediate_size, "up_proj", False, dt)(x)
    return _dense(c.hidden_size, "down_proj", False, dt)(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
  """One block; under `nn.scan` the carry is (x, stacked cache or None)."""

  cfg: LlamaConfig
  shared_prefix: bool = False

  @nn.compact
  def __call__(self, carry, layer, cos, sin, mask, cache_index):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x, kv = carry
    a, kv = LlamaAttention(c, self.shared_prefix, name="self_attn")(
        RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(x), cos, sin,
        mask, kv, layer, cache_index)
    x = x + a
    x = x + LlamaMLP(c, name="mlp")(
        RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(x))
    return (x, kv), x


class LlamaModel(nn.Module):
  """Embedding, scanned blocks and final norm; returns all hidden states.

  The stacked KV cache rides in the scan carry, not in its per-layer inputs
  and outputs: as xs/ys every call would slice every layer's cache out and
  assemble a fresh (L, B, S, n_kv, d_h) copy; as a carry XLA writes the new
  tokens into the (donated) buffers in place.
  """

  cfg: LlamaConfig
  shared_prefix: bool = False

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size,
                                 param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(0.02))
    block = LlamaDecoderLayer
    if c.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if c.remat == "dots" else None)
      block = nn.remat(LlamaDecoderLayer, policy=policy, prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_hidden_layers,
    )(c, self.shared_prefix)
    self.norm = RMSNorm(c.rms_norm_eps, jnp.float32)

  def __call__(self, tokens, positions, mask, cache, cache_index):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x = self.embed_tokens(tokens).astype(dt)
    ang = positions[..., None].astype(jnp.float32) * rope_inv_freq(c)
    cos, sin = jnp.cos(ang).astype(dt), jnp.sin(ang).astype(dt)
    layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
    (_, new_cache), hidden = self.layers((x, cache), layer_ids, cos, sin,
                                         mask, cache_index)
    hidden = jnp.concatenate([x[None], hidden], 0)  # (L+1, B, T, D)
    return hidden, new_cache


class LlamaForCausalLM(nn.Module):
  cfg: LlamaConfig
  shared_prefix: bool = False

  def setup(self):
    self.model = LlamaModel(self.cfg, self.shared_prefix)
    if not self.cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(self.cfg.vocab_size, use_bias=False,
                              param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(0.02))

  def __call__(self, tokens, positions, mask, cache, cache_index, exit_layers,
               logits_for):
    hidden, new_cache = self.model(tokens, positions, mask, cache, cache_index)
    if logits_for is None:
      return hidden, {}, new_cache

    def head(h):
      h = self.model.norm(h)
      if self.cfg.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", h, self.model.embed_tokens.embedding,
                          preferred_element_type=jnp.float32)
      return self.lm_head(h).astype(jnp.float32)

    if logits_for != "all":  # (B, K) positions at which logits are needed
      idx = jnp.asarray(logits_for)
      hidden_sel = jnp.take_along_axis(hidden, idx[None, :, :, None], axis=2)
    else:
      hidden_sel = hidden
    layers = sorted(set(exit_layers) | {self.cfg.num_hidden_layers})
    out = {j: head(hidden_sel[j]) for j in layers}
    return hidden, out, new_cache


@dataclasses.dataclass
class LMOutput:
  logits: Array | None  # (B, T or K, V) float32 final logits
  exits: dict  # {layer: (B, T or K, V) float32}; includes L when asked
  cache: KVCache | None
  hidden: Array | None  # (L+1, B, T, D) when requested


jax.tree_util.register_dataclass(
    LMOutput, data_fields=["logits", "exits", "cache", "hidden"],
    meta_fields=[])


def check_exit_layers(cfg: LlamaConfig, exit_layers: Sequence[int]) -> tuple:
  bad = [j for j in exit_layers if not 0 <= int(j) <= cfg.num_hidden_layers]
  if bad:
    raise ValueError(
        f"exit layer(s) {bad} out of range: valid are 0 (embeddings) to"
        f" {cfg.num_hidden_layers} (final output) for this"
        f" {cfg.num_hidden_layers}-layer model")
  return tuple(sorted(set(int(j) for j in exit_layers)))


def forward(
    params,
    cfg: LlamaConfig,
    tokens: Array,
    *,
    positions: Array | None = None,
    token_mask: Array | None = None,
    cache: KVCache | None = None,
    prefix: KVCache | None = None,
    segment_ids: Array | None = None,
    exit_layers: Sequence[int] = (),
    logits_for: Any = "all",
    return_hidden: bool = False,
) -> LMOutput:
  """Runs the decoder.

  Args:
    params: the parameter tree (`lm.config` docstring).
    cfg: architecture.
    tokens: (B, T) int ids.
    positions: (B, T) RoPE positions; default cache.index + arange(T) (or
      arange(T) without a cache).
    token_mask: (B, T) bool, False on padding (never attended to).
    cache: KV cache; the new keys land at slots [cache.index, +T).
    prefix: a read-only batch-1 cache shared by all B rows (shared-prefix
      scoring without copying it B times); positions must then be given.
    segment_ids: (B, T) ints for sequence packing: a token attends only to
      earlier tokens of its own segment (and to the prefix/cache).
    exit_layers: static early-exit layers (0..L); L is always computed.
    logits_for: "all", None (no logits: prefill only) or (B, K) int positions.
    return_hidden: also return every hidden state (L+1, B, T, D).

  Returns:
    LMOutput with float32 logits (final norm applied once per exit).
  """
  exit_layers = check_exit_layers(cfg, exit_layers)
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  plain_causal = token_mask is None and segment_ids is None
  if token_mask is None:
    token_mask = jnp.ones((b, t), bool)
  if cache is not None and prefix is not None:
    raise ValueError("pass either cache= or prefix=, not both")
  if prefix is not None:
    if prefix.k.shape[1] != 1:
      raise ValueError(f"prefix cache must have batch 1, got {prefix.k.shape}")
    if positions is None:
      positions = jnp.broadcast_to(
          prefix.index + jnp.arange(t, dtype=jnp.int32), (b, t))
    start = prefix.index
    prefix_mask = prefix.valid[0] & (jnp.arange(prefix.max_len) < start)
    own = jnp.tril(jnp.ones((t, t), bool))[None] & token_mask[:, None, :]
    if segment_ids is not None:
      own = own & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = (prefix_mask, own)
    layer_cache, valid = (prefix.k, prefix.v), None
  elif cache is None:
    start = jnp.zeros((), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if plain_causal:  # built inside attention (or fused away)
      mask = None
    else:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal[None] & token_mask[:, None, :]
      if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    layer_cache, valid = None, None
  else:
    if cache.k.shape[1] != b:
      raise ValueError(f"cache batch {cache.k.shape[1]} != tokens batch {b}")
    start = cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32),
                                   (b, t))
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, start))
    slot = jnp.arange(cache.max_len)
    qslot = start + jnp.arange(t)
    mask = (slot[None, :] <= qslot[:, None])[None] & valid[:, None, :]
    layer_cache = (cache.k, cache.v)
  model = LlamaForCausalLM(cfg, prefix is not None)
  hidden, exits, new_kv = model.apply(
      {"params": params}, tokens, positions, mask, layer_cache,
      jnp.asarray(start, jnp.int32), exit_layers, logits_for)
  new_cache = None
  if cache is not None:
    new_cache = KVCache(new_kv[0], new_kv[1], valid, start + t)
  final = exits.get(cfg.num_hidden_layers) if exits else None
  return LMOutput(
      logits=final,
      exits={j: exits[j] for j in exit_layers} if exits else {},
      cache=new_cache,
      hidden=hidden if return_hidden else None)


def head_logits(params, cfg: LlamaConfig, h: Array) -> Array:
  """Early-exit head on hidden states: head(RMSNorm_final(h)), float32.

  The same computation as the model's own exits (for hidden states taken
  from `forward(..., return_hidden=True)`, e.g. after packing positions).
  """
  w = params["model"]["norm"]["weight"]
  hf = h.astype(jnp.float32)
  y = hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True)
                         + cfg.rms_norm_eps) * w
  if cfg.tie_word_embeddings:
    return jnp.einsum("...d,vd->...v", y,
                      params["model"]["embed_tokens"]["embedding"],
                      preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", y, params["lm_head"]["kernel"],
                    preferred_element_type=jnp.float32)


def init_params(cfg: LlamaConfig, rng: Array) -> dict:
  """Random float32 parameters (std 0.02 like HF's initializer_range)."""
  model = LlamaForCausalLM(cfg)
  tok = jnp.zeros((1, 2), jnp.int32)
  pos = jnp.zeros((1, 2), jnp.int32)
  mask = jnp.ones((1, 2, 2), bool)
  fn = lambda r: model.init(r, tok, pos, mask, None, jnp.zeros((), jnp.int32),
                            (), "all")["params"]
  return jax.jit(fn)(rng)


def abstract_params(cfg: LlamaConfig):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logits_fn(params, cfg: LlamaConfig, tokens: Array) -> Array:
  """(B, T, V) float32 final logits of a full causal pass."""
  return forward(params, cfg, tokens).logits


def token_nll(params, cfg: LlamaConfig, tokens: Array,
              token_mask: Array | None = None) -> Array:
  """Mean next-token NLL over valid target positions, per sequence (B,)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  out = forward(params, cfg, tokens, token_mask=token_mask)
  lp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), -1)
  tgt = tokens[:, 1:]
  nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  m = (jnp.ones_like(tgt, bool) if token_mask is None
       else token_mask[:, 1:] & token_mask[:, :-1])
  return (nll * m).sum(-1) / jnp.maximum(m.sum(-1), 1)
