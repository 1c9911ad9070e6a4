"""Pallas (GPU, Triton backend) forward of the Gaussian-kernel attention.

A flash-attention forward with head dimension D (1-16), a per-key bias, no mask
and no backward kernel (the backward is the chunked closed form of
`reference.chunked_backward`, shared by every implementation). The grid tiles
queries; each program streams key blocks of `block_k` through an online
softmax. Distances are direct differences, coordinate by coordinate (tensor-core
matmuls would need D padded to 16 and bring back the cancellation of the
expanded form at small t, brief §2.7/§2.8). Inputs are laid out transposed
(D, M) and (D, N) so that every load is a power-of-two 1-D row, which Triton
needs. float32 only: other dtypes raise NotImplementedError (the dispatcher
then falls back to the XLA scan). Runs on CPU in interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_SENTINEL = -1e30
MAX_DIM = 16  # Coordinates are unrolled in the kernel; beyond this use XLA.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernel (powers of two, Triton's rule)."""

  block_q: int = 64  # Queries per program.
  block_k: int = 128  # Data points per streamed block.
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(xT_ref, XT_ref, t_ref, meanT_ref, lse_ref, *, n, d, bk, nk):
  neg_inv_Q = -0.5 / t_ref[...]
  x_rows = [xT_ref[k, :] for k in range(d)]

  def body(j, carry):
    m_Q, s_Q, u_rows = carry
    start = pl.multiple_of(j * bk, bk)
    X_rows = [XT_ref[k, pl.ds(start, bk)] for k in range(d)]
    sq_QB = None
    for k in range(d):
      diff = x_rows[k][:, None] - X_rows[k][None, :]
      sq_QB = diff * diff if sq_QB is None else sq_QB + diff * diff
    logits_QB = sq_QB * neg_inv_Q[:, None]
    valid_B = (start + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)) < n
    logits_QB = jnp.where(valid_B[None, :], logits_QB, _SENTINEL)
    m_new = jnp.maximum(m_Q, jnp.max(logits_QB, axis=1))
    p_QB = jnp.where(valid_B[None, :], jnp.exp(logits_QB - m_new[:, None]),
                     0.0)
    scale_Q = jnp.exp(m_Q - m_new)
    s_Q = s_Q * scale_Q + jnp.sum(p_QB, axis=1)
    u_rows = tuple(u * scale_Q + jnp.sum(p_QB * X_rows[k][None, :], axis=1)
                   for k, u in enumerate(u_rows))
    return m_new, s_Q, u_rows

  q = neg_inv_Q.shape[0]
  init = (jnp.full((q,), _SENTINEL, jnp.float32), jnp.zeros((q,), jnp.float32),
          tuple(jnp.zeros((q,), jnp.float32) for _ in range(d)))
  m_Q, s_Q, u_rows = jax.lax.fori_loop(0, nk, body, init)
  for k in range(d):
    meanT_ref[k, :] = u_rows[k] / s_Q
  for k in range(d, meanT_ref.shape[0]):
    meanT_ref[k, :] = jnp.zeros((q,), jnp.float32)
  lse_ref[...] = m_Q + jnp.log(s_Q)


def forward(x_MD, X_ND, t, *, block_sizes: BlockSizes | None = None,
            interpret: bool = False):
  """(mean_MD, lse_M) of the Gaussian-kernel attention (see reference.py).

  Raises NotImplementedError for non-float32 inputs, D > MAX_DIM, or a
  non-GPU backend without interpret mode.
  """
  bs = block_sizes or BlockSizes.get_default()
  if x_MD.dtype != jnp.float32 or X_ND.dtype != jnp.float32:
    raise NotImplementedError(
        f"pallas gauss_attention is float32 only, got {x_MD.dtype}/"
        f"{X_ND.dtype}; use implementation='xla' (float64 verification)")
  m, d = x_MD.shape
  n = X_ND.shape[0]
  if d > MAX_DIM:
    raise NotImplementedError(f"pallas gauss_attention unrolls D <= "
                              f"{MAX_DIM} coordinates, got D={d}")
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError("pallas gauss_attention needs a GPU (or "
                              "interpret=True)")
  dp = _pow2(d)
  bq, bk = bs.block_q, bs.block_k
  mp = -(-m // bq) * bq
  np_ = -(-n // bk) * bk
  xT = jnp.zeros((dp, mp), jnp.float32).at[:d, :m].set(x_MD.T)
  XT = jnp.zeros((dp, np_), jnp.float32).at[:d, :n].set(X_ND.T)
  t_M = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (m,))
  t_M = jnp.concatenate([t_M, jnp.ones((mp - m,), jnp.float32)])
  kernel = functools.partial(_kernel, n=n, d=d, bk=bk, nk=np_ // bk)
  compiler_params = None
  if not interpret:
    compiler_params = plgpu.CompilerParams(num_warps=bs.num_warps,
                                                num_stages=1)
  meanT, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((dp, mp), jnp.float32),
                 jax.ShapeDtypeStruct((mp,), jnp.float32)),
      grid=(mp // bq,),
      in_specs=[pl.BlockSpec((dp, bq), lambda i: (0, i)),
                pl.BlockSpec((dp, np_), lambda i: (0, 0)),
                pl.BlockSpec((bq,), lambda i: (i,))],
      out_specs=(pl.BlockSpec((dp, bq), lambda i: (0, i)),
                 pl.BlockSpec((bq,), lambda i: (i,))),
      interpret=interpret,
      compiler_params=compiler_params,
      name="gauss_attention_fwd",
  )(xT, XT, t_M)
  return meanT[:d, :m].T, lse[:m]
