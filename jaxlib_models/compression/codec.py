"""compress / decompress: real .jlic files from a hyperprior codec.

Version 1 (plain hyperprior, context "none"; little endian):
  b"JLIC" | u8 version=1 | 8-byte model id | u32 H | u32 W |
  u16 z_h | u16 z_w | u32 len_z | u32 len_y | z section | y section
Version 2 (context models):
  b"JLIC" | u8 version=2 | 8-byte model id | u32 H | u32 W |
  u16 z_h | u16 z_w | u8 context (1 checkerboard, 2 serial) | u8 flags
  (bit 0: channel bitmap present, other bits 0) | [ceil(M/8) bytes: M-bit
  channel occupancy, LSB first, only with flag bit 0] | u32 len_z |
  u32 len_y | z section | y section
Sections are `coder` streams (each with its own length header and CRC32);
a v2 y section holds, in one stream, the anchors then the non-anchors
(checkerboard) or the positions in raster order (serial), each restricted to
the occupied channels. The model id hashes the configuration and every
parameter, so a file is never decoded with another model's weights (the
plain hyperprior's id is computed exactly as before the context models
existed, so its files keep decoding). Images are padded to a multiple of 64
(edge replication) and cropped back. The encoder derives every coder input
from decoded quantities (z^ = round(z - median) + median, then the hyper
synthesis) exactly as the decoder does, so `decompress(compress(x))` returns
the encoder's reconstruction bit for bit (same machine and backend; brief
learned_image_compression.md §2.4).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import (bottleneck, checkerboard, coder,
                                       entropy, hyperprior, serial)

MAGIC = b"JLIC"
VERSION = 1  # Plain hyperprior files.
VERSION_CONTEXT = 2  # Context-model files.
_HEAD = struct.Struct("<4sB8sIIHHII")
_HEAD2 = struct.Struct("<4sB8sIIHHBB")
_LENS = struct.Struct("<II")
CONTEXT_CODES = {"checkerboard": 1, "serial": 2}
PAD = 64
# Fields that existed before the context models: the model id of a config
# whose other fields are at their defaults hashes exactly these (v1 ids
# unchanged). Training-only and per-file options never enter the id.
_LEGACY_FIELDS = ("N", "M", "kind")
_NOT_IN_ID = ("l1_weight", "skip_channels")


class FormatError(ValueError):
  """A .jlic file that this reader cannot decode (named reason)."""


def model_key(cfg: hyperprior.HyperpriorConfig) -> tuple:
  """The config part of the model id: (N, M, kind) plus (name, value) of
  every other coding-relevant field that differs from its default."""
  key = tuple(getattr(cfg, f) for f in _LEGACY_FIELDS)
  for f in dataclasses.fields(cfg):
    if f.name in _LEGACY_FIELDS or f.name in _NOT_IN_ID:
      continue
    if getattr(cfg, f.name) != f.default:
      key += ((f.name, getattr(cfg, f.name)),)
  return key


@dataclasses.dataclass
class Codec:
  """A model, its params and the coding tables stored with them."""

  model: hyperprior.Hyperprior
  params: dict
  z_table: coder.CodingTable
  z_medians: np.ndarray
  y_table: coder.CodingTable
  model_id: bytes
  # Context models: checkerboard.Coder or serial.Coder; None = plain.
  y_coder: object = None

  @classmethod
  def from_params(cls, cfg: hyperprior.HyperpriorConfig, params) -> "Codec":
    stale = [b for b in cfg.synthesis_bypass if b in params]
    if stale:
      raise ValueError(
          f"params hold weights of the bypassed stages {stale}; a pruned"
          " model stores none (use distill.prune_params(params, bypass))")
    model = hyperprior.Hyperprior(cfg)
    eb = bottleneck.EntropyBottleneck(cfg.N)
    z_table, med = bottleneck.coding_table(eb, params["entropy_bottleneck"])
    y_table = coder.CodingTable.build(cfg.kind)
    h = hashlib.sha256(repr(model_key(cfg)).encode())
    for leaf in jax.tree.leaves(params):
      h.update(np.asarray(leaf).tobytes())
    y_coder = None
    if cfg.context == "checkerboard":
      y_coder = checkerboard.Coder(checkerboard.CheckerboardContext(
          cfg.M, cfg.anchor_family, cfg.nonanchor_family,
          cfg.mixture_components))
    elif cfg.context == "serial":
      y_coder = serial.Coder(serial.SerialContext(cfg.M, cfg.kind), y_table)
    # On the device once: the serial coder calls its step per position.
    params = jax.device_put(params)
    return cls(model, params, z_table, med.astype(np.float32), y_table,
               h.digest()[:8], y_coder)

  @property
  def context(self) -> str:
    return self.model.cfg.context

  def _ctx_params(self):
    return self.params["ckbd" if self.context == "checkerboard" else
                       "serial"]

  def _psi(self, z_hat) -> np.ndarray:
    _, hs, _ = self._fns
    scales, means = hs(self.params, jnp.asarray(z_hat))
    return np.concatenate([np.asarray(scales), np.asarray(means)], -1)

  @functools.cached_property
  def _fns(self):
    m = self.model

    def enc(p, x):
      y = m.apply({"params": p}, x, method="analysis")
      return y, m.apply({"params": p}, y, method="hyper_analysis")

    hs = lambda p, z: m.apply({"params": p}, z, method="hyper_synthesis")
    gs = lambda p, y: m.apply({"params": p}, y, method="synthesis")
    return jax.jit(enc), jax.jit(hs), jax.jit(gs)

  def _y_side(self, z_hat):
    _, hs, _ = self._fns
    scales, means = hs(self.params, jnp.asarray(z_hat))
    idx = np.asarray(entropy.scale_index(scales, self.y_table.scales))
    return idx, np.asarray(means)

  def _reconstruct(self, q, means, h: int, w: int) -> np.ndarray:
    return self._synthesize(q + means, h, w)

  def _synthesize(self, y_hat, h: int, w: int) -> np.ndarray:
    _, _, gs = self._fns
    x_hat = np.asarray(gs(self.params, jnp.asarray(y_hat, jnp.float32)))
    x_hat = x_hat[0, :h, :w]
    return np.clip(np.round(x_hat * 255.0), 0, 255).astype(np.uint8)


def _check_image(img) -> np.ndarray:
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an RGB image (H, W, 3), got shape "
                     f"{img.shape}; convert grey/RGBA images first")
  if img.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {img.dtype}")
  if img.shape[0] < 1 or img.shape[1] < 1 or max(img.shape[:2]) > 65535:
    raise ValueError(f"image size {img.shape[:2]} outside 1..65535")
  return img


def compress(codec: Codec, img, *, skip_channels: bool | None = None,
             refine=None, info: dict | None = None
             ) -> tuple[bytes, np.ndarray]:
  """Encodes an (H, W, 3) uint8 image; returns (file bytes, the decoder's
  reconstruction). skip_channels (context models only) overrides the
  config's `skip_channels`. refine: a `refine.RefineConfig` to optimize the
  latents for this image before coding (slower encode, same decoder); its
  before/after figures go into `info["refine"]` when info is a dict."""
  img = _check_image(img)
  if codec.context == "none" and skip_channels:
    raise ValueError("channel skipping needs a context model (the plain "
                     "hyperprior writes .jlic v1 files without a bitmap)")
  h, w = img.shape[:2]
  ph, pw = -h % PAD, -w % PAD
  x = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
  x = jnp.asarray(x[None].astype(np.float32) / 255.0)
  enc, _, _ = codec._fns
  y, z = (np.asarray(a) for a in enc(codec.params, x))
  if refine is not None:
    from jaxlib_models.compression import refine as refine_lib  # noqa: PLC0415

    y, z, rinfo = refine_lib.refine_latents(codec, x, y, z, h, w, refine)
    if info is not None:
      info["refine"] = rinfo
  z_bytes = bottleneck.encode_z(z, codec.z_table, codec.z_medians)
  z_hat = (np.round(z - codec.z_medians) + codec.z_medians).astype(
      np.float32)
  if codec.context != "none":
    return _compress_context(codec, y, z, z_bytes, z_hat, h, w,
                             skip_channels)
  idx, means = codec._y_side(z_hat)
  q = np.round(y - means).astype(np.int64)
  y_bytes = coder.encode(q, idx, codec.y_table)
  head = _HEAD.pack(MAGIC, VERSION, codec.model_id, h, w, z.shape[1],
                    z.shape[2], len(z_bytes), len(y_bytes))
  return head + z_bytes + y_bytes, codec._reconstruct(q, means, h, w)


def _compress_context(codec, y, z, z_bytes, z_hat, h, w, skip_channels):
  skip = (codec.model.cfg.skip_channels if skip_channels is None
          else bool(skip_channels))
  y_bytes, occ, y_hat = codec.y_coder.encode_y(
      codec._ctx_params(), y, codec._psi(z_hat), skip)
  head = _HEAD2.pack(MAGIC, VERSION_CONTEXT, codec.model_id, h, w,
                     z.shape[1], z.shape[2], CONTEXT_CODES[codec.context],
                     int(skip))
  if skip:
    head += np.packbits(occ, bitorder="little").tobytes()
  head += _LENS.pack(len(z_bytes), len(y_bytes))
  return head + z_bytes + y_bytes, codec._synthesize(y_hat, h, w)


def _check_model(codec: Codec, mid: bytes) -> None:
  if mid != codec.model_id:
    raise FormatError(f"encoded with model {mid.hex()}, the loaded model is "
                      f"{codec.model_id.hex()}: decode with the checkpoint "
                      "that encoded it")


def model_id_of(data: bytes) -> bytes:
  """The 8-byte model id of a .jlic file (both versions keep it right after
  magic and version), so a reader can pick the model that wrote it."""
  if len(data) < 13 or data[:4] != MAGIC:
    raise FormatError(f"not a .jlic file (starts with {data[:4]!r}, "
                      f"expected {MAGIC!r})")
  return data[5:13]


def _parse(codec: Codec, data: bytes):
  """(h, w, zh, zw, occupancy or None, z bytes, y bytes) after checking
  every header field."""
  if len(data) < _HEAD.size:
    raise FormatError(f"{len(data)} bytes is shorter than the "
                      f"{_HEAD.size}-byte header: truncated or not a .jlic")
  magic, ver = data[:4], data[4]
  if magic != MAGIC:
    raise FormatError(f"not a .jlic file (magic {magic!r}, expected "
                      f"{MAGIC!r})")
  if ver not in (VERSION, VERSION_CONTEXT):
    raise FormatError(f"file format version {ver}; this reader decodes "
                      f"versions {VERSION} and {VERSION_CONTEXT}")
  if ver == VERSION:
    _, _, mid, h, w, zh, zw, lz, ly = _HEAD.unpack(data[:_HEAD.size])
    if codec.context != "none":
      raise FormatError(f"version {ver} file of a plain hyperprior; the "
                        f"loaded model uses the {codec.context} context "
                        "(version 2 files)")
    _check_model(codec, mid)
    occ, off = None, _HEAD.size
  else:
    _, _, mid, h, w, zh, zw, ctx, flags = _HEAD2.unpack(data[:_HEAD2.size])
    names = {v: k for k, v in CONTEXT_CODES.items()}
    if ctx not in names:
      raise FormatError(f"unknown context code {ctx} in a version 2 file")
    if names[ctx] != codec.context:
      raise FormatError(f"file written by a {names[ctx]} context model, the "
                        f"loaded model uses context {codec.context!r}")
    _check_model(codec, mid)
    if flags & ~1:
      raise FormatError(f"unknown header flags {flags:#04x}")
    off = _HEAD2.size
    occ = None
    if flags & 1:
      m = codec.model.cfg.M
      nb = (m + 7) // 8
      if len(data) < off + nb + _LENS.size:
        raise FormatError(f"{len(data)} bytes is shorter than the header "
                          "with its channel bitmap: truncated")
      bits = np.unpackbits(np.frombuffer(data[off:off + nb], np.uint8),
                           bitorder="little")
      if bits[m:].any():
        raise FormatError("channel bitmap has bits set beyond M: corrupt")
      occ = bits[:m].astype(bool)
      off += nb
    if len(data) < off + _LENS.size:
      raise FormatError(f"{len(data)} bytes is shorter than the "
                        f"{off + _LENS.size}-byte header: truncated")
    lz, ly = _LENS.unpack(data[off:off + _LENS.size])
    off += _LENS.size
  if len(data) != off + lz + ly:
    raise FormatError(f"file has {len(data)} bytes, its header promises "
                      f"{off + lz + ly}: truncated or trailing data")
  hp, wp = h + (-h % PAD), w + (-w % PAD)
  if (zh, zw) != (hp // PAD, wp // PAD):
    raise FormatError(f"z grid {zh}x{zw} does not match image {h}x{w}")
  return h, w, zh, zw, occ, data[off:off + lz], data[off + lz:]


def occupancy(codec: Codec, data: bytes) -> np.ndarray | None:
  """The (M,) bool channel-occupancy map of a .jlic file written with
  channel skipping (False: the channel was all zero, neither coded nor
  decoded), or None for a file without one. Checks the header as
  `decompress` does."""
  return _parse(codec, data)[4]


def decompress(codec: Codec, data: bytes) -> np.ndarray:
  """Decodes .jlic bytes (version 1 or 2) to an (H, W, 3) uint8 image."""
  h, w, zh, zw, occ, z_data, y_data = _parse(codec, data)
  c = codec.model.cfg
  try:
    z_hat = bottleneck.decode_z(z_data, (1, zh, zw, c.N), codec.z_table,
                                codec.z_medians)
    if codec.context == "none":
      idx, means = codec._y_side(z_hat)
      q = coder.decode(y_data, idx, codec.y_table)
      return codec._reconstruct(q, means, h, w)
    y_hat = codec.y_coder.decode_y(codec._ctx_params(), y_data,
                                   codec._psi(z_hat), occ)
  except coder.CorruptStream as e:
    raise FormatError(f"corrupt .jlic data: {e}") from e
  return codec._synthesize(y_hat, h, w)
