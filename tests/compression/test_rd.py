"""The RD harness end to end on two small photo crops.

The "learned" curve is Pillow JPEG at other qualities wrapped as
LearnedPoints, so every number has an independent re-computation here:
bytes from Pillow directly, PSNR/MS-SSIM from `metrics` per image.
"""

import json
import math
import os

import numpy as np
import pytest

from jaxlib_models.compression import anchors, metrics, rd

JPEG_Q = (10, 25, 45, 70, 90)
FAKE_Q = (15, 35, 55, 80)


@pytest.fixture(scope="module")
def images():
  skimage_data = pytest.importorskip("skimage.data")
  big = np.ascontiguousarray(skimage_data.astronaut()[:176, 40:240])
  small = np.ascontiguousarray(skimage_data.coffee()[100:196, 200:328])
  return {"astro": big, "coffee": small}  # MS-SSIM on astro only


def _fake_curve(estimate=True):
  jp = anchors.get("jpeg")
  return [rd.LearnedPoint(
      f"fake-q{q}", lambda x, q=q: jp.encode(x, q), jp.decode,
      (lambda x, q=q: 4.0 * len(jp.encode(x, q))) if estimate else None)
          for q in FAKE_Q]


@pytest.fixture(scope="module")
def result(images):
  return rd.run_rd(images, {"fake": _fake_curve()}, anchors=("jpeg", "webp"),
                   anchor_qualities={"jpeg": JPEG_Q, "webp": (20, 50, 80)},
                   progress=False)


def _bd(result, test, anchor, metric="psnr", method="pchip"):
  (row,) = [r for r in result["bd"] if (r["test"], r["anchor"], r["metric"],
                                         r["method"]) == (test, anchor, metric,
                                                          method)]
  return row


def test_points_match_independent_recomputation(result, images):
  """Planted bugs caught: bpp on padded or mean-of-sizes, PSNR of the mean
  MSE, MS-SSIM averaged over images with a side <= 160 (ValueError)."""
  jp = anchors.get("jpeg")
  curve = result["curves"]["fake"]
  assert curve["kind"] == "learned"
  for q, point in zip(FAKE_Q, curve["points"]):
    files = {k: jp.encode(v, q) for k, v in images.items()}
    recons = {k: jp.decode(b) for k, b in files.items()}
    bpp = np.mean([8 * len(files[k]) / (v.shape[0] * v.shape[1])
                   for k, v in images.items()])
    psnr = np.mean([metrics.psnr(v, recons[k]) for k, v in images.items()])
    ms = metrics.ms_ssim(images["astro"], recons["astro"])
    assert point["bpp"] == pytest.approx(bpp, rel=1e-12)
    assert point["psnr"] == pytest.approx(psnr, rel=1e-12)
    assert point["ms_ssim"] == pytest.approx(ms, rel=1e-12)
    assert point["ms_ssim_db"] == pytest.approx(metrics.ms_ssim_db(ms))
    assert point["per_image"]["coffee"]["ms_ssim"] is None
    # estimate = half the real bits -> real/est ratio 2
    assert point["real_over_est"] == pytest.approx(2.0, rel=1e-12)
    assert point["decode_deterministic"] and point["encode_deterministic"]
    assert point["encode_s"] > 0 and point["decode_s"] > 0
  assert result["msssim_images"] == ["astro"]
  assert any("1 of 2 images" in n for n in result["notes"])


def test_bd_rows(result):
  for ref in ("jpeg", "webp"):
    for method in ("pchip", "cubic"):
      # cubic needs 4 points: webp has 3
      rows = [r for r in result["bd"] if r["test"] == ref == r["anchor"]
              and r["method"] == method]
      if ref == "webp" and method == "cubic":
        assert not rows
        continue
      for r in rows:
        assert r["value"] == pytest.approx(0.0, abs=1e-12)  # curve vs itself
  # The same codec sampled at other qualities: BD near 0, not exactly 0.
  near = _bd(result, "fake", "jpeg")
  assert abs(near["value"]) < 3.0 and near["lo"] < near["hi"]
  assert 0 < near["overlap"] <= 1
  # WebP beats JPEG on photos; sign and rough size only.
  assert _bd(result, "webp", "jpeg")["value"] < -10.0
  assert _bd(result, "fake", "jpeg", metric="ms_ssim_db")["method"] == "pchip"


def test_report_files(result, tmp_path):
  paths = rd.write_report(result, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["rd.json", "rd.md", "rd.png"]
  with open(paths["json"], encoding="utf-8") as f:
    back = json.load(f)
  assert back["curves"]["fake"]["points"][0]["bpp"] == pytest.approx(
      result["curves"]["fake"]["points"][0]["bpp"])
  with open(paths["md"], encoding="utf-8") as f:
    md = f.read()
  assert "not comparable to published Kodak numbers" in md
  assert "JPEG-sourced photos flatter every codec" in md
  assert "| fake | jpeg | psnr | pchip |" in md
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_nondeterministic_decoder_is_caught(images):
  """A decoder that adds fresh noise on every call must fail the run."""
  jp = anchors.get("jpeg")
  rng = np.random.default_rng(0)

  def shaky_decode(b):
    x = jp.decode(b).astype(np.int64)
    return np.clip(x + rng.integers(-1, 2, x.shape), 0, 255).astype(np.uint8)

  bad = {"bad": [rd.LearnedPoint("bad", lambda x: jp.encode(x, 50),
                                 shaky_decode)]}
  with pytest.raises(rd.NonDeterministicDecode, match="twice"):
    rd.run_rd(images, bad, anchors=(), progress=False)


def test_wrong_shape_and_skipped_anchor(images, monkeypatch):
  jp = anchors.get("jpeg")
  crop = {"crop": [rd.LearnedPoint("crop", lambda x: jp.encode(x, 50),
                                   lambda b: jp.decode(b)[:-1])]}
  with pytest.raises(ValueError, match="crop padding"):
    rd.run_rd(images, crop, anchors=(), progress=False)
  monkeypatch.setattr(anchors.shutil, "which", lambda _: None)
  res = rd.run_rd({"coffee": images["coffee"]},
                  {"fake": _fake_curve(estimate=False)},
                  anchors=("jpeg", "jxl"), anchor_qualities={"jpeg": JPEG_Q},
                  warmup=False, kodak=True, progress=False)
  assert "libjxl-tools" in res["skipped"]["jxl"]
  assert "jxl" not in res["curves"]
  assert not res["msssim_images"]
  assert all(r["metric"] == "psnr" for r in res["bd"])
  assert not any("Kodak" in n for n in res["notes"])
  assert "est_bpp" not in res["curves"]["fake"]["points"][0]


def test_lossless_point_is_left_out_of_bd(images):
  """An identical reconstruction has infinite PSNR; it stays in the table
  (JSON "inf") but not in the BD integral."""
  jp = anchors.get("jpeg")

  def raw_decode(b):
    h, w = np.frombuffer(b[:8], np.uint32)
    return np.frombuffer(b[8:], np.uint8).reshape(h, w, 3)

  lossless = rd.LearnedPoint(
      "raw", lambda x: np.uint32(x.shape[:2]).tobytes() + x.tobytes(),
      raw_decode)
  pts = [rd.LearnedPoint(f"q{q}", lambda x, q=q: jp.encode(x, q), jp.decode)
         for q in (20, 60)] + [lossless]
  res = rd.run_rd(images, {"mix": pts}, anchors=("jpeg",),
                  anchor_qualities={"jpeg": JPEG_Q}, msssim=False,
                  progress=False)
  assert res["curves"]["mix"]["points"][-1]["psnr"] == math.inf
  assert math.isfinite(_bd(res, "mix", "jpeg")["value"])
