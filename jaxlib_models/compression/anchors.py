"""Classical codecs measured on the same images as the learned ones.

JPEG, WebP and AVIF go through Pillow in memory; JPEG XL through the libjxl
command-line tools `cjxl`/`djxl` (Debian package libjxl-tools) with temporary
PNG files. Every point is a real file: bpp = 8·len(file)/(H·W) counts every
header byte. Settings (also in `Anchor.settings`, copied into reports):

- jpeg: Pillow `save(format="JPEG", quality=q)` defaults, i.e. libjpeg(-turbo)
  baseline, 4:2:0 chroma subsampling, standard Huffman tables
  (optimize=False), not progressive, JFIF header.
- webp: Pillow `save(format="WEBP", quality=q, method=4)`, lossy libwebp,
  4:2:0 (no sharp YUV).
- avif: Pillow `save(format="AVIF", quality=q, speed=6, subsampling="4:2:0",
  max_threads=1)`, only if `PIL.features.check("avif")`.
- jxl: `cjxl in.png out.jxl -q q -e 7` (VarDCT, effort 7), `djxl out.jxl
  out.png`; times include process start-up and PNG I/O.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, features


class AnchorUnavailable(RuntimeError):
  """The codec cannot run here; the message says why (kept in reports)."""


@dataclasses.dataclass(frozen=True)
class Coded:
  """One image coded at one setting."""

  quality: int  # The codec's quality setting.
  data: bytes  # The complete file.
  bpp: float  # 8·len(data)/(H·W), original dimensions.
  recon: np.ndarray  # Decoded (H, W, 3) uint8 image.
  encode_s: float  # Wall seconds to produce `data` from the image.
  decode_s: float  # Wall seconds to decode `data` to `recon`.


@dataclasses.dataclass(frozen=True)
class Anchor:
  """A classical codec: encode(img, quality) -> bytes, decode(bytes) -> img."""

  name: str
  encode: Callable[[np.ndarray, int], bytes]
  decode: Callable[[bytes], np.ndarray]
  qualities: tuple[int, ...]  # Default sweep, low to high quality.
  settings: str  # Human-readable encoder settings for the report.


def _check(img) -> np.ndarray:
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got "
                     f"{img.shape} {img.dtype}")
  return img


def _pil_encoder(fmt: str, **options) -> Callable[[np.ndarray, int], bytes]:
  def encode(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_check(img), "RGB").save(buf, format=fmt,
                                             quality=int(quality), **options)
    return buf.getvalue()

  return encode


def _pil_decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def _run(cmd: list[str]) -> None:
  proc = subprocess.run(cmd, capture_output=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace')[-500:]}")


def _jxl_encode(img: np.ndarray, quality: int) -> bytes:
  with tempfile.TemporaryDirectory() as d:
    src, dst = os.path.join(d, "in.png"), os.path.join(d, "out.jxl")
    Image.fromarray(_check(img), "RGB").save(src, compress_level=1)
    _run(["cjxl", src, dst, "-q", str(int(quality)), "-e", "7", "--quiet"])
    with open(dst, "rb") as f:
      return f.read()


def _jxl_decode(data: bytes) -> np.ndarray:
  with tempfile.TemporaryDirectory() as d:
    src, dst = os.path.join(d, "in.jxl"), os.path.join(d, "out.png")
    with open(src, "wb") as f:
      f.write(data)
    _run(["djxl", src, dst, "--quiet"])
    with Image.open(dst) as im:
      return np.asarray(im.convert("RGB"), np.uint8)


_SETTINGS = {
    "jpeg": "Pillow JPEG defaults: baseline, 4:2:0, optimize=False, JFIF",
    "webp": "Pillow WebP lossy, method=4, 4:2:0",
    "avif": "Pillow AVIF, speed=6, 4:2:0, max_threads=1, codec=auto",
    "jxl": "cjxl -q Q -e 7 (VarDCT) / djxl, via temporary PNG files",
}
NAMES = tuple(_SETTINGS)


def unavailable_reason(name: str) -> str | None:
  """None if `name` can run here, else the reason it cannot."""
  if name not in _SETTINGS:
    raise KeyError(f"unknown anchor {name!r}; have {list(NAMES)}")
  if name in ("jpeg", "webp", "avif"):
    feature = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}[name]
    if not features.check(feature):
      return f"Pillow was built without {name} support"
    return None
  missing = [t for t in ("cjxl", "djxl") if shutil.which(t) is None]
  if missing:
    return (f"{', '.join(missing)} not on PATH (Debian: apt-get install "
            "libjxl-tools)")
  return None


def get(name: str) -> Anchor:
  """The named anchor codec.

  Raises:
    KeyError: unknown name.
    AnchorUnavailable: the codec cannot run here (message says why).
  """
  reason = unavailable_reason(name)
  if reason is not None:
    raise AnchorUnavailable(f"{name}: {reason}")
  if name == "jpeg":
    return Anchor("jpeg", _pil_encoder("JPEG"), _pil_decode,
                  (5, 10, 20, 30, 45, 60, 75, 90, 95), _SETTINGS[name])
  if name == "webp":
    return Anchor("webp", _pil_encoder("WEBP", method=4), _pil_decode,
                  (5, 15, 30, 45, 60, 75, 85, 95), _SETTINGS[name])
  if name == "avif":
    enc = _pil_encoder("AVIF", speed=6, subsampling="4:2:0", max_threads=1)
    return Anchor("avif", enc, _pil_decode, (10, 25, 40, 55, 70, 80, 90),
                  _SETTINGS[name])
  return Anchor("jxl", _jxl_encode, _jxl_decode, (10, 25, 40, 55, 70, 85, 95),
                _SETTINGS[name])


def code(anchor: Anchor, img, qualities: Sequence[int] | None = None
         ) -> list[Coded]:
  """Codes one image at every quality (default: the anchor's sweep).

  Returns one `Coded` per quality, in the given order, with real file bytes,
  the bpp they give on the original H·W and wall-clock encode/decode times.
  """
  img = _check(img)
  h, w = img.shape[:2]
  out = []
  for q in anchor.qualities if qualities is None else qualities:
    t0 = time.perf_counter()
    data = anchor.encode(img, q)
    t1 = time.perf_counter()
    recon = anchor.decode(data)
    t2 = time.perf_counter()
    if recon.shape != img.shape:
      raise RuntimeError(f"{anchor.name} q={q}: decoded shape {recon.shape}"
                         f" differs from the input {img.shape}")
    out.append(Coded(int(q), data, 8.0 * len(data) / (h * w), recon,
                     t1 - t0, t2 - t1))
  return out
