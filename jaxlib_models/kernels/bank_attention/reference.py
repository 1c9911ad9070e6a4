"""Attention over own keys plus extra keys, in plain jnp: dense and chunked.

The diffusion backbone's attention primitive (diffusion/attention.py,
`attend`): each query attends over the concatenation along tokens of its own
keys/values (when `include_self`) and extra ones (a StreamV2V feature bank,
Fairy's anchors, FlowVid's previous frames) whose slots carry a validity mask:

  out_BNC = softmax_j(q . k_j / sqrt(K)) v_j,  j over [own; extra valid]

per head (C = H K). Logits and softmax are float32 whatever the input dtype
(float64 for float64 inputs); the output has q's dtype. A query row with no valid key at all (possible only
with include_self=False and every extra slot invalid) returns zeros, where
`attend`'s jnp path returns NaN.

`dense` builds the concatenation and the whole (B, H, N, Nkv + M) logits: the
oracle. `chunked` never concatenates: it streams blocks of own keys, then
blocks of extra keys, through an online softmax (running max, sum and weighted
sum), optionally over query blocks too, so its memory is O(B H Q T) for query
blocks of Q and key blocks of T. Invalid keys get a finite sentinel logit and a
zero weight, so an all-invalid block never forms (-inf) - (-inf).

B: batch, N: queries, S: own keys (Nkv), M: extra keys, C: width, H: heads,
K: head dim, Q: queries per block, T: keys per block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

_SENTINEL = -1e30  # Finite "minus infinity" for the running max.
_HIGHEST = jax.lax.Precision.HIGHEST  # No TF32 for float32 on GPUs.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the chunked online-softmax scan."""

  block_k: int = 512  # Keys per streamed block (own and extra alike).
  block_q: int | None = 1024  # Queries per mapped block; None: all at once.

  def __post_init__(self):
    if self.block_k < 1 or (self.block_q is not None and self.block_q < 1):
      raise ValueError(f"block sizes must be >= 1, got {self}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def _acc_dtype(*xs):
  """float32, or float64 when an input is float64 (verification runs)."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in xs if x is not None))


def _split(x_BTC: Array, heads: int) -> Array:
  b, t, c = x_BTC.shape
  return x_BTC.reshape(b, t, heads, c // heads)


def _valid_BM(extra_valid, b: int, m: int) -> Array | None:
  if extra_valid is None:
    return None
  return jnp.broadcast_to(jnp.asarray(extra_valid).astype(bool), (b, m))


def dense(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None, v_extra_BMC=None,
          *, heads: int, include_self: bool = True,
          extra_valid=None) -> Array:
  """The concatenation and the whole masked softmax (memory O(B H N (S+M))).

  Args as `api.bank_attention`. Returns (B, N, C) in q's dtype.
  """
  b, n, c = q_BNC.shape
  keys, vals, masks = [], [], []
  if include_self:
    s = k_self_BSC.shape[1]
    keys.append(k_self_BSC)
    vals.append(v_self_BSC)
    masks.append(jnp.ones((b, s), bool))
  if k_extra_BMC is not None:
    m = k_extra_BMC.shape[1]
    keys.append(k_extra_BMC)
    vals.append(v_extra_BMC)
    valid = _valid_BM(extra_valid, b, m)
    masks.append(jnp.ones((b, m), bool) if valid is None else valid)
  acc = _acc_dtype(q_BNC, *keys, *vals)
  f32 = lambda x: _split(x.astype(acc), heads)
  k_BLHK = jnp.concatenate([f32(k) for k in keys], axis=1)
  v_BLHK = jnp.concatenate([f32(v) for v in vals], axis=1)
  mask_BL = jnp.concatenate(masks, axis=1)
  q_BNHK = f32(q_BNC)
  scale = q_BNHK.shape[-1] ** -0.5
  logits_BHNL = jnp.einsum("bnhk,blhk->bhnl", q_BNHK, k_BLHK,
                           precision=_HIGHEST) * scale
  mask_B11L = mask_BL[:, None, None, :]
  top_BHN1 = jnp.max(jnp.where(mask_B11L, logits_BHNL, -jnp.inf), axis=-1,
                     keepdims=True)
  top_BHN1 = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(top_BHN1), top_BHN1, 0.0))
  p_BHNL = jnp.where(mask_B11L, jnp.exp(logits_BHNL - top_BHN1), 0.0)
  sum_BHN1 = jnp.sum(p_BHNL, axis=-1, keepdims=True)
  p_BHNL = p_BHNL / jnp.where(sum_BHN1 > 0, sum_BHN1, 1.0)
  out_BNHK = jnp.einsum("bhnl,blhk->bnhk", p_BHNL, v_BLHK,
                        precision=_HIGHEST)
  return out_BNHK.reshape(b, n, c).astype(q_BNC.dtype)


def _stream(carry, q_BQHK, k_BTHK, v_BTHK, valid_BT, block_k: int):
  """Folds all keys of one source into the online-softmax state.

  Blocks are dynamic slices of length T = min(block_k, len); the last one is
  clamped by dynamic_slice to end at the last key, so its keys already seen
  in the previous block are masked out instead of padding the source.
  """
  length = k_BTHK.shape[1]
  t = min(block_k, length)
  nb = -(-length // t)

  def body(j, carry):
    top_BHQ, sum_BHQ, acc_BHQK = carry
    start = j * t
    clamped = jnp.minimum(start, length - t)
    k_blk = jax.lax.dynamic_slice_in_dim(k_BTHK, clamped, t, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_BTHK, clamped, t, axis=1)
    ok_T = clamped + jnp.arange(t) >= start  # Not seen in the last block.
    ok_BT = jnp.broadcast_to(ok_T, (q_BQHK.shape[0], t))
    if valid_BT is not None:
      ok_BT &= jax.lax.dynamic_slice_in_dim(valid_BT, clamped, t, axis=1)
    ok_B11T = ok_BT[:, None, None, :]
    logits_BHQT = jnp.einsum("bqhk,bthk->bhqt", q_BQHK,
                             k_blk.astype(q_BQHK.dtype), precision=_HIGHEST)
    logits_BHQT = jnp.where(ok_B11T, logits_BHQT, _SENTINEL)
    new_BHQ = jnp.maximum(top_BHQ, jnp.max(logits_BHQT, axis=-1))
    alpha_BHQ = jnp.exp(top_BHQ - new_BHQ)
    p_BHQT = jnp.where(ok_B11T, jnp.exp(logits_BHQT - new_BHQ[..., None]),
                       0.0)
    sum_BHQ = sum_BHQ * alpha_BHQ + jnp.sum(p_BHQT, axis=-1)
    acc_BHQK = acc_BHQK * alpha_BHQ[..., None] + jnp.einsum(
        "bhqt,bthk->bhqk", p_BHQT, v_blk.astype(q_BQHK.dtype),
        precision=_HIGHEST)
    return new_BHQ, sum_BHQ, acc_BHQK

  return jax.lax.fori_loop(0, nb, body, carry)


def chunked(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None, v_extra_BMC=None,
            *, heads: int, include_self: bool = True, extra_valid=None,
            block_sizes: BlockSizes | None = None) -> Array:
  """Online softmax over own-key blocks then extra-key blocks.

  Never concatenates own and extra keys; the largest temporary is the
  (B, H, Q, T) logits block. Args as `api.bank_attention`. Returns (B, N, C)
  in q's dtype.
  """
  bs = block_sizes or BlockSizes.get_default()
  b, n, c = q_BNC.shape
  kdim = c // heads
  acc = _acc_dtype(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC, v_extra_BMC)
  q_BNHK = _split(q_BNC, heads).astype(acc) * kdim ** -0.5
  sources = []
  if include_self:
    sources.append((_split(k_self_BSC, heads), _split(v_self_BSC, heads),
                    None))
  if k_extra_BMC is not None:
    sources.append((_split(k_extra_BMC, heads), _split(v_extra_BMC, heads),
                    _valid_BM(extra_valid, b, k_extra_BMC.shape[1])))

  def attend_block(q_BQHK):
    qn = q_BQHK.shape[1]
    carry = (jnp.full((b, heads, qn), _SENTINEL, acc),
             jnp.zeros((b, heads, qn), acc),
             jnp.zeros((b, heads, qn, kdim), acc))
    for k, v, valid in sources:
      carry = _stream(carry, q_BQHK, k, v, valid, bs.block_k)
    _, sum_BHQ, acc_BHQK = carry
    out_BHQK = acc_BHQK / jnp.where(sum_BHQ > 0, sum_BHQ, 1.0)[..., None]
    return jnp.transpose(out_BHQK, (0, 2, 1, 3))  # (B, Q, H, K)

  bq = bs.block_q
  if bq is None or bq >= n:
    out_BNHK = attend_block(q_BNHK)
  else:
    nq = -(-n // bq)
    q_pad = jnp.pad(q_BNHK, ((0, 0), (0, nq * bq - n), (0, 0), (0, 0)))
    q_nBQHK = jnp.moveaxis(q_pad.reshape(b, nq, bq, heads, kdim), 1, 0)
    out_nBQHK = jax.lax.map(attend_block, q_nBQHK)
    out_BNHK = jnp.moveaxis(out_nBQHK, 0, 1).reshape(b, nq * bq, heads,
                                                     kdim)[:, :n]
  return out_BNHK.reshape(b, n, c).astype(q_BNC.dtype)


def dot_product_attention(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None,
                          v_extra_BMC=None, *, heads: int,
                          include_self: bool = True,
                          extra_valid=None) -> Array:
  """`jax.nn.dot_product_attention(implementation="xla")` on the float32
  concatenation (what diffusion/attention.py's "xla" path does).

  Fully masked rows give NaN here (XLA's softmax of all -inf); the dispatcher
  does not use this path for include_self=False with a mask for that reason.
  """
  b, n, c = q_BNC.shape
  keys, vals, masks = [], [], []
  if include_self:
    keys.append(k_self_BSC)
    vals.append(v_self_BSC)
    masks.append(jnp.ones((b, k_self_BSC.shape[1]), bool))
  valid = None
  if k_extra_BMC is not None:
    keys.append(k_extra_BMC)
    vals.append(v_extra_BMC)
    valid = _valid_BM(extra_valid, b, k_extra_BMC.shape[1])
    masks.append(jnp.ones((b, k_extra_BMC.shape[1]), bool)
                 if valid is None else valid)
  f32 = lambda x: _split(x.astype(jnp.float32), heads)
  k_BLHK = jnp.concatenate([f32(k) for k in keys], axis=1)
  v_BLHK = jnp.concatenate([f32(v) for v in vals], axis=1)
  mask = None
  if valid is not None:
    mask = jnp.concatenate(masks, axis=1)[:, None, None, :]
  out_BNHK = jax.nn.dot_product_attention(f32(q_BNC), k_BLHK, v_BLHK,
                                          mask=mask, implementation="xla")
  return out_BNHK.reshape(b, n, c).astype(q_BNC.dtype)
