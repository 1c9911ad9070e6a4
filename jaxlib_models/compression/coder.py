"""Real entropy coding of integer latents with constriction's range coder.

A `CodingTable` holds, for each scale of the scale table, a float64 PMF over
the integers [-L_s, L_s] plus one escape symbol carrying the tail mass (at
least 2^-16 so the fixed-point model keeps it codable). Tables are built once
on the host, stored with the checkpoint (`to_arrays` / `from_arrays`), and
never recomputed from network floats, so the decoder's models are the
encoder's bit for bit. Symbols are coded grouped by scale index in ascending
order (the decoder knows every index before it decodes: they come from the
hyperprior or from already-decoded context), so each group uses one fixed
model and the coder runs vectorised. Values outside [-L_s, L_s] are coded as
the escape symbol and stored raw (int32) in a side section: exact, and rare
by construction (tail mass 1e-9 by default).

Context models write one stream in chunks (`StreamEncoder`): scale-table
groups as above, or per-symbol `Categorical` rows for mixtures, built in
float64 from snapped integer parameters only (brief learned_image_compression
.md §2.4 rule 2; rows windowed to mu +- 8 sigma plus the escape entry, grouped
by power-of-two width, repeated rows computed once). The decoder replays the
chunks in the same order (`StreamDecoder`).

Stream layout: u32 n_words | u32 n_escapes | u32 crc32(words + escapes) |
words (u32 LE) | escapes (i32 LE). A corrupt or truncated stream raises
`CorruptStream` instead of decoding garbage.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import constriction
import numpy as np
from scipy import stats

from jaxlib_models.compression import entropy


class CorruptStream(ValueError):
  """The bytes are not a stream written by `encode` (or were damaged)."""


ESCAPE_MIN_P = 2.0**-16


@dataclasses.dataclass
class CodingTable:
  """Per-scale PMFs for one distribution family."""

  kind: str  # "gaussian" | "laplace" | "logistic" | "factorized".
  scales: np.ndarray  # (S,) float64 (factorized: one row per channel).
  lows: np.ndarray  # (S,) int: the smallest codable value of model s.
  pmfs: list  # S arrays: P(low), P(low + 1), ..., then the escape mass.
  # constriction models, built on first use (not saved).
  _models: dict = dataclasses.field(default_factory=dict, repr=False,
                                    compare=False)

  @classmethod
  def build(cls, kind: str = "gaussian", scales=None,
            tail_mass: float = 1e-9) -> "CodingTable":
    if kind not in entropy.KINDS:
      raise ValueError(f"unknown distribution {kind!r}; use {entropy.KINDS}")
    scales = np.asarray(entropy.default_scale_table() if scales is None
                        else scales, np.float64)
    lows, pmfs = [], []
    for s in scales:
      s = max(s, entropy.SCALE_MIN)
      # Half-width so that P(|q| > L) <= tail_mass under the continuous law.
      if kind == "gaussian":
        q = stats.norm.isf(tail_mass / 2) * s
      elif kind == "laplace":
        q = -np.log(tail_mass) * s
      else:
        q = np.log(2 / tail_mass) * s
      half = int(np.ceil(q + 0.5))
      v = np.arange(-half, half + 1)
      p = entropy.pmf_np(kind, v, s)
      esc = max(1.0 - p.sum(), ESCAPE_MIN_P)
      pmf = np.concatenate([p, [esc]])
      lows.append(-half)
      pmfs.append(pmf / pmf.sum())
    return cls(kind, scales, np.asarray(lows), pmfs)

  @classmethod
  def from_pmfs(cls, lows, pmfs, kind: str = "factorized") -> "CodingTable":
    """Tables from explicit PMFs over low..low+len-1 (e.g. the factorised
    prior of `bottleneck.py`); an escape entry of at least 2^-16 is added."""
    out = []
    for p in pmfs:
      p = np.clip(np.asarray(p, np.float64), 0.0, None)
      esc = max(1.0 - p.sum(), ESCAPE_MIN_P)
      pmf = np.concatenate([p, [esc]])
      out.append(pmf / pmf.sum())
    lows = np.asarray(lows, np.int64)
    return cls(kind, np.zeros(len(out)), lows, out)

  def _symbols(self, q, s: int):
    """Symbol ids of values q under model s, and the in-range mask."""
    n = len(self.pmfs[s]) - 1
    sym = q - int(self.lows[s])
    inside = (sym >= 0) & (sym < n)
    return np.where(inside, sym, n).astype(np.int32), inside

  def to_arrays(self) -> dict:
    """Flat numpy arrays (for saving with a checkpoint)."""
    return {"kind": np.frombuffer(self.kind.encode(), np.uint8),
            "scales": self.scales, "lows": self.lows,
            "sizes": np.asarray([len(p) for p in self.pmfs], np.int64),
            "pmf_flat": np.concatenate(self.pmfs)}

  @classmethod
  def from_arrays(cls, a: dict) -> "CodingTable":
    kind = bytes(np.asarray(a["kind"], np.uint8)).decode()
    sizes = np.asarray(a["sizes"], np.int64)
    flat = np.asarray(a["pmf_flat"], np.float64)
    if flat.size != sizes.sum():
      raise CorruptStream(f"coding table: {flat.size} PMF entries, expected "
                          f"{int(sizes.sum())}")
    pmfs = np.split(flat, np.cumsum(sizes)[:-1])
    return cls(kind, np.asarray(a["scales"], np.float64),
               np.asarray(a["lows"], np.int64), list(pmfs))

  def ideal_bits(self, q: np.ndarray, idx: np.ndarray) -> float:
    """-sum log2 P(q) under the tables (escape: its mass + 32 raw bits)."""
    q, idx = np.asarray(q).ravel(), np.asarray(idx).ravel()
    bits = 0.0
    for s in np.unique(idx):
      sym, inside = self._symbols(q[idx == s], s)
      bits += -np.log2(self.pmfs[s][sym]).sum() + 32.0 * (~inside).sum()
    return float(bits)


class StreamEncoder:
  """One range-coded stream written in chunks, each chunk under its own
  models: scale-table groups (`table`) or per-symbol mixture rows
  (`mixture`). The decoder must replay the same chunks in the same order
  with the same coding parameters (which it derives from decoded data).
  `finish` returns the stream in the layout of the module docstring."""

  def __init__(self):
    self._enc = constriction.stream.queue.RangeEncoder()
    self._escapes = []

  def table(self, q, idx, table: CodingTable) -> None:
    """Codes q (any shape) with scale indexes idx (same shape), grouped by
    index in ascending order."""
    q = np.asarray(q).ravel().astype(np.int64)
    idx = np.asarray(idx).ravel().astype(np.int64)
    if q.shape != idx.shape:
      raise ValueError(f"symbols {q.shape} and scale indices {idx.shape} "
                       "differ")
    if idx.size and (idx.min() < 0 or idx.max() >= len(table.pmfs)):
      raise ValueError(f"scale index out of range [0, {len(table.pmfs)})")
    order = np.argsort(idx, kind="stable")
    qs, ids = q[order], idx[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for grp_q, grp_s in zip(np.split(qs, bounds), np.split(ids, bounds)):
      if grp_q.size == 0:
        continue
      s = int(grp_s[0])
      sym, inside = table._symbols(grp_q, s)
      self._escapes.extend(grp_q[~inside].tolist())
      self._enc.encode(sym, _fixed_model(table, s))

  def mixture(self, q, wq, mq, sq, kinds, scales, grid) -> None:
    """Codes q (n,) under per-symbol mixtures given by snapped parameters
    wq, mq, sq (n, K) (see `entropy.quantize_mixture`)."""
    q = np.asarray(q).ravel().astype(np.int64)
    for chunk, lows, rows in _mixture_chunks(wq, mq, sq, kinds, scales, grid):
      n = rows.shape[1] - 1
      sym = q[chunk] - lows
      inside = (sym >= 0) & (sym < n)
      self._escapes.extend(q[chunk][~inside].tolist())
      self._enc.encode(np.where(inside, sym, n).astype(np.int32),
                       _FAMILY, rows)

  def finish(self) -> bytes:
    words = self._enc.get_compressed().astype("<u4").tobytes()
    esc = np.asarray(self._escapes, "<i4").tobytes()
    crc = zlib.crc32(words + esc)
    return (struct.pack("<III", len(words) // 4, len(self._escapes), crc)
            + words + esc)


class StreamDecoder:
  """Reads a `StreamEncoder` stream chunk by chunk (same calls, same
  order, same coding parameters); `finish` checks that every escaped value
  was used."""

  def __init__(self, data: bytes):
    if len(data) < 12:
      raise CorruptStream(f"stream of {len(data)} bytes is shorter than its "
                          "12-byte header (truncated?)")
    n_words, n_esc, crc = struct.unpack("<III", data[:12])
    need = 12 + 4 * n_words + 4 * n_esc
    if len(data) != need:
      raise CorruptStream(f"stream has {len(data)} bytes, its header "
                          f"promises {need} (truncated or trailing data)")
    body = data[12:]
    if zlib.crc32(body) != crc:
      raise CorruptStream("stream checksum mismatch: the data are corrupt")
    words = np.frombuffer(body[:4 * n_words], "<u4").astype(np.uint32)
    self._escapes = np.frombuffer(body[4 * n_words:], "<i4")
    self._e = 0
    self._dec = constriction.stream.queue.RangeDecoder(words)

  def _take_escapes(self, vals, esc_pos):
    e = self._e
    if e + esc_pos.size > self._escapes.size:
      raise CorruptStream("stream needs more escaped values than it holds")
    vals[esc_pos] = self._escapes[e:e + esc_pos.size]
    self._e = e + esc_pos.size

  def table(self, idx, table: CodingTable) -> np.ndarray:
    """q of the shape of idx (int32)."""
    idx = np.asarray(idx)
    shape = idx.shape
    idx = idx.ravel().astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(table.pmfs)):
      raise ValueError(f"scale index out of range [0, {len(table.pmfs)})")
    order = np.argsort(idx, kind="stable")
    ids = idx[order]
    out_sorted = np.empty(ids.size, np.int64)
    bounds = np.flatnonzero(np.diff(ids)) + 1
    start = 0
    for grp_s in np.split(ids, bounds):
      if grp_s.size == 0:
        continue
      s = int(grp_s[0])
      n_sym = len(table.pmfs[s]) - 1
      sym = np.asarray(self._dec.decode(_fixed_model(table, s), grp_s.size),
                       np.int64)
      vals = sym + int(table.lows[s])
      self._take_escapes(vals, np.flatnonzero(sym == n_sym))
      out_sorted[start:start + grp_s.size] = vals
      start += grp_s.size
    out = np.empty_like(out_sorted)
    out[order] = out_sorted
    return out.reshape(shape).astype(np.int32)

  def mixture(self, wq, mq, sq, kinds, scales, grid) -> np.ndarray:
    """q (n,) int32 for the snapped mixtures wq, mq, sq (n, K)."""
    out = np.empty(np.shape(wq)[0], np.int64)
    for chunk, lows, rows in _mixture_chunks(wq, mq, sq, kinds, scales, grid):
      n = rows.shape[1] - 1
      sym = np.asarray(self._dec.decode(_FAMILY, rows), np.int64)
      vals = sym + lows
      self._take_escapes(vals, np.flatnonzero(sym == n))
      out[chunk] = vals
    return out.astype(np.int32)

  def finish(self) -> None:
    if self._e != self._escapes.size:
      raise CorruptStream(f"{self._escapes.size - self._e} escaped values "
                          "left unused")


# Mixtures: one Categorical row per symbol (leaky quantisation gives every
# entry of a row non-zero mass, so padding never makes a symbol uncodable).
_FAMILY = constriction.stream.model.Categorical(perfect=False)
_MAX_ROW_ENTRIES = 1 << 21  # Floats per coder call (memory bound).
_MIN_WIDTH = 4


def _mixture_chunks(wq, mq, sq, kinds, scales, grid):
  """Yields (symbol positions, lows, float64 rows incl. the escape column)
  in coding order: rows are grouped by power-of-two width (ascending, stable
  inside a group) and built from the snapped integers only, with repeated
  parameter rows computed once (np.unique), so encoder and decoder get
  identical rows (brief §2.4 rule 2)."""
  wq, mq, sq = (np.asarray(a, np.int64) for a in (wq, mq, sq))
  n, k = wq.shape
  if mq.shape != (n, k) or sq.shape != (n, k) or len(kinds) != k:
    raise ValueError(f"mixture parameters {wq.shape}, {mq.shape}, "
                     f"{sq.shape} with {len(kinds)} kinds")
  if n == 0:
    return
  if sq.min() < 0 or sq.max() >= len(scales):
    raise ValueError(f"scale index out of range [0, {len(scales)})")
  uniq, inv = _unique_rows(np.concatenate([wq, mq, sq], 1))
  w = uniq[:, :k].astype(np.float64)
  w[w.sum(1) == 0] = 1.0  # Every weight snapped to 0: equal weights.
  w /= w.sum(1, keepdims=True)
  mu = uniq[:, k:2 * k] * float(grid.mean_step)
  s = np.asarray(scales, np.float64)[uniq[:, 2 * k:]]
  act = w > 0
  lo = np.floor(np.where(act, mu - grid.window * s, np.inf).min(1))
  hi = np.ceil(np.where(act, mu + grid.window * s, -np.inf).max(1))
  width = np.maximum(hi - lo + 1, _MIN_WIDTH).astype(np.int64)
  bucket_u = (1 << np.ceil(np.log2(width)).astype(np.int64))
  lo = lo.astype(np.int64)
  bucket = bucket_u[inv]
  order = np.argsort(bucket, kind="stable")
  bounds = np.flatnonzero(np.diff(bucket[order])) + 1
  for grp in np.split(order, bounds):
    wb = int(bucket[grp[0]])
    step = max(1, _MAX_ROW_ENTRIES // (wb + 1))
    for a in range(0, grp.size, step):
      chunk = grp[a:a + step]
      u, row_of = np.unique(inv[chunk], return_inverse=True)
      v = lo[u][:, None] + np.arange(wb)[None, :]
      p = np.zeros((u.size, wb), np.float64)
      for c in range(k):
        p += w[u, c, None] * entropy.interval_np(
            kinds[c], v - mu[u, c, None], s[u, c, None])
      esc = np.maximum(1.0 - p.sum(1, keepdims=True), ESCAPE_MIN_P)
      rows = np.concatenate([p, esc], 1)
      rows /= rows.sum(1, keepdims=True)
      yield chunk, lo[u][row_of.ravel()], rows[row_of.ravel()]


def _unique_rows(a):
  """(distinct rows of a (u, c), index of each row's distinct row (n,)),
  like np.unique(a, axis=0) but through integer keys: the columns are
  packed into as few int64 words as their value ranges allow, then sorted
  (np.unique(axis=0) sorts opaque byte strings, ~10x slower)."""
  n, c = a.shape
  lo = a.min(0)
  bits = [int(np.ceil(np.log2(int(s)))) if s > 1 else 0
          for s in a.max(0) - lo + 1]
  words, cur, used = [], np.zeros(n, np.int64), 0
  for j in range(c):
    if used + bits[j] > 62:
      words.append(cur)
      cur, used = np.zeros(n, np.int64), 0
    cur = (cur << bits[j]) | (a[:, j] - lo[j])
    used += bits[j]
  words.append(cur)
  if len(words) == 1:
    _, first, inv = np.unique(words[0], return_index=True,
                              return_inverse=True)
    return a[first], inv.ravel()
  order = np.lexsort(words[::-1])
  change = np.zeros(n, bool)
  change[0] = True
  for w in words:
    ws = w[order]
    change[1:] |= ws[1:] != ws[:-1]
  inv = np.empty(n, np.int64)
  inv[order] = np.cumsum(change) - 1
  return a[order[change]], inv


def mixture_ideal_bits(q, wq, mq, sq, kinds, scales, grid) -> float:
  """-sum log2 P(q) under the snapped mixture rows (escape: its mass + 32
  raw bits)."""
  q = np.asarray(q).ravel().astype(np.int64)
  bits = 0.0
  for chunk, lows, rows in _mixture_chunks(wq, mq, sq, kinds, scales, grid):
    n = rows.shape[1] - 1
    sym = q[chunk] - lows
    inside = (sym >= 0) & (sym < n)
    sym = np.where(inside, sym, n)
    bits += -np.log2(rows[np.arange(chunk.size), sym]).sum()
    bits += 32.0 * (~inside).sum()
  return float(bits)


def encode(q, idx, table: CodingTable) -> bytes:
  """Range-codes integer symbols q (any shape) with per-symbol scale indices
  idx (same shape) under `table`. Returns the stream bytes."""
  enc = StreamEncoder()
  enc.table(q, idx, table)
  return enc.finish()


def _fixed_model(table: CodingTable, s: int):
  m = table._models.get(s)
  if m is None:
    m = constriction.stream.model.Categorical(table.pmfs[s], perfect=False)
    table._models[s] = m
  return m


def decode(data: bytes, idx, table: CodingTable) -> np.ndarray:
  """Inverse of `encode` given the same scale indices; returns q (shape of
  idx, int32)."""
  dec = StreamDecoder(data)
  out = dec.table(idx, table)
  dec.finish()
  return out
