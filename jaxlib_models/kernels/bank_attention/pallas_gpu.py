"""Pallas (GPU, Triton backend) flash-attention forward over own + extra keys.

Grid (B H, N / Q): each program holds Q queries of one (batch, head) and runs
an online softmax (float32 running max, sum and accumulator) first over blocks
of T own keys, then over blocks of T extra keys, the extra validity mask
loaded per block. Logits come from a tensor-core dot with float32
accumulation (IEEE, no TF32, for float32 inputs); the probabilities are cast
to the value dtype for the second dot, as in flash attention. Arrays stay in
their (B, tokens, H, K) layout (a free reshape of (B, tokens, C)); the block
specs pick one head. Padding copies are made only where needed: the head dim
to a power of two >= 16 (SD's 40/80/160 become 64/128/256), queries to a
multiple of Q, keys to a multiple of T (tails masked).

float32, bfloat16, float16; head dim <= 256 after padding. Other inputs raise
NotImplementedError (the dispatcher then tries the next implementation).
Forward only: gradients come from the dispatcher's custom VJP. Runs on CPU in
interpret mode (tests). Not yet measured on a GPU.

B: batch, N: queries, S: own keys, M: extra keys, C: width, H: heads, K: head
dim (Kp padded), Q: queries per program, T: keys per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

_SENTINEL = -1e30
MAX_HEAD_DIM = 256  # After padding to a power of two.
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernel (powers of two, Triton's rule; >= 16
  for the compiled kernel, whose dots need it)."""

  block_q: int = 64  # Queries per program.
  block_k: int = 64  # Keys per streamed block.
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two")

  @classmethod
  def get_default(cls, head_dim: int = 64) -> "BlockSizes":
    """Defaults by padded head dim (untuned: no GPU measurement yet)."""
    if head_dim >= 256:
      return cls(block_q=64, block_k=32, num_warps=8)
    if head_dim >= 128:
      return cls(block_q=64, block_k=64, num_warps=4)
    return cls(block_q=64, block_k=64, num_warps=4)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(*refs, n_self, bk, scale, include_self, has_extra, has_mask,
            n_extra, precision):
  refs = list(refs)
  q_ref = refs.pop(0)
  ks_ref = vs_ref = ke_ref = ve_ref = valid_ref = None
  if include_self:
    ks_ref, vs_ref = refs.pop(0), refs.pop(0)
  if has_extra:
    ke_ref, ve_ref = refs.pop(0), refs.pop(0)
    if has_mask:
      valid_ref = refs.pop(0)
  (o_ref,) = refs

  q_QK = q_ref[...]
  nq = q_QK.shape[0]
  dims = (((1,), (1,)), ((), ()))  # q_QK . k_TK^T

  def fold(carry, k_TK, v_TK, ok_T):
    top_Q, sum_Q, acc_QK = carry
    logits_QT = jax.lax.dot_general(
        q_QK, k_TK, dims, precision=precision,
        preferred_element_type=jnp.float32) * scale
    logits_QT = jnp.where(ok_T[None, :], logits_QT, _SENTINEL)
    new_Q = jnp.maximum(top_Q, jnp.max(logits_QT, axis=1))
    alpha_Q = jnp.exp(top_Q - new_Q)
    p_QT = jnp.where(ok_T[None, :], jnp.exp(logits_QT - new_Q[:, None]), 0.0)
    sum_Q = sum_Q * alpha_Q + jnp.sum(p_QT, axis=1)
    pv_QK = jax.lax.dot(p_QT.astype(v_TK.dtype), v_TK, precision=precision,
                        preferred_element_type=jnp.float32)
    return new_Q, sum_Q, acc_QK * alpha_Q[:, None] + pv_QK

  kp = q_QK.shape[1]
  carry = (jnp.full((nq,), _SENTINEL, jnp.float32),
           jnp.zeros((nq,), jnp.float32), jnp.zeros((nq, kp), jnp.float32))
  iota_T = jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)

  if include_self:
    def own(j, carry):
      start = pl.multiple_of(j * bk, bk)
      ok_T = start + iota_T < n_self
      return fold(carry, ks_ref[pl.ds(start, bk), :],
                  vs_ref[pl.ds(start, bk), :], ok_T)

    carry = jax.lax.fori_loop(0, ks_ref.shape[0] // bk, own, carry)

  if has_extra:
    def extra(j, carry):
      start = pl.multiple_of(j * bk, bk)
      if has_mask:  # Padded slots are stored invalid.
        ok_T = valid_ref[pl.ds(start, bk)] != 0
      else:
        ok_T = start + iota_T < n_extra
      return fold(carry, ke_ref[pl.ds(start, bk), :],
                  ve_ref[pl.ds(start, bk), :], ok_T)

    carry = jax.lax.fori_loop(0, ke_ref.shape[0] // bk, extra, carry)

  _, sum_Q, acc_QK = carry
  out_QK = acc_QK / jnp.where(sum_Q > 0, sum_Q, 1.0)[:, None]
  o_ref[...] = out_QK.astype(o_ref.dtype)


def _pad_to(x_BTHK: Array, t: int, kp: int) -> Array:
  b, n, h, k = x_BTHK.shape
  if (n, k) == (t, kp):
    return x_BTHK
  return jnp.pad(x_BTHK, ((0, 0), (0, t - n), (0, 0), (0, kp - k)))


def forward(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None, v_extra_BMC=None,
            *, heads: int, include_self: bool = True, extra_valid=None,
            block_sizes: BlockSizes | None = None,
            interpret: bool = False) -> Array:
  """(B, N, C) attention over [own; valid extra] keys (see reference.py).

  Shapes are assumed validated (api.validate). Raises NotImplementedError for
  an unsupported dtype or head dim, blocks < 16 outside interpret mode, or a
  non-GPU backend without interpret mode.
  """
  b, n, c = q_BNC.shape
  kdim = c // heads
  srcs = [q_BNC]
  if include_self:
    srcs += [k_self_BSC, v_self_BSC]
  has_extra = k_extra_BMC is not None
  if has_extra:
    srcs += [k_extra_BMC, v_extra_BMC]
  dt = jnp.result_type(*srcs)
  if dt not in DTYPES:
    raise NotImplementedError(
        f"pallas bank_attention takes float32/bfloat16/float16, got "
        f"{[str(x.dtype) for x in srcs]}; use implementation='xla'")
  kp = max(16, _pow2(kdim))
  if kp > MAX_HEAD_DIM:
    raise NotImplementedError(
        f"pallas bank_attention supports head dims up to {MAX_HEAD_DIM} "
        f"(after padding to a power of two), got K={kdim} (C={c}, "
        f"heads={heads}); use implementation='xla'")
  bs = block_sizes or BlockSizes.get_default(kp)
  if not interpret:
    if jax.default_backend() != "gpu":
      raise NotImplementedError("pallas bank_attention needs a GPU (or "
                                "interpret=True)")
    if min(bs.block_q, bs.block_k) < 16:
      raise NotImplementedError(f"Triton dots need blocks >= 16, got {bs}")
  bq, bk = bs.block_q, bs.block_k
  cdiv = lambda a, d: -(-a // d)
  split = lambda x: x.astype(dt).reshape(x.shape[0], x.shape[1], heads, kdim)

  n_pad = cdiv(n, bq) * bq
  args = [_pad_to(split(q_BNC), n_pad, kp)]
  q_spec = pl.BlockSpec((None, bq, None, kp),
                        lambda bh, i: (bh // heads, i, bh % heads, 0))
  in_specs = [q_spec]

  def whole(t):
    return pl.BlockSpec((None, t, None, kp),
                        lambda bh, i: (bh // heads, 0, bh % heads, 0))

  n_self = n_extra = 0
  if include_self:
    n_self = k_self_BSC.shape[1]
    s_pad = cdiv(n_self, bk) * bk
    args += [_pad_to(split(k_self_BSC), s_pad, kp),
             _pad_to(split(v_self_BSC), s_pad, kp)]
    in_specs += [whole(s_pad), whole(s_pad)]
  has_mask = has_extra and extra_valid is not None
  if has_extra:
    n_extra = k_extra_BMC.shape[1]
    m_pad = cdiv(n_extra, bk) * bk
    args += [_pad_to(split(k_extra_BMC), m_pad, kp),
             _pad_to(split(v_extra_BMC), m_pad, kp)]
    in_specs += [whole(m_pad), whole(m_pad)]
    if has_mask:
      valid_BM = jnp.broadcast_to(
          jnp.asarray(extra_valid).astype(jnp.int32), (b, n_extra))
      args.append(jnp.pad(valid_BM, ((0, 0), (0, m_pad - n_extra))))
      in_specs.append(pl.BlockSpec((None, m_pad),
                                   lambda bh, i: (bh // heads, 0)))

  precision = (jax.lax.Precision.HIGHEST if dt == jnp.float32 else None)
  kernel = functools.partial(
      _kernel, n_self=n_self, bk=bk, scale=kdim ** -0.5,
      include_self=include_self, has_extra=has_extra, has_mask=has_mask,
      n_extra=n_extra, precision=precision)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=bs.num_warps,
                                           num_stages=bs.num_stages)
  out_BNHK = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, n_pad, heads, kp), q_BNC.dtype),
      grid=(b * heads, n_pad // bq),
      in_specs=in_specs,
      out_specs=q_spec,
      interpret=interpret,
      compiler_params=compiler_params,
      name="bank_attention_fwd",
  )(*args)
  return out_BNHK[:, :n, :, :kdim].reshape(b, n, c)
