"""compress / decompress: real .jlic files from a hyperprior codec.

File layout (little endian):
  b"JLIC" | u8 version | 8-byte model id | u32 H | u32 W |
  u16 z_h | u16 z_w | u32 len_z | u32 len_y | z section | y section
Sections are `coder` streams (each with its own length header and CRC32).
The model id hashes the configuration and every parameter, so a file is never
decoded with another model's weights. Images are padded to a multiple of 64
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

from jaxlib_models.compression import bottleneck, coder, entropy, hyperprior

MAGIC = b"JLIC"
VERSION = 1
_HEAD = struct.Struct("<4sB8sIIHHII")
PAD = 64


class FormatError(ValueError):
  """A .jlic file that this reader cannot decode (named reason)."""


@dataclasses.dataclass
class Codec:
  """A model, its params and the coding tables stored with them."""

  model: hyperprior.Hyperprior
  params: dict
  z_table: coder.CodingTable
  z_medians: np.ndarray
  y_table: coder.CodingTable
  model_id: bytes

  @classmethod
  def from_params(cls, cfg: hyperprior.HyperpriorConfig, params) -> "Codec":
    model = hyperprior.Hyperprior(cfg)
    eb = bottleneck.EntropyBottleneck(cfg.N)
    z_table, med = bottleneck.coding_table(eb, params["entropy_bottleneck"])
    y_table = coder.CodingTable.build(cfg.kind)
    h = hashlib.sha256(repr(dataclasses.astuple(cfg)).encode())
    for leaf in jax.tree.leaves(params):
      h.update(np.asarray(leaf).tobytes())
    return cls(model, params, z_table, med.astype(np.float32), y_table,
               h.digest()[:8])

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
    _, _, gs = self._fns
    x_hat = np.asarray(gs(self.params, jnp.asarray(q + means, jnp.float32)))
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


def compress(codec: Codec, img) -> tuple[bytes, np.ndarray]:
  """Encodes an (H, W, 3) uint8 image; returns (file bytes, the decoder's
  reconstruction)."""
  img = _check_image(img)
  h, w = img.shape[:2]
  ph, pw = -h % PAD, -w % PAD
  x = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
  x = jnp.asarray(x[None].astype(np.float32) / 255.0)
  enc, _, _ = codec._fns
  y, z = (np.asarray(a) for a in enc(codec.params, x))
  z_bytes = bottleneck.encode_z(z, codec.z_table, codec.z_medians)
  z_hat = (np.round(z - codec.z_medians) + codec.z_medians).astype(
      np.float32)
  idx, means = codec._y_side(z_hat)
  q = np.round(y - means).astype(np.int64)
  y_bytes = coder.encode(q, idx, codec.y_table)
  head = _HEAD.pack(MAGIC, VERSION, codec.model_id, h, w, z.shape[1],
                    z.shape[2], len(z_bytes), len(y_bytes))
  return head + z_bytes + y_bytes, codec._reconstruct(q, means, h, w)


def decompress(codec: Codec, data: bytes) -> np.ndarray:
  """Decodes .jlic bytes to an (H, W, 3) uint8 image."""
  if len(data) < _HEAD.size:
    raise FormatError(f"{len(data)} bytes is shorter than the "
                      f"{_HEAD.size}-byte header: truncated or not a .jlic")
  magic, ver, mid, h, w, zh, zw, lz, ly = _HEAD.unpack(data[:_HEAD.size])
  if magic != MAGIC:
    raise FormatError(f"not a .jlic file (magic {magic!r}, expected "
                      f"{MAGIC!r})")
  if ver != VERSION:
    raise FormatError(f"file format version {ver}; this reader decodes "
                      f"version {VERSION}")
  if mid != codec.model_id:
    raise FormatError(f"encoded with model {mid.hex()}, the loaded model is "
                      f"{codec.model_id.hex()}: decode with the checkpoint "
                      "that encoded it")
  if len(data) != _HEAD.size + lz + ly:
    raise FormatError(f"file has {len(data)} bytes, its header promises "
                      f"{_HEAD.size + lz + ly}: truncated or trailing data")
  hp, wp = h + (-h % PAD), w + (-w % PAD)
  if (zh, zw) != (hp // PAD, wp // PAD):
    raise FormatError(f"z grid {zh}x{zw} does not match image {h}x{w}")
  z_data = data[_HEAD.size:_HEAD.size + lz]
  y_data = data[_HEAD.size + lz:]
  c = codec.model.cfg
  try:
    z_hat = bottleneck.decode_z(z_data, (1, zh, zw, c.N), codec.z_table,
                                codec.z_medians)
    idx, means = codec._y_side(z_hat)
    q = coder.decode(y_data, idx, codec.y_table)
  except coder.CorruptStream as e:
    raise FormatError(f"corrupt .jlic data: {e}") from e
  return codec._reconstruct(q, means, h, w)
