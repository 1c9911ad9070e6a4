"""The one attention primitive of the diffusion backbone (brief §2.2).

`attend(q, k_self, v_self, k_extra, v_extra, include_self=, extra_valid=)`
attends each query over the concatenation (along tokens) of its own keys and
values (when `include_self`) and extra ones: a StreamV2V feature bank, Fairy's
anchor frames or FlowVid's [first; previous] frame. `extra_valid` masks unused
extra slots so that shapes stay static. Logits and softmax run in float32
whatever the input dtype.

`Attention` is the linen module that every UNet transformer block uses for
`attn1` (self) and `attn2` (cross). Its submodules follow diffusers'
`Attention` state-dict keys (`to_q`, `to_k`, `to_v`, `to_out.0` ->
`to_out_0`). Self-attention modules read `SelfAttnHooks` (a static field), so
a streaming pipeline changes behaviour by building the same UNet with other
hooks; the parameters are unchanged:

- `extra=True`: read `k`, `v`, optional `valid` (absent: every slot valid;
  present, it forces the masked XLA path) and `o` (for feature fusion) from
  the variable collection `attn_extra`, nested like the module tree;
- `capture=True`: store this call's own `k`, `v` and pre-fusion `o` (after
  `to_out`) into the mutable collection `attn_capture`;
- `fuse_paths`: top-level UNet blocks (e.g. "mid_block", "up_blocks_1") whose
  self-attention output is fused with its nearest bank neighbour
  (`fuse_features`).

B: batch, N: query tokens, M: extra tokens, C: width, H: heads, K: head dim.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

IMPLS = ("auto", "reference", "xla", "cudnn", "blocked", "pallas")
# "auto" on CPU switches to the blocked path from this many logits per
# (batch, head) on: measured on 2 CPU cores at SD's 4096 x 4096 self-attention
# (B 4, C 320, 8 heads) it takes 0.35 s against 4.9 s for XLA's fused
# dot_product_attention and 0.64 s for PyTorch's SDPA.
BLOCKED_MIN_LOGITS = 256 * 256
# Query rows per block of the blocked path. 2-core Zen 3, batch 4, 8 heads,
# median of 4 alternating rounds (ms, q_block 256 / 512 / 1024 / 2048):
# 4096 x 4096 keys 1290 / 1207 / 1151 / 1165; with the StreamV2V bank
# (8192 keys) 2846 / 2656 / 2396 / 2225; 1024 x 1024 209 / 170 / 154 / 162.
# (An Intel VM had 2048 fastest; 512 was chosen on a Zen 4 VM.)
Q_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class SelfAttnHooks:
  """How self-attention layers use extra keys/values (static, hashable)."""

  extra: bool = False  # Read k, v, valid (, o) from collection `attn_extra`.
  include_self: bool = True  # Attend over own K/V besides the extra ones.
  capture: bool = False  # Write own k, v, o into collection `attn_capture`.
  capture_fused: bool = False  # Capture `o` after feature fusion, not before.
  # Top-level blocks whose self-attention output is fused with the bank's `o`
  # (StreamV2V feature fusion); empty: no fusion.
  fuse_paths: tuple[str, ...] = ()
  fuse_threshold: float = 0.98  # Cosine similarity needed to take the match.
  fuse_strength: float = 0.8  # Weight of the matched bank feature.

  def __post_init__(self):
    if not self.include_self and not self.extra:
      raise ValueError("include_self=False needs extra=True: a query must"
                       " attend to something")
    if self.fuse_paths and not self.extra:
      raise ValueError(f"fuse_paths={self.fuse_paths} needs extra=True (the"
                       " bank outputs come from `attn_extra`)")
    if not 0.0 <= self.fuse_strength <= 1.0:
      raise ValueError(f"fuse_strength={self.fuse_strength} must lie in"
                       " [0, 1]")


NO_HOOKS = SelfAttnHooks()


def _split(x: Array, heads: int) -> Array:
  b, n, c = x.shape
  if c % heads:
    raise ValueError(f"width {c} is not a multiple of heads={heads}")
  return x.reshape(b, n, heads, c // heads)


def _reference(q, k, v, mask):
  """Plain jnp attention on (B, N, H, K) arrays; mask (B, M) or None."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bnhk,bmhk->bhnm", q.astype(jnp.float32),
                      k.astype(jnp.float32)) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhnm,bmhk->bnhk", p, v.astype(jnp.float32)).astype(
      q.dtype)


def _blocked(q, k, v, mask, q_block: int = Q_BLOCK):
  """Attention one (batch, head, query block) at a time (CPU).

  Every block's logits (q_block x M) stay cache-sized instead of one
  (B, H, N, M) array streamed through memory several times; the keys are not
  blocked (no online softmax needed), so the result equals the plain path.
  """
  b, n, h, d = q.shape
  m = k.shape[1]
  qb = min(q_block, n)
  pad = (-n) % qb
  qf = q.astype(jnp.float32) * d ** -0.5
  if pad:
    qf = jnp.pad(qf, ((0, 0), (0, pad), (0, 0), (0, 0)))
  nb = (n + pad) // qb
  qh = qf.transpose(0, 2, 1, 3).reshape(b * h * nb, qb, d)
  kh = k.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, m, d)
  vh = v.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, m, d)
  mh = None if mask is None else jnp.repeat(mask, h, axis=0)

  def blk(i):
    # One flat loop over (batch x head x query block): 8 % faster than a
    # nested map. The (q_block, d) output is normalised instead of the
    # (q_block, M) probabilities: one pass less over the big block.
    s = qh[i] @ kh[i // nb].T
    if mh is not None:
      s = jnp.where(mh[i // nb][None, :], s, -jnp.inf)
    e = jnp.exp(s - s.max(axis=-1, keepdims=True))
    return (e @ vh[i // nb]) / e.sum(axis=-1, keepdims=True)

  out = jax.lax.map(blk, jnp.arange(b * h * nb))
  out = out.reshape(b, h, nb * qb, d)[:, :, :n].transpose(0, 2, 1, 3)
  return out.astype(q.dtype)


def _pick_impl(impl: str, dtype, masked: bool, n: int, m: int) -> str:
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r}: choose one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if (backend == "gpu" and not masked
      and dtype in (jnp.bfloat16, jnp.float16)):
    return "cudnn"
  if backend == "cpu" and n * m >= BLOCKED_MIN_LOGITS:
    return "blocked"
  return "xla"


def attend(q: Array, k_self: Array, v_self: Array,
           k_extra: Array | None = None, v_extra: Array | None = None, *,
           heads: int, include_self: bool = True,
           extra_valid: Array | None = None, impl: str = "auto") -> Array:
  """Multi-head attention over [own; extra] keys and values.

  Args:
    q, k_self, v_self: (B, N, C) projected queries, keys, values (keys and
      values may have their own token count, e.g. cross-attention context).
    k_extra, v_extra: (B, M, C) extra keys/values, or None.
    heads: number of heads H (C = H * K).
    include_self: attend over k_self/v_self too.
    extra_valid: (B, M) or (M,) bool; False slots are ignored. None: all valid.
    impl: "auto" (GPU: cuDNN flash for 16-bit unmasked inputs, else XLA;
      CPU: "blocked" for large token counts, else XLA), "reference" (plain
      jnp), "xla" or "cudnn" (jax.nn.dot_product_attention), "blocked"
      (one (batch, head, Q_BLOCK-query block) at a time; `_blocked`),
      "pallas" (kernels/bank_attention's Triton kernel, falling back to its chunked
      XLA path off GPU; opt-in until measured on a GPU).

  Returns:
    (B, N, C) in q's dtype (heads merged, before the output projection).
  """
  b, n, c = q.shape
  if impl == "pallas":  # opt-in: the kernel is not measured on a GPU yet
    from jaxlib_models.kernels.bank_attention import api as bank_api  # pylint: disable=g-import-not-at-top
    return bank_api.bank_attention(
        q, k_self, v_self, k_extra, v_extra, heads=heads,
        include_self=include_self, extra_valid=extra_valid,
        implementation=("pallas", "xla"))
  if k_extra is None:
    if not include_self:
      raise ValueError("include_self=False without extra keys: nothing to"
                       " attend to")
    keys, vals, mask = k_self, v_self, None
  else:
    if k_extra.shape[0] != b or k_extra.shape[2] != c or (
        v_extra is None or v_extra.shape != k_extra.shape):
      raise ValueError(
          f"extra keys {k_extra.shape} / values"
          f" {None if v_extra is None else v_extra.shape} do not fit queries"
          f" {q.shape}: want (B={b}, M, C={c}) for both")
    m = k_extra.shape[1]
    mask = None
    if extra_valid is not None:
      extra_valid = jnp.broadcast_to(extra_valid.astype(bool), (b, m))
    if include_self:
      keys = jnp.concatenate([k_self, k_extra.astype(k_self.dtype)], axis=1)
      vals = jnp.concatenate([v_self, v_extra.astype(v_self.dtype)], axis=1)
      if extra_valid is not None:
        own = jnp.ones((b, k_self.shape[1]), bool)
        mask = jnp.concatenate([own, extra_valid], axis=1)
    else:
      keys, vals = k_extra.astype(q.dtype), v_extra.astype(q.dtype)
      mask = extra_valid
  qh, kh, vh = _split(q, heads), _split(keys, heads), _split(vals, heads)
  which = _pick_impl(impl, q.dtype, mask is not None, n, keys.shape[1])
  if which == "reference":
    out = _reference(qh, kh, vh, mask)
  elif which == "blocked":
    out = _blocked(qh, kh, vh, mask)
  else:
    m4 = None if mask is None else mask[:, None, None, :]
    if which == "cudnn" and m4 is not None:
      raise ValueError("impl='cudnn' takes no extra_valid mask; use 'xla'")
    if q.dtype == jnp.float32 or which == "xla":
      # XLA's path computes the logits in the input dtype; upcast 16-bit
      # inputs so that logits and softmax stay float32 (brief §7).
      dt = q.dtype
      out = jax.nn.dot_product_attention(
          qh.astype(jnp.float32), kh.astype(jnp.float32),
          vh.astype(jnp.float32), mask=m4, implementation="xla"
          if which == "xla" else None).astype(dt)
    else:
      out = jax.nn.dot_product_attention(qh, kh, vh, implementation="cudnn")
  return out.reshape(b, n, c)


def fuse_features(o: Array, o_bank: Array, valid: Array | None, *,
                  threshold: float, strength: float) -> Array:
  """StreamV2V feature fusion: blend each token with its nearest bank token.

  S = cos(o_n, o_bank_j); where max_j S >= threshold the token becomes
  (1 - strength) * o + strength * o_bank[argmax]; else it is unchanged.
  Cosines in float32. threshold > 1 is the identity.

  Args:
    o: (B, N, C) attention outputs (after `to_out`).
    o_bank: (B, M, C) bank outputs.
    valid: (B, M) or (M,) bool, or None.
  """
  of = o.astype(jnp.float32)
  bf = o_bank.astype(jnp.float32)
  on = of / jnp.maximum(jnp.linalg.norm(of, axis=-1, keepdims=True), 1e-12)
  bn = bf / jnp.maximum(jnp.linalg.norm(bf, axis=-1, keepdims=True), 1e-12)
  s = jnp.einsum("bnc,bmc->bnm", on, bn)
  if valid is not None:
    valid = jnp.broadcast_to(valid.astype(bool), s.shape[:1] + s.shape[2:])
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
  j = jnp.argmax(s, axis=-1)
  best = jnp.max(s, axis=-1)
  nn_feat = jnp.take_along_axis(bf, j[..., None], axis=1)
  take = (best >= threshold)[..., None]
  fused = (1.0 - strength) * of + strength * nn_feat
  return jnp.where(take, fused, of).astype(o.dtype)


class Attention(nn.Module):
  """diffusers `Attention` as used in SD transformer blocks.

  to_q/to_k/to_v without bias, to_out_0 with bias (to_out.1 is dropout).
  With `context` None this is self-attention and `hooks` apply.
  """

  query_dim: int
  heads: int
  dim_head: int
  cross_dim: int | None = None
  hooks: SelfAttnHooks = NO_HOOKS
  impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    inner = self.heads * self.dim_head
    dt = jnp.dtype(self.dtype)
    dense = lambda f, name, bias=False: nn.Dense(
        f, use_bias=bias, dtype=dt, name=name)
    is_self = context is None
    ctx = x if is_self else context
    q = dense(inner, "to_q")(x)
    k = dense(inner, "to_k")(ctx)
    v = dense(inner, "to_v")(ctx)
    hooks = self.hooks if is_self else NO_HOOKS
    k_x = v_x = valid = None
    if hooks.extra:
      if not self.has_variable("attn_extra", "k"):
        raise ValueError(
            f"{'/'.join(self.scope.path)}: hooks.extra is set but the"
            " `attn_extra` collection holds no k/v for this layer")
      k_x = self.get_variable("attn_extra", "k")
      v_x = self.get_variable("attn_extra", "v")
      if self.has_variable("attn_extra", "valid"):  # absent: all valid
        valid = self.get_variable("attn_extra", "valid")
    h = attend(q, k, v, k_x, v_x, heads=self.heads,
               include_self=hooks.include_self, extra_valid=valid,
               impl=self.impl)
    o = dense(self.query_dim, "to_out_0", bias=True)(h)
    capture = hooks.capture and self.is_mutable_collection("attn_capture")
    if capture:
      self.put_variable("attn_capture", "k", k)
      self.put_variable("attn_capture", "v", v)
      self.put_variable("attn_capture", "o", o)
    top = self.scope.path[0] if self.scope.path else ""
    if hooks.fuse_paths and top in hooks.fuse_paths:
      o = fuse_features(o, self.get_variable("attn_extra", "o"), valid,
                        threshold=hooks.fuse_threshold,
                        strength=hooks.fuse_strength)
      if capture and hooks.capture_fused:
        self.put_variable("attn_capture", "o", o)
    return o
