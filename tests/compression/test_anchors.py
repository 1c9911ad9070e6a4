"""Classical anchors: real files, bpp from their size, quality ordering.

Oracles: file signatures of each format, byte counts, and the ordering
"higher quality setting -> more bytes and higher PSNR" on a real photo crop.
"""

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from jaxlib_models.compression import anchors, metrics

SIGNATURES = {
    "jpeg": lambda b: b[:3] == b"\xff\xd8\xff",
    "webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
    "avif": lambda b: b[4:8] == b"ftyp" and b"avif" in b[8:32],
    # bare codestream or ISOBMFF container
    "jxl": lambda b: b[:2] == b"\xff\x0a" or b[4:8] == b"JXL ",
}


@pytest.fixture(scope="module")
def photo():
  skimage_data = pytest.importorskip("skimage.data")
  return np.ascontiguousarray(skimage_data.astronaut()[100:164, 200:296])


def _get(name):
  reason = anchors.unavailable_reason(name)
  if reason is not None:
    pytest.skip(f"{name} anchor unavailable: {reason}")
  return anchors.get(name)


@pytest.mark.parametrize("name", anchors.NAMES)
def test_round_trip_real_file(name, photo):
  a = _get(name)
  low, high = anchors.code(a, photo, (20, 85))
  h, w = photo.shape[:2]
  for c in (low, high):
    assert SIGNATURES[name](c.data), c.data[:16]
    assert c.bpp == 8 * len(c.data) / (h * w)
    assert c.recon.shape == photo.shape and c.recon.dtype == np.uint8
    assert c.encode_s > 0 and c.decode_s > 0
    np.testing.assert_array_equal(a.decode(c.data), c.recon)
  assert len(high.data) > len(low.data)
  assert metrics.psnr(photo, high.recon) > metrics.psnr(photo, low.recon)


def test_jpeg_is_pillow_default_420(photo):
  """The stated settings: Pillow defaults (4:2:0, baseline)."""
  data = anchors.get("jpeg").encode(photo, 75)
  with Image.open(io.BytesIO(data)) as im:
    assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
    assert not im.info.get("progressive")
  ref = io.BytesIO()
  Image.fromarray(photo).save(ref, format="JPEG", quality=75)
  assert data == ref.getvalue()


def test_jxl_missing_tools_give_reason(monkeypatch):
  monkeypatch.setattr(anchors.shutil, "which", lambda _: None)
  assert "libjxl-tools" in anchors.unavailable_reason("jxl")
  with pytest.raises(anchors.AnchorUnavailable, match="cjxl"):
    anchors.get("jxl")


def test_unknown_anchor():
  with pytest.raises(KeyError, match="bpg"):
    anchors.get("bpg")


def test_rejects_non_uint8(photo):
  with pytest.raises(ValueError, match="uint8"):
    anchors.code(anchors.get("jpeg"), photo.astype(np.float32), (50,))
