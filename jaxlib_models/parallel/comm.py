"""Gradient communicators: the exact or compressed mean over data axes.

A `Communicator` runs inside `jax.shard_map`, takes this device's local
gradients and returns an estimate of their mean over `axis_names`, with
error feedback (EF) for the biased compressors and, optionally, a
hierarchical scheme that compresses only the slow (outer) hop.

Compressors (d: tensor size, n: devices in the compressed group):

- none: f32 pmean.
- bf16: bf16 psum, /n.
- int8: shared scale pmax(max|p|)/L, L = floor(127/n), stochastic rounding,
  int8 psum.
- qsgd: QSGD (arXiv 1610.02132) with s levels and a shared scale
  pmax(||p||_2); int8 psum while n*s <= 127, else an all-gather of the
  levels (int8 for s <= 127), summed locally in int32.
- terngrad: TernGrad (arXiv 1705.07878) with a shared scale pmax(max|p|),
  int8 psum of the ternary values.
- randomk: k = ratio*d coordinates from a key shared by all devices, f32
  psum of the k values; scaled by d/k (unbiased) or not (with EF).
- topk: per-device top-|p| coordinates (DGC, arXiv 1712.01887),
  all-gather of i32[k] indices and f32[k] values. With
  topk_select="leader" (ScaleCom's cyclic local top-k, arXiv 2104.11125):
  device (step mod n) picks the top-|p| indices of its own p, every device
  sends its values there; all-reduce of the i32[k] indices (zeros from the
  others) and of the f32[k] values, so the mean is exact on those k
  coordinates and the ring cost does not grow with n.
- sign: EF-SignSGD (arXiv 1901.09847), (||p||_1/d) sign(p), all-gather of
  int8 signs and the f32 scale.
- sign_mv: signSGD with majority vote (arXiv 1810.05291), int8 psum of the
  signs and a pmean of the scales; g = mean_scale * sign(sum of signs).
- powersgd: PowerSGD (arXiv 1905.13727), one warm-started power-iteration
  step per call: P = M Q, pmean, orthonormalise, Q = M^T P, pmean,
  g = P Q^T; the tensor is viewed as (shape[0], rest). P and Q travel in
  f32 or, with factor_dtype="bfloat16", in bf16.

EF (arXiv 1901.09847): p = g + e, and e <- p - C(p) with C(p) this device's
own decompressed message, or e <- p - g_hat for PowerSGD (the shared
reconstruction, as PyTorch's powerSGD_hook does). Residuals stay on their
device. Tensors with ndim < 2 or fewer than `min_size` elements bypass
compression (exact f32 mean).

Local momentum (DGC's momentum correction, arXiv 1712.01887): with
`local_momentum` m each device keeps u <- m u + g and feeds u (or g + m u,
Nesterov) to error feedback and the compressor; `momentum_masking` zeroes u
where a sparsifier sent a coordinate. The optimizer then has no momentum.

Hierarchical (two axes, outer/slow and inner/fast): each leaf is flattened
and zero-padded to a multiple of |inner|, reduce-scattered over inner (mean),
averaged over outer through the compressor (EF residuals then have the
shard's shape), all-gathered over inner and unpadded. PowerSGD-compressed
leaves are split by rows of their (m, rest) matrix instead, so that each
shard is still a matrix (with its own Q per inner index).

Wire bytes use the ring model of `parallel.hlo` and count every collective
of one call after `start_iter`, scalar ones included (the shared scales and,
with EF, one f32 all-reduce for the "comm/ef_norm" stat).
"""

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlib_models.parallel import hlo

NAMES = (
    "none",
    "bf16",
    "int8",
    "qsgd",
    "terngrad",
    "randomk",
    "topk",
    "sign",
    "sign_mv",
    "powersgd",
)
FEEDBACKS = ("ef", "ef21")
# Biased compressors: error feedback applies (random-k only when unscaled).
_EF_NAMES = ("randomk", "topk", "sign", "sign_mv", "powersgd")
# Schemes whose int8 psum of n values in [-1, 1] needs n <= 127.
_TERNARY_NAMES = ("terngrad", "sign_mv")
_Q_SEED = 0  # PowerSGD's initial Q comes from this fixed key on every device.
_HIGHEST = jax.lax.Precision.HIGHEST
_FACTOR_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class CommConfig:
  """How gradients travel between data-parallel devices (train key `comm`)."""

  name: str = "none"  # One of NAMES.
  # Residual memory for the biased compressors (unscaled randomk, topk, sign,
  # sign_mv, powersgd); ignored by the others.
  error_feedback: bool = True
  # What the error-feedback state holds. "ef": the residual e (classic EF,
  # Seide et al. 2014, Karimireddy et al. 2019): send C(g + e), keep
  # e <- g + e - C(g + e); the optimizer sees the mean of the messages.
  # "ef21" (Richtarik et al. 2021, arXiv 2106.05203): device i keeps an
  # estimate h_i of its own gradient and sends c_i = C(g_i - h_i), then
  # h_i <- h_i + c_i; every device keeps the mean estimate h <- h + mean_i c_i
  # and the optimizer sees h, a dense running estimate of the mean gradient
  # (so optimizer momentum and the clip of the synced mean act on it as in
  # the exact run). Same messages and bytes. Exact steps (`start_iter`) set
  # h_i = g_i and h = the exact mean.
  feedback: str = "ef"
  ratio: float = 0.01  # k/d for randomk and topk.
  scale_randomk: bool = False  # Scale randomk by d/k (unbiased, no EF).
  levels: int = 4  # QSGD levels s.
  rank: int = 4  # PowerSGD rank r (capped per tensor by its shape).
  # Per-tensor PowerSGD ranks, "REGEX=RANK,REGEX=RANK": the first regex that
  # re.search-es a parameter's path (e.g. "embed_tokens_embedding",
  # "model_layers_mlp_up_proj_kernel") sets its rank; the others take `rank`.
  # A rank at or above a tensor's full rank sends it exactly.
  rank_overrides: str = ""
  # How PowerSGD views a tensor with ndim >= 3 as matrices. "batched": the
  # last two dims are the matrix, leading dims a batch of independent
  # matrices with rank r each (right for scanned layer stacks (L, in, out) and
  # Flax kernels). "flat": one (shape[0], rest) matrix (PyTorch's view, for
  # (out, in, kh, kw) convolutions). Hierarchical sync always uses "flat".
  powersgd_view: str = "batched"
  # Steps with the exact mean before compression starts (PowerSGD's
  # start_powerSGD_iter, applied to every compressor).
  start_iter: int = 0
  # Tensors with fewer elements, and all tensors with ndim < 2, are averaged
  # exactly.
  min_size: int = 0
  orth_eps: float = 1e-8  # Added to column norms in PowerSGD's Gram-Schmidt.
  # dtype of PowerSGD's P and Q on the wire: "float32", or "bfloat16" (half
  # the bytes, so rank 2r costs what rank r does in f32; PyTorch's
  # bf16_compress_wrapper around powerSGD_hook). The factors are averaged in
  # that dtype and used in f32; the residual (e <- p - g_hat, g_hat from the
  # received factors) carries the rounding.
  factor_dtype: str = "float32"
  # Clip each device's local gradient to this global norm before error
  # feedback and compression (DGC's local clipping); 0 = off. Clipping the
  # synced mean instead (train.grad_clip) drops what it cuts from an
  # error-feedback message although the residual counts it as sent.
  clip_local: float = 0.0
  # Momentum on each device before error feedback and compression (DGC's
  # momentum correction, arXiv 1712.01887 sec. 3.2): u <- m u + g, and the
  # compressor sees u (heavy ball) or g + m u (Nesterov) plus the residual.
  # The optimizer must then add no momentum of its own (train.momentum=0).
  # With the exact mean this is momentum SGD on the mean gradient; with a
  # compressor it makes the residual carry the momentum's dropped part too.
  local_momentum: float = 0.0
  local_nesterov: bool = False
  # DGC's momentum factor masking: zero u where this device's message sent a
  # coordinate (sparsifiers only: top-k, random-k), so a delayed update is
  # not applied again through the momentum.
  momentum_masking: bool = False
  # Who picks the top-k coordinates: "local" (each device its own, DGC) or
  # "leader" (one device per step, rotating; ScaleCom's CLT-k).
  topk_select: str = "local"
  # Two axes (outer/slow, inner/fast): reduce-scatter over inner, compressed
  # mean over outer on the shard, all-gather over inner.
  hierarchical: bool = False

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f"comm.name={self.name!r}: choose one of {NAMES}")
    if not 0.0 < self.ratio <= 1.0:
      raise ValueError(f"comm.ratio={self.ratio} must lie in (0, 1]")
    if self.levels < 1:
      raise ValueError(f"comm.levels={self.levels} must be >= 1")
    if self.rank < 1:
      raise ValueError(f"comm.rank={self.rank} must be >= 1")
    _ = self.rank_pairs  # Parses, so a bad spec fails here.
    if self.powersgd_view not in ("batched", "flat"):
      raise ValueError(f"comm.powersgd_view={self.powersgd_view!r}: choose"
                       " 'batched' or 'flat'")
    if self.topk_select not in ("local", "leader"):
      raise ValueError(f"comm.topk_select={self.topk_select!r}: choose"
                       " 'local' or 'leader'")
    if self.clip_local < 0:
      raise ValueError(f"comm.clip_local={self.clip_local} must be >= 0")
    if not 0 <= self.local_momentum < 1:
      raise ValueError(f"comm.local_momentum={self.local_momentum} must be"
                       " in [0, 1)")
    if self.momentum_masking and (self.local_momentum == 0
                                  or self.name not in ("topk", "randomk")):
      raise ValueError(
          "comm.momentum_masking needs comm.local_momentum > 0 and a"
          f" sparsifier (topk, randomk); got name={self.name!r},"
          f" local_momentum={self.local_momentum}")
    if self.momentum_masking and self.hierarchical:
      raise ValueError("comm.momentum_masking is not supported with"
                       " comm.hierarchical (the message is a shard)")
    if self.start_iter < 0:
      raise ValueError(f"comm.start_iter={self.start_iter} must be >= 0")
    if self.min_size < 0:
      raise ValueError(f"comm.min_size={self.min_size} must be >= 0")
    if self.feedback not in FEEDBACKS:
      raise ValueError(f"comm.feedback={self.feedback!r}: choose one of"
                       f" {FEEDBACKS}")
    if self.feedback == "ef21" and self.name != "none" and not self.uses_ef:
      raise ValueError(
          f"comm.feedback='ef21' needs error feedback: comm.name="
          f"{self.name!r} with error_feedback={self.error_feedback} has none"
          f" (EF compressors: {_EF_NAMES}; not with scale_randomk)")
    if self.factor_dtype not in _FACTOR_DTYPES:
      raise ValueError(f"comm.factor_dtype={self.factor_dtype!r}: choose one"
                       f" of {tuple(_FACTOR_DTYPES)}")
    if self.orth_eps < 0:
      raise ValueError(f"comm.orth_eps={self.orth_eps} must be >= 0")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CommConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(
          f"unknown comm settings {unknown}; valid: {sorted(names)}")
    return cls(**d)

  @property
  def rank_pairs(self) -> tuple[tuple[str, int], ...]:
    """`rank_overrides` parsed: ((regex, rank), ...)."""
    pairs = []
    for item in filter(None, (t.strip()
                              for t in self.rank_overrides.split(","))):
      pat, eq, r = item.rpartition("=")
      if not eq or not pat or not r.strip().isdigit() or int(r) < 1:
        raise ValueError(
            f"comm.rank_overrides={self.rank_overrides!r}: {item!r} is not"
            " REGEX=RANK with RANK >= 1 (e.g. 'embed=24,mlp=8')")
      try:
        re.compile(pat)
      except re.error as e:
        raise ValueError(f"comm.rank_overrides: bad regex {pat!r} ({e})")
      pairs.append((pat, int(r)))
    return tuple(pairs)

  def rank_for(self, path_name: str) -> int:
    """The PowerSGD rank of the tensor at `path_name` (before the cap)."""
    for pat, r in self.rank_pairs:
      if re.search(pat, path_name):
        return r
    return self.rank

  @property
  def uses_ef(self) -> bool:
    """Whether compressed tensors keep an error-feedback residual."""
    if not self.error_feedback or self.name not in _EF_NAMES:
      return False
    return not (self.name == "randomk" and self.scale_randomk)


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """How one parameter travels."""

  name: str  # State key: index and path, e.g. "0001_dense_kernel".
  shape: tuple[int, ...]  # The gradient's shape.
  compress: bool  # False: exact f32 mean.
  work: tuple[int, ...]  # Per-device shape the compressor sees.
  pad: int  # Hierarchical padding (elements, or rows when `rows`).
  rows: bool  # Hierarchical shard of the (m, rest) matrix by rows.
  rank: int  # PowerSGD rank for this tensor (0 if not PowerSGD).
  k: int  # randomk / topk count (0 otherwise).

  @property
  def size(self) -> int:
    return math.prod(self.work)


def _path_name(path) -> str:
  s = jax.tree_util.keystr(path, simple=True, separator="_")
  return re.sub(r"[^0-9A-Za-z_]", "_", s)


def lowrank_energy(grads, ranks: Sequence[int]) -> list[dict]:
  """Share of each gradient matrix's energy in its top singular values.

  A host-side diagnostic for choosing PowerSGD ranks (`rank_overrides`):
  for every leaf with ndim >= 2 (each matrix of a stacked (L, m, n) leaf
  separately, as the batched view compresses it), the fraction of the
  squared Frobenius norm held by the top r singular values.

  Returns:
    [{"tensor": path name, "layer": index in the stack, "norm": float,
      "top": {str(r): share}}], in tree order.
  """
  rows = []
  for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]:
    x = np.asarray(x, np.float64)
    if x.ndim < 2:
      continue
    for layer, m in enumerate(x.reshape((-1,) + x.shape[-2:])):
      s2 = np.linalg.svd(m, compute_uv=False) ** 2
      total = float(s2.sum())
      rows.append({"tensor": _path_name(path), "layer": layer,
                   "norm": total ** 0.5,
                   "top": {str(r): float(s2[:r].sum()) / total if total else 1.0
                           for r in ranks}})
  return rows


def _leaf_name(i: int, path) -> str:
  return f"{i:04d}_" + _path_name(path)


def _matrix(shape) -> tuple[int, int]:
  return shape[0], math.prod(shape[1:])


def _int_dtype(maxval: int):
  for dt in (jnp.int8, jnp.int16, jnp.int32):
    if maxval <= jnp.iinfo(dt).max:
      return dt
  raise ValueError(f"no integer type holds {maxval}")


def _safe(scale: jax.Array) -> jax.Array:
  return jnp.where(scale > 0, scale, 1.0)


def orthonormalize(p_MR: jax.Array, eps: float) -> jax.Array:
  """Gram-Schmidt with one re-orthogonalisation pass (columns of p_MR).

  Each column is divided by its norm plus `eps`; zero columns stay zero.
  """
  cols = []
  for j in range(p_MR.shape[1]):
    v_M = p_MR[:, j]
    if cols:
      b_MJ = jnp.stack(cols, axis=1)
      for _ in range(2):  # "Twice is enough" (Giraud et al., 2005).
        v_M = v_M - jnp.dot(b_MJ, jnp.dot(v_M, b_MJ, precision=_HIGHEST),
                            precision=_HIGHEST)
    norm = jnp.sqrt(jnp.sum(v_M * v_M))
    cols.append(jnp.where(norm + eps > 0, v_M / (norm + eps), 0.0))
  return jnp.stack(cols, axis=1)


def powersgd_round(m_MN, q_NR, axes, eps: float, wire_dtype=jnp.float32):
  """One PowerSGD step on this device's matrix (arXiv 1905.13727, Alg. 1).

  Args:
    m_MN: this device's matrix (gradient plus residual), or a batch of them
      (B, M, N), each with its own rank-R factors.
    q_NR: the shared warm-start Q, (N, R) or (B, N, R).
    axes: mesh axes to average over.
    eps: orthogonalisation epsilon.
    wire_dtype: dtype of P and Q in the two averages (computed in f32).

  Returns:
    (g_hat_MN, q_NR): the shared rank-R estimate of the mean of m_MN, and the
    averaged Q for the next step.
  """
  def mean(x):
    return jax.lax.pmean(x.astype(wire_dtype), axes).astype(jnp.float32)

  p_MR = mean(jnp.einsum("...mn,...nr->...mr", m_MN, q_NR,
                         precision=_HIGHEST))
  ortho = functools.partial(orthonormalize, eps=eps)
  for _ in range(p_MR.ndim - 2):
    ortho = jax.vmap(ortho)
  p_MR = ortho(p_MR)
  q_new_NR = mean(jnp.einsum("...mn,...mr->...nr", m_MN, p_MR,
                             precision=_HIGHEST))
  g_MN = jnp.einsum("...mr,...nr->...mn", p_MR, q_new_NR, precision=_HIGHEST)
  # A zero column (e.g. an all-zero gradient) would stay zero for ever.
  alive_R = jnp.sum(q_new_NR * q_new_NR, axis=-2, keepdims=True) > 0
  return g_MN, jnp.where(alive_R, q_new_NR, q_NR)


class Communicator:
  """Exact or compressed mean of local gradients over mesh axes.

  Call inside `jax.shard_map` over (at least) `axis_names` with
  `check_vma=self.check_vma`. The state comes from `init` (global arrays)
  and is laid out by `state_specs`.
  """

  def __init__(self, cfg: CommConfig, axis_names: Sequence[str],
               mesh_shape: Mapping[str, int]):
    """Checks the axes against the mesh.

    Args:
      cfg: the compressor settings.
      axis_names: mesh axes to average over; with `cfg.hierarchical`, exactly
        (outer, inner): the compressor runs on the outer hop only.
      mesh_shape: size of every mesh axis (`dict(mesh.shape)`).
    """
    self.cfg = cfg
    self.axis_names = tuple(axis_names)
    missing = [a for a in self.axis_names if a not in mesh_shape]
    if missing or not self.axis_names:
      raise ValueError(f"axis_names={self.axis_names}: {missing} not in the"
                       f" mesh axes {tuple(mesh_shape)}")
    self.n = math.prod(int(mesh_shape[a]) for a in self.axis_names)
    if cfg.hierarchical:
      if len(self.axis_names) != 2:
        raise ValueError(
            f"comm.hierarchical needs axis_names=(outer, inner), got"
            f" {self.axis_names}")
      self.outer, self.inner = self.axis_names
      self.n_inner = int(mesh_shape[self.inner])
      self.comm_axes = (self.outer,)
    else:
      self.outer = self.inner = None
      self.n_inner = 1
      self.comm_axes = self.axis_names
    self.n_comm = self.n // self.n_inner  # Devices in a compressed group.
    if cfg.name == "int8" and 127 // self.n_comm < 1:
      raise ValueError(f"comm.name='int8' needs <= 127 devices per group,"
                       f" got {self.n_comm} (int8 levels floor(127/n) < 1)")
    if cfg.name in _TERNARY_NAMES and self.n_comm > 127:
      raise ValueError(f"comm.name={cfg.name!r} sums int8 in [-1, 1] over"
                       f" {self.n_comm} > 127 devices")

  @property
  def qsgd_gathers(self) -> bool:
    """QSGD falls back to an all-gather when an int8 psum could overflow."""
    return self.cfg.name == "qsgd" and self.n_comm * self.cfg.levels > 127

  @property
  def check_vma(self) -> bool:
    """False for gather-based schemes (their outputs are typed varying)."""
    gathers = (self.cfg.name == "sign" or self.qsgd_gathers
               or (self.cfg.name == "topk" and self.cfg.topk_select == "local"))
    return not (gathers or self.cfg.hierarchical)

  # ------------------------------------------------------------- planning

  def _plan(self, tree) -> tuple[list[_Leaf], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    cfg, inner = self.cfg, self.n_inner
    out = []
    for i, (path, x) in enumerate(flat):
      shape = tuple(x.shape)
      d = math.prod(shape)
      compress = (cfg.name != "none" and len(shape) >= 2
                  and d >= cfg.min_size)
      rows = cfg.hierarchical and compress and cfg.name == "powersgd"
      pad, work = 0, shape
      if rows:
        m, c = _matrix(shape)
        pad = -m % inner
        work = ((m + pad) // inner, c)
      elif cfg.hierarchical:
        pad = -d % inner
        work = ((d + pad) // inner,)
      elif cfg.name == "powersgd" and compress:
        if len(shape) >= 3 and cfg.powersgd_view == "batched":
          work = (math.prod(shape[:-2]),) + shape[-2:]
        else:
          work = _matrix(shape)
      rank = k = 0
      if compress and cfg.name == "powersgd":
        m, c = work[-2:]
        rank = min(cfg.rank_for(_path_name(path)), m, c)
        compress = rank * (m + c) < m * c
        rank = rank if compress else 0
      if compress and cfg.name in ("randomk", "topk"):
        dw = math.prod(work)
        k = max(1, min(dw, round(cfg.ratio * dw)))
      out.append(_Leaf(_leaf_name(i, path), shape, compress, work, pad, rows,
                       rank, k))
    return out, treedef

  def _has_ef(self, leaf: _Leaf) -> bool:
    return leaf.compress and self.cfg.uses_ef

  # ---------------------------------------------------------------- state

  def init(self, params) -> dict:
    """Zero residuals, the initial PowerSGD Q and a step counter.

    Args:
      params: global parameters (arrays or ShapeDtypeStructs); traceable.

    Returns:
      {"step": int32[], "ef": {name: f32[n, *work]}, "q": {name: Q}} where Q
      is f32[m_cols, r] (shared) or f32[n, m_cols, r] (hierarchical: each
      inner shard has its own Q).
    """
    leaves, _ = self._plan(params)
    ef, q = {}, {}
    for i, leaf in enumerate(leaves):
      if self._has_ef(leaf):
        ef[leaf.name] = jnp.zeros((self.n,) + leaf.work, jnp.float32)
      if leaf.rank:
        key = jax.random.fold_in(jax.random.key(_Q_SEED), i)
        q0 = jax.random.normal(key, leaf.work[:-2] + (leaf.work[-1], leaf.rank),
                               jnp.float32)
        if self.cfg.hierarchical:
          q0 = jnp.broadcast_to(q0, (self.n,) + q0.shape)
        q[leaf.name] = q0
    state = {"step": jnp.zeros((), jnp.int32), "ef": ef, "q": q}
    if self.cfg.feedback == "ef21":
      # The mean estimate h: replicated (like Q), per device only for
      # hierarchical shards.
      lead = (self.n,) if self.cfg.hierarchical else ()
      state["est"] = {k: jnp.zeros(lead + v.shape[1:], jnp.float32)
                      for k, v in ef.items()}
    if self.cfg.local_momentum > 0:
      state["mom"] = {leaf.name: jnp.zeros((self.n,) + leaf.shape, jnp.float32)
                      for leaf in leaves}
    return state

  def state_specs(self, state) -> dict:
    """P(axis_names) on the leading dim of per-device leaves, P() otherwise."""
    dev = P(self.axis_names)
    q_spec = dev if self.cfg.hierarchical else P()
    specs = {
        "step": P(),
        "ef": {k: dev for k in state["ef"]},
        "q": {k: q_spec for k in state["q"]},
    }
    if "est" in state:
      specs["est"] = {k: q_spec for k in state["est"]}
    if "mom" in state:
      specs["mom"] = {k: dev for k in state["mom"]}
    return specs

  # ------------------------------------------------------------ the call

  def __call__(self, grads, state, key):
    """Mean of `grads` over `axis_names` (inside shard_map).

    Args:
      grads: this device's gradients (pytree of float arrays).
      state: this device's view of `init`'s state (per-device leaves with a
        leading dim of 1).
      key: a PRNG key, identical on all devices.

    Returns:
      (mean, new_state, stats): the mean estimate (shapes and dtypes of
      `grads`, identical on all devices), the state, and scalar stats
      ("comm/ef_norm": RMS over devices of the residual norm, when EF is on;
      "comm/compressing": 1 once compression runs).
    """
    cfg = self.cfg
    leaves, treedef = self._plan(grads)
    g_leaves = treedef.flatten_up_to(grads)
    stats = {}
    if cfg.clip_local > 0:
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                          for g in g_leaves))
      scale = jnp.minimum(1.0, cfg.clip_local / jnp.maximum(norm, 1e-30))
      g_leaves = [(g * scale).astype(g.dtype) for g in g_leaves]
      stats["comm/local_norm"] = jax.lax.pmean(norm, self.axis_names)
    dtypes = [g.dtype for g in g_leaves]
    mom = None
    if cfg.local_momentum > 0:
      m = cfg.local_momentum
      mom, moved = {}, []
      for leaf, g in zip(leaves, g_leaves):
        u = m * state["mom"][leaf.name][0] + g.astype(jnp.float32)
        mom[leaf.name] = u
        moved.append(g.astype(jnp.float32) + m * u if cfg.local_nesterov else u)
      g_leaves = moved
    step = state["step"]
    ef = {k: v[0] for k, v in state["ef"].items()}
    est = state.get("est", {})
    if cfg.hierarchical:
      est = {k: v[0] for k, v in est.items()}
    q = state["q"]
    if cfg.hierarchical:
      q = {k: v[0] for k, v in q.items()}
    key = jax.random.fold_in(key, step)
    operands = (g_leaves, ef, est, q, key, step)
    if cfg.name == "none" or cfg.start_iter == 0:
      outs, ef, est, q, sent = self._all(leaves, *operands,
                                         compressed=cfg.name != "none")
    else:
      outs, ef, est, q, sent = jax.lax.cond(
          step >= cfg.start_iter,
          lambda ops: self._all(leaves, *ops, compressed=True),
          lambda ops: self._all(leaves, *ops, compressed=False),
          operands)
    if cfg.momentum_masking:
      # DGC's momentum factor masking; `sent` is all False while exact.
      mom = {k: jnp.where(sent[k], 0.0, u) if k in sent else u
             for k, u in mom.items()}
    if cfg.name != "none":
      stats["comm/compressing"] = (step >= cfg.start_iter).astype(jnp.float32)
    if ef:
      sq = sum(jnp.sum(e * e) for e in ef.values())
      # Hierarchical residuals are 1/|inner| shards: scale to a full tensor.
      sq = jax.lax.pmean(sq, self.axis_names) * self.n_inner
      stats["comm/ef_norm"] = jnp.sqrt(sq)
    if cfg.hierarchical:
      q = {k: v[None] for k, v in q.items()}
    new_state = {
        "step": step + 1,
        "ef": {k: v[None] for k, v in ef.items()},
        "q": q,
    }
    if est:
      new_state["est"] = ({k: v[None] for k, v in est.items()}
                          if cfg.hierarchical else est)
    if mom is not None:
      new_state["mom"] = {k: v[None] for k, v in mom.items()}
    mean = jax.tree_util.tree_unflatten(
        treedef, [o.astype(dt) for o, dt in zip(outs, dtypes)])
    return mean, new_state, stats

  def _all(self, leaves, g_leaves, ef, est, q, key, step, *,
           compressed: bool):
    ef, est, q = dict(ef), dict(est), dict(q)
    ef21 = self.cfg.feedback == "ef21"
    dev = jax.lax.axis_index(self.axis_names)
    outs = []
    sent = {}  # Leaf name -> bool mask of the coordinates this device sent.
    for i, (leaf, g) in enumerate(zip(leaves, g_leaves)):
      x = g.astype(jnp.float32)
      k_shared = jax.random.fold_in(key, i)
      k_local = jax.random.fold_in(k_shared, dev)
      if self.cfg.hierarchical:
        x = self._scatter(leaf, x)
      else:
        x = x.reshape(leaf.work)
      if compressed and leaf.compress:
        e = ef.get(leaf.name)
        if ef21 and e is not None:  # e is h_i; send C(g_i - h_i).
          mean, local, q_new = self._compressed(
              leaf, x - e, q.get(leaf.name), k_shared, k_local, step)
          ef[leaf.name] = e + local
          mean = est[leaf.name] = est[leaf.name] + mean
        else:
          p = x if e is None else x + e
          mean, local, q_new = self._compressed(
              leaf, p, q.get(leaf.name), k_shared, k_local, step)
          if e is not None:
            ef[leaf.name] = p - local
        if self.cfg.momentum_masking:
          sent[leaf.name] = (local != 0).reshape(leaf.shape)
        if q_new is not None:
          q[leaf.name] = q_new
      else:
        mean = jax.lax.pmean(x, self.comm_axes)
        if ef21 and leaf.name in ef:  # Exact step: h_i = g_i, h = mean.
          ef[leaf.name], est[leaf.name] = x, mean
        if self.cfg.momentum_masking and leaf.compress:
          sent[leaf.name] = jnp.zeros(leaf.shape, bool)
      if self.cfg.hierarchical:
        mean = self._gather(leaf, mean)
      outs.append(mean.reshape(leaf.shape))
    return outs, ef, est, q, sent

  def _scatter(self, leaf: _Leaf, x):
    """Mean over the inner axis, this device's 1/|inner| shard of it."""
    if leaf.rows:
      x = x.reshape(_matrix(leaf.shape))
      x = jnp.pad(x, ((0, leaf.pad), (0, 0)))
    else:
      x = jnp.pad(x.reshape(-1), (0, leaf.pad))
    shard = jax.lax.psum_scatter(x, self.inner, scatter_dimension=0,
                                 tiled=True)
    return shard / self.n_inner

  def _gather(self, leaf: _Leaf, shard):
    full = jax.lax.all_gather(shard, self.inner, axis=0, tiled=True)
    full = full[:full.shape[0] - leaf.pad]
    return full.reshape(leaf.shape)

  def _compressed(self, leaf: _Leaf, p, q, k_shared, k_local, step):
    """(mean estimate, this device's decompressed message, new Q)."""
    cfg, axes, n = self.cfg, self.comm_axes, self.n_comm
    name = cfg.name
    if name == "powersgd":
      g_hat, q_new = powersgd_round(p, q, axes, cfg.orth_eps,
                                    _FACTOR_DTYPES[cfg.factor_dtype])
      return g_hat, g_hat, q_new
    if name == "bf16":
      mean = jax.lax.psum(p.astype(jnp.bfloat16), axes).astype(jnp.float32)
      return mean / n, p, None
    if name in ("int8", "qsgd", "terngrad"):
      return self._quantized(p, k_local), p, None
    flat = p.reshape(-1)
    d = flat.size
    if name == "randomk":
      # A uniform k-subset: the k largest of d uniforms (40x faster on CPU
      # than random.choice(replace=False), which permutes all d).
      _, idx = jax.lax.top_k(jax.random.uniform(k_shared, (d,)), leaf.k)
      vals = flat[idx]
      scale = d / leaf.k if cfg.scale_randomk else 1.0
      total = jax.lax.psum(vals, axes)
      # jnp.zeros, not zeros_like: the mean must not inherit p's varying type.
      mean = jnp.zeros((d,), p.dtype).at[idx].set(total * (scale / n))
      local = jnp.zeros_like(flat).at[idx].set(vals * scale)
    elif name == "topk" and cfg.topk_select == "leader":
      _, idx = jax.lax.top_k(jnp.abs(flat), leaf.k)
      lead = jax.lax.axis_index(axes) == step % n
      idx = jax.lax.psum(jnp.where(lead, idx, 0), axes)
      vals = flat[idx]
      mean = jnp.zeros((d,), p.dtype).at[idx].set(
          jax.lax.psum(vals, axes) / n, unique_indices=True)
      local = jnp.zeros_like(flat).at[idx].set(vals, unique_indices=True)
    elif name == "topk":
      _, idx = jax.lax.top_k(jnp.abs(flat), leaf.k)
      vals = flat[idx]
      idx_all = jax.lax.all_gather(idx, axes, tiled=True).reshape(n, leaf.k)
      val_all = jax.lax.all_gather(vals, axes, tiled=True).reshape(n, leaf.k)

      def add_row(j, acc):
        # Row by row: indices are unique within a row, so the sum has one
        # fixed order on every device (no atomics on duplicates).
        return acc.at[idx_all[j]].add(val_all[j], unique_indices=True)

      mean = jax.lax.fori_loop(0, n, add_row, jnp.zeros((d,), p.dtype)) / n
      local = jnp.zeros_like(flat).at[idx].set(vals)
    elif name == "sign":
      scale = jnp.sum(jnp.abs(flat)) / d
      signs = jnp.sign(flat).astype(jnp.int8)
      signs_all = jax.lax.all_gather(signs, axes, tiled=True).reshape(n, d)
      scales_all = jax.lax.all_gather(scale.reshape(1), axes, tiled=True)
      mean = jnp.dot(scales_all, signs_all.astype(jnp.float32),
                     precision=_HIGHEST) / n
      local = scale * jnp.sign(flat)
    elif name == "sign_mv":
      scale = jnp.sum(jnp.abs(flat)) / d
      votes = jax.lax.psum(jnp.sign(flat).astype(jnp.int8), axes)
      mean = jax.lax.pmean(scale, axes) * jnp.sign(votes).astype(jnp.float32)
      local = scale * jnp.sign(flat)
    else:
      raise AssertionError(name)
    return mean.reshape(p.shape), local.reshape(p.shape), None

  def _quantized(self, p, k_local):
    """Unbiased shared-scale integer quantisation, summed as integers."""
    cfg, axes, n = self.cfg, self.comm_axes, self.n_comm
    u = jax.random.uniform(k_local, p.shape, jnp.float32)
    if cfg.name == "int8":
      levels = 127 // n
      scale = _safe(jax.lax.pmax(jnp.max(jnp.abs(p)), axes) / levels)
      q = jnp.clip(jnp.floor(p / scale + u), -levels, levels)
    elif cfg.name == "qsgd":
      levels = cfg.levels
      norm = jnp.sqrt(jnp.sum(p * p))
      scale = _safe(jax.lax.pmax(norm, axes)) / levels
      lvl = jnp.clip(jnp.floor(jnp.abs(p) / scale + u), 0, levels)
      q = jnp.sign(p) * lvl
    else:  # terngrad
      levels = 1
      scale = _safe(jax.lax.pmax(jnp.max(jnp.abs(p)), axes))
      q = jnp.sign(p) * (u < jnp.abs(p) / scale)
    if self.qsgd_gathers:
      q = q.astype(_int_dtype(levels)).reshape(-1)
      q_all = jax.lax.all_gather(q, axes, tiled=True).reshape(n, -1)
      total = jnp.sum(q_all.astype(jnp.int32), axis=0).reshape(p.shape)
    else:
      total = jax.lax.psum(q.astype(jnp.int8), axes)
    return scale * total.astype(jnp.float32) / n

  # ---------------------------------------------------------------- bytes

  def wire_bytes_breakdown(self, params) -> list[hlo.Collective]:
    """The collectives of one call after `start_iter`, in no fixed order.

    Args:
      params: arrays or ShapeDtypeStructs with the gradients' shapes.

    Returns:
      One `hlo.Collective` per collective operand, as `hlo.collectives`
      reads them from the lowered program.
    """
    leaves, _ = self._plan(params)
    cfg, n, inner = self.cfg, self.n_comm, self.n_inner
    out = []

    def add(kind, shape, dtype, group):
      out.append(hlo.Collective(kind, tuple(shape), hlo.dtype_name(dtype),
                                group))

    for leaf in leaves:
      if cfg.hierarchical:
        full = (leaf.work[0] * inner,) + leaf.work[1:]
        add("reduce_scatter", full, jnp.float32, inner)
      w = leaf.work
      name = cfg.name if leaf.compress else "none"
      if name == "none":
        add("all_reduce", w, jnp.float32, n)
      elif name == "bf16":
        add("all_reduce", w, jnp.bfloat16, n)
      elif name in ("int8", "qsgd", "terngrad"):
        add("all_reduce", (), jnp.float32, n)  # Shared scale (pmax).
        if self.qsgd_gathers:
          add("all_gather", (leaf.size,), _int_dtype(cfg.levels), n)
        else:
          add("all_reduce", w, jnp.int8, n)
      elif name == "randomk":
        add("all_reduce", (leaf.k,), jnp.float32, n)
      elif name == "topk" and cfg.topk_select == "leader":
        add("all_reduce", (leaf.k,), jnp.int32, n)
        add("all_reduce", (leaf.k,), jnp.float32, n)
      elif name == "topk":
        add("all_gather", (leaf.k,), jnp.int32, n)
        add("all_gather", (leaf.k,), jnp.float32, n)
      elif name == "sign":
        add("all_gather", (leaf.size,), jnp.int8, n)
        add("all_gather", (1,), jnp.float32, n)
      elif name == "sign_mv":
        add("all_reduce", (leaf.size,), jnp.int8, n)
        add("all_reduce", (), jnp.float32, n)
      elif name == "powersgd":
        fdt = _FACTOR_DTYPES[cfg.factor_dtype]
        add("all_reduce", w[:-1] + (leaf.rank,), fdt, n)
        add("all_reduce", w[:-2] + (w[-1], leaf.rank), fdt, n)
      if cfg.hierarchical:
        add("all_gather", w, jnp.float32, inner)
    if any(self._has_ef(leaf) for leaf in leaves):
      add("all_reduce", (), jnp.float32, self.n)  # comm/ef_norm
    return out

  def wire_bytes(self, params) -> int:
    """Bytes each device sends per call (ring model, after `start_iter`)."""
    return hlo.total_bytes(self.wire_bytes_breakdown(params))
