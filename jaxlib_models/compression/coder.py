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


def encode(q, idx, table: CodingTable) -> bytes:
  """Range-codes integer symbols q (any shape) with per-symbol scale indices
  idx (same shape) under `table`. Returns the stream bytes."""
  q = np.asarray(q).ravel().astype(np.int64)
  idx = np.asarray(idx).ravel().astype(np.int64)
  if q.shape != idx.shape:
    raise ValueError(f"symbols {q.shape} and scale indices {idx.shape} differ")
  if idx.size and (idx.min() < 0 or idx.max() >= len(table.pmfs)):
    raise ValueError(f"scale index out of range [0, {len(table.pmfs)})")
  enc = constriction.stream.queue.RangeEncoder()
  escapes = []
  order = np.argsort(idx, kind="stable")
  qs, ids = q[order], idx[order]
  bounds = np.flatnonzero(np.diff(ids)) + 1
  for grp_q, grp_s in zip(np.split(qs, bounds), np.split(ids, bounds)):
    if grp_q.size == 0:
      continue
    s = int(grp_s[0])
    sym, inside = table._symbols(grp_q, s)
    escapes.extend(grp_q[~inside].tolist())
    enc.encode(sym, _fixed_model(table, s))
  words = enc.get_compressed().astype("<u4").tobytes()
  esc = np.asarray(escapes, "<i4").tobytes()
  crc = zlib.crc32(words + esc)
  return struct.pack("<III", len(words) // 4, len(escapes), crc) + words + esc


def _fixed_model(table: CodingTable, s: int):
  m = table._models.get(s)
  if m is None:
    m = constriction.stream.model.Categorical(table.pmfs[s], perfect=False)
    table._models[s] = m
  return m


def decode(data: bytes, idx, table: CodingTable) -> np.ndarray:
  """Inverse of `encode` given the same scale indices; returns q (shape of
  idx, int32)."""
  idx = np.asarray(idx)
  shape = idx.shape
  idx = idx.ravel().astype(np.int64)
  if len(data) < 12:
    raise CorruptStream(f"stream of {len(data)} bytes is shorter than its "
                        "12-byte header (truncated?)")
  n_words, n_esc, crc = struct.unpack("<III", data[:12])
  need = 12 + 4 * n_words + 4 * n_esc
  if len(data) != need:
    raise CorruptStream(f"stream has {len(data)} bytes, its header promises "
                        f"{need} (truncated or trailing data)")
  body = data[12:]
  if zlib.crc32(body) != crc:
    raise CorruptStream("stream checksum mismatch: the data are corrupt")
  words = np.frombuffer(body[:4 * n_words], "<u4").astype(np.uint32)
  escapes = np.frombuffer(body[4 * n_words:], "<i4")
  dec = constriction.stream.queue.RangeDecoder(words)
  order = np.argsort(idx, kind="stable")
  ids = idx[order]
  out_sorted = np.empty(ids.size, np.int64)
  bounds = np.flatnonzero(np.diff(ids)) + 1
  start, e = 0, 0
  for grp_s in np.split(ids, bounds):
    if grp_s.size == 0:
      continue
    s = int(grp_s[0])
    n_sym = len(table.pmfs[s]) - 1
    sym = np.asarray(dec.decode(_fixed_model(table, s), grp_s.size),
                     np.int64)
    vals = sym + int(table.lows[s])
    esc_pos = np.flatnonzero(sym == n_sym)
    if e + esc_pos.size > escapes.size:
      raise CorruptStream("stream needs more escaped values than it holds")
    vals[esc_pos] = escapes[e:e + esc_pos.size]
    e += esc_pos.size
    out_sorted[start:start + grp_s.size] = vals
    start += grp_s.size
  if e != escapes.size:
    raise CorruptStream(f"{escapes.size - e} escaped values left unused")
  out = np.empty_like(out_sorted)
  out[order] = out_sorted
  return out.reshape(shape).astype(np.int32)
