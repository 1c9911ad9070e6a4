"""Gaussian-kernel attention in plain jnp: the dense oracle and the chunked scan.

For queries x (M, D), data X (N, D) and a time t > 0 the op returns

  mean_M D = sum_j w_Mj X_j D,   w_Mj = softmax_j(-|x_M - X_j|^2 / (2 t))
  lse_M    = log sum_j exp(-|x_M - X_j|^2 / (2 t))

which is attention with keys = values = X, scale 1/t and per-key bias
-|X_j|^2/(2t) (arXiv 2402.15602's empirical score is (mean - x)/t; brief
kernel_score_diffusion.md §2.6). M: queries, N: data points, D: dimension,
B: keys per block, Q: queries per block.

`chunked` streams key blocks through a numerically stable online softmax
(running max, sum, weighted sum), so memory is O(Q * B) whatever N is. Invalid
(padding) keys get a finite sentinel logit *and* a zero weight, so an all-pad
block never forms (-inf) - (-inf).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_SENTINEL = -1e30  # Finite "minus infinity" for the running max.
# Above this dimension, distances use |x|^2 - 2 x.X + |X|^2 on centred data
# (one matmul); below it, direct differences (exact at small t, §2.7).
DIRECT_MAX_DIM = 32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the chunked scan."""

  block_k: int = 1024  # Data points per scanned block (fastest on CPU).
  block_q: int = 1024  # Queries per mapped block (bounds memory at large M).

  def __post_init__(self):
    if self.block_k < 1 or self.block_q < 1:
      raise ValueError(f"block sizes must be >= 1, got {self}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def _sq_dist(x_QD, X_BD, distance: str):
  """|x - X|^2 as (Q, B), by direct differences or the expanded form."""
  if distance == "direct":
    diff_QBD = x_QD[:, None, :] - X_BD[None, :, :]
    return jnp.sum(diff_QBD * diff_QBD, axis=-1)
  xx_Q = jnp.sum(x_QD * x_QD, axis=-1)
  XX_B = jnp.sum(X_BD * X_BD, axis=-1)
  cross_QB = jnp.einsum("QD,BD->QB", x_QD, X_BD,
                        precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(xx_Q[:, None] - 2.0 * cross_QB + XX_B[None, :], 0.0)


def _resolve_distance(distance: str, d: int, dtype=None) -> str:
  """'auto': direct differences in float64 with D <= 32 (exact at small t:
  the verification path); otherwise the expanded form on data centred at
  their mean, whose logit error is about eps (|x - c|^2 + |X - c|^2) / (2t)
  (float32, standardised data, t = 0.01: ~1e-4; brief §2.7) and which is
  5-6x faster on XLA:CPU (one matmul instead of D broadcasts)."""
  if distance == "auto":
    if d <= DIRECT_MAX_DIM and dtype is not None and \
        jnp.dtype(dtype) == jnp.float64:
      return "direct"
    return "expanded"
  if distance not in ("direct", "expanded"):
    raise ValueError(f"distance={distance!r}; use 'auto', 'direct' or "
                     "'expanded'")
  return distance


def dense(x_MD, X_ND, t, *, distance: str = "direct"):
  """The (M, N) matrix at once: the oracle for tests (memory O(M N))."""
  distance = _resolve_distance(distance, x_MD.shape[-1])
  logits_MN = -_sq_dist(x_MD, X_ND, distance) / (2.0 * t)
  lse_M = jax.nn.logsumexp(logits_MN, axis=-1)
  w_MN = jnp.exp(logits_MN - lse_M[:, None])
  return _mm(w_MN, X_ND), lse_M


def _mm(a, b):
  """a @ b at full float32 precision: XLA on a GPU runs float32 matmuls in
  TF32 by default (10-bit mantissa), which costs ~1e-4 relative error here
  (measured on an H100); the estimator promises float32 accuracy."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _pad_rows(a, multiple: int):
  n = a.shape[0]
  pad = (-n) % multiple
  if pad:
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
  return a, n


def _key_blocks(X_ND, block_k: int):
  """(num_blocks, B, D) keys and (num_blocks, B) validity, N padded."""
  n = X_ND.shape[0]
  b = min(block_k, n)
  Xp, _ = _pad_rows(X_ND, b)
  valid = jnp.arange(Xp.shape[0]) < n
  nb = Xp.shape[0] // b
  return Xp.reshape(nb, b, -1), valid.reshape(nb, b)


def _forward_block(x_QD, X_KBD, valid_KB, t, distance):
  """Online softmax over the key blocks for one block of queries.

  The normaliser and the weighted sum come from one matmul against the
  augmented values [v_j, v_j X_j] (v = validity): on XLA:CPU a separate
  row-sum plus a (Q, B) x (B, D) product with a tiny D costs several times
  more (measured, benchmarks/score_speed.py).
  """
  q, d = x_QD.shape
  dt = x_QD.dtype
  vf_KB = valid_KB.astype(dt)
  XA_KBE = jnp.concatenate([vf_KB[..., None], X_KBD * vf_KB[..., None]], -1)
  if distance == "expanded":
    xx_Q = jnp.sum(x_QD * x_QD, axis=-1)
    XX_KB = jnp.sum(X_KBD * X_KBD, axis=-1)
  else:
    XX_KB = jnp.zeros(valid_KB.shape, dt)  # Unused on the direct path.

  def body(carry, blk):
    m_Q, s_Q, u_QD = carry
    X_BD, XA_BE, XX_B, v_B = blk
    if distance == "expanded":
      cross_QB = jnp.einsum("QD,BD->QB", x_QD, X_BD,
                            precision=jax.lax.Precision.HIGHEST)
      sq_QB = jnp.maximum(xx_Q[:, None] - 2.0 * cross_QB + XX_B[None, :],
                          0.0)
    else:
      sq_QB = _sq_dist(x_QD, X_BD, "direct")
    logits_QB = jnp.where(v_B[None, :], -sq_QB / (2.0 * t), _SENTINEL)
    m_new = jnp.maximum(m_Q, jnp.max(logits_QB, axis=-1))
    p_QB = jnp.exp(logits_QB - m_new[:, None])
    r_QE = jnp.einsum("QB,BE->QE", p_QB, XA_BE,
                      precision=jax.lax.Precision.HIGHEST)
    scale_Q = jnp.exp(m_Q - m_new)
    s_Q = s_Q * scale_Q + r_QE[:, 0]
    u_QD = u_QD * scale_Q[:, None] + r_QE[:, 1:]
    return (m_new, s_Q, u_QD), None

  init = (jnp.full((q,), _SENTINEL, dt), jnp.zeros((q,), dt),
          jnp.zeros((q, d), dt))
  (m_Q, s_Q, u_QD), _ = jax.lax.scan(body, init,
                                     (X_KBD, XA_KBE, XX_KB, valid_KB))
  return u_QD / s_Q[:, None], m_Q + jnp.log(s_Q)


def _query_blocks(block_q: int, *arrays):
  """Pads the leading (query) axis to a multiple of block_q and splits it."""
  m = arrays[0].shape[0]
  nq = -(-m // block_q)
  out = []
  for a in arrays:
    ap, _ = _pad_rows(a, block_q)
    out.append(ap.reshape((nq, block_q) + a.shape[1:]))
  return tuple(out)


def _unblock(a, m: int):
  return a.reshape((-1,) + a.shape[2:])[:m]


def chunked_forward(x_MD, X_ND, t, *, block_sizes: BlockSizes | None = None,
                    distance: str = "auto"):
  """(mean_MD, lse_M) by the chunked online softmax; memory O(Q B)."""
  bs = block_sizes or BlockSizes.get_default()
  distance = _resolve_distance(distance, x_MD.shape[-1], x_MD.dtype)
  if distance == "expanded":
    # Centring on the data mean removes most of the cancellation (§2.7).
    centre_D = jnp.mean(X_ND, axis=0)
    x_MD, X_ND = x_MD - centre_D, X_ND - centre_D
  X_KBD, valid_KB = _key_blocks(X_ND, bs.block_k)
  m = x_MD.shape[0]
  fwd = lambda xq: _forward_block(xq, X_KBD, valid_KB, t, distance)
  if m <= bs.block_q:
    mean_MD, lse_M = fwd(x_MD)
  else:
    mean_NQD, lse_NQ = jax.lax.map(fwd, _query_blocks(bs.block_q, x_MD)[0])
    mean_MD, lse_M = _unblock(mean_NQD, m), _unblock(lse_NQ, m)
  if distance == "expanded":
    mean_MD = mean_MD + centre_D
  return mean_MD, lse_M


def _backward_block(x_QD, X_KBD, valid_KB, t, mean_QD, lse_Q, gm_QD, gl_Q,
                    distance):
  """Cotangents of (mean, lse) for one query block, scanned over keys.

  With w = softmax weights and a_qj = w_qj (gl_q + gm_q . (X_j - mean_q)):
    dx_q = sum_j a_qj (X_j - x_q) / t
    dX_j = sum_q w_qj gm_q + sum_q a_qj (x_q - X_j) / t
    dt   = sum_qj a_qj |x_q - X_j|^2 / (2 t^2)
  """
  dt_ = x_QD.dtype
  gdotmean_Q = jnp.sum(gm_QD * mean_QD, axis=-1)

  def body(carry, blk):
    ax_QD, a_sum_Q, g_t = carry
    X_BD, v_B = blk
    sq_QB = _sq_dist(x_QD, X_BD, distance)
    w_QB = jnp.exp(-sq_QB / (2.0 * t) - lse_Q[:, None]) * v_B[None, :].astype(dt_)
    a_QB = w_QB * (gl_Q[:, None] + _mm(gm_QD, X_BD.T) - gdotmean_Q[:, None])
    ax_QD = ax_QD + _mm(a_QB, X_BD)
    a_sum_Q = a_sum_Q + jnp.sum(a_QB, axis=-1)
    dX_BD = _mm(w_QB.T, gm_QD) + (_mm(a_QB.T, x_QD)
                              - jnp.sum(a_QB, axis=0)[:, None] * X_BD) / t
    g_t = g_t + jnp.sum(a_QB * sq_QB) / (2.0 * t * t)
    return (ax_QD, a_sum_Q, g_t), dX_BD

  q, d = x_QD.shape
  init = (jnp.zeros((q, d), dt_), jnp.zeros((q,), dt_), jnp.zeros((), dt_))
  (ax_QD, a_sum_Q, g_t), dX_KBD = jax.lax.scan(body, init, (X_KBD, valid_KB))
  dx_QD = (ax_QD - a_sum_Q[:, None] * x_QD) / t
  return dx_QD, dX_KBD, g_t


def chunked_backward(x_MD, X_ND, t, mean_MD, lse_M, gm_MD, gl_M, *,
                     block_sizes: BlockSizes | None = None,
                     distance: str = "auto"):
  """Closed-form VJP of (mean, lse), chunked like the forward (no autodiff
  through the scan, so no per-block residuals are stored)."""
  bs = block_sizes or BlockSizes.get_default()
  distance = _resolve_distance(distance, x_MD.shape[-1], x_MD.dtype)
  n = X_ND.shape[0]
  if distance == "expanded":
    centre_D = jnp.mean(X_ND, axis=0)
    x_MD, X_ND, mean_MD = x_MD - centre_D, X_ND - centre_D, mean_MD - centre_D
  X_KBD, valid_KB = _key_blocks(X_ND, bs.block_k)

  def one(args):
    return _backward_block(args[0], X_KBD, valid_KB, t, *args[1:],
                           distance=distance)

  m = x_MD.shape[0]
  if m <= bs.block_q:
    dx_MD, dX_KBD, g_t = one((x_MD, mean_MD, lse_M, gm_MD, gl_M))
  else:
    # Query blocks are scanned with dX accumulated in the carry, so memory
    # stays O(Q B + N D). Padded query rows carry zero cotangents; their lse
    # is padded with +1e30 so that their weights are exactly 0 as well.
    pad = (-m) % bs.block_q
    lse_pad = jnp.concatenate([lse_M, jnp.full((pad,), -_SENTINEL, lse_M.dtype)])
    xb, mb, gmb, glb = _query_blocks(bs.block_q, x_MD, mean_MD, gm_MD, gl_M)
    lb = lse_pad.reshape(xb.shape[:2])

    def acc(carry, args):
      dX_acc, g_acc = carry
      dx, dX, g = one(args)
      return (dX_acc + dX, g_acc + g), dx

    zero = (jnp.zeros(X_KBD.shape, x_MD.dtype), jnp.zeros((), x_MD.dtype))
    (dX_KBD, g_t), dx_NQD = jax.lax.scan(acc, zero, (xb, mb, lb, gmb, glb))
    dx_MD = _unblock(dx_NQD, m)
  dX_ND = dX_KBD.reshape(-1, X_ND.shape[-1])[:n]
  if distance == "expanded":
    # Centring is a shift of both x and X by mean(X): chain rule through it.
    shift_D = -(jnp.sum(dx_MD, axis=0) + jnp.sum(dX_ND, axis=0)) / n
    gm_sum_D = jnp.sum(gm_MD, axis=0) / n
    dX_ND = dX_ND + shift_D + gm_sum_D
  return dx_MD, dX_ND, g_t
