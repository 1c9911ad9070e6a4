"""Rate-distortion harness: learned codecs against classical anchors.

Protocol of brief learned_image_compression.md §5. For every curve (each
learned model is a list of `LearnedPoint`s, each anchor a quality sweep) and
every point: mean real bpp (8·file bytes/(H·W), original size), mean of the
per-image PSNRs, mean MS-SSIM over the images whose smaller side exceeds 160,
mean encode/decode wall seconds; then BD-rates of every curve against JPEG and
WebP (pchip, and cubic where both curves have >= 4 points) in PSNR and in
MS-SSIM dB, with their overlap intervals. `write_report` writes rd.json, rd.md
and rd.png.

A learned codec enters as encode/decode callables, e.g. for a `codec.Codec`:
  LearnedPoint("hp-0.0067", lambda x: codec.compress(c, x)[0],
               lambda b: codec.decompress(c, b))
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import PIL
from tqdm.auto import tqdm

from jaxlib_models.compression import anchors as anchors_lib
from jaxlib_models.compression import bdrate, metrics

REFERENCES = ("jpeg", "webp")  # Curves every other curve is BD-rated against.


class LearnedPoint(NamedTuple):
  """One operating point (one trained model / lambda) of a learned codec."""

  label: str
  encode: Callable[[np.ndarray], bytes]  # (H, W, 3) uint8 -> complete file.
  decode: Callable[[bytes], np.ndarray]  # file -> (H, W, 3) uint8.
  # Optional model estimate of the rate in bits (-sum log2 P) for an image.
  estimate_bits: Callable[[np.ndarray], float] | None = None


class NonDeterministicDecode(RuntimeError):
  """Decoding the same bytes twice gave different images."""


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _measure(name: str, img: np.ndarray, data: bytes, recon: np.ndarray,
             enc_s: float, dec_s: float, msssim: bool) -> dict:
  h, w = img.shape[:2]
  if recon.shape != img.shape or recon.dtype != np.uint8:
    raise ValueError(f"{name}: decoded {recon.shape} {recon.dtype}, expected "
                     f"{img.shape} uint8 (crop padding before returning)")
  row = {"bytes": len(data), "bpp": 8.0 * len(data) / (h * w),
         "psnr": metrics.psnr(img, recon), "ms_ssim": None,
         "encode_s": enc_s, "decode_s": dec_s}
  if msssim and min(h, w) > metrics.MSSSIM_MIN_SIDE:
    row["ms_ssim"] = metrics.ms_ssim(img, recon)
  return row


def _summarise(label: str, per_image: dict, extra: dict) -> dict:
  rows = list(per_image.values())
  ms = _mean(r["ms_ssim"] for r in rows)
  point = {
      "label": label,
      "bpp": _mean(r["bpp"] for r in rows),
      "psnr": _mean(r["psnr"] for r in rows),  # mean of per-image PSNRs
      "ms_ssim": ms,
      "ms_ssim_db": None if ms is None else metrics.ms_ssim_db(ms),
      "encode_s": _mean(r["encode_s"] for r in rows),
      "decode_s": _mean(r["decode_s"] for r in rows),
      **extra,
      "per_image": per_image,
  }
  if "est_bpp" in rows[0]:
    point["est_bpp"] = _mean(r["est_bpp"] for r in rows)
    point["real_over_est"] = point["bpp"] / point["est_bpp"]
  return point


def _learned_point(p: LearnedPoint, images: Mapping[str, np.ndarray],
                   msssim: bool, warmup: bool, bar) -> dict:
  names = list(images)
  warm_bytes = None
  if warmup:  # Excludes jit compilation from the timings (brief §5).
    warm_bytes = bytes(p.encode(images[names[0]]))
    p.decode(warm_bytes)
  per_image = {}
  encode_same = None
  for name in names:
    img = images[name]
    t0 = time.perf_counter()
    data = bytes(p.encode(img))
    t1 = time.perf_counter()
    recon = np.asarray(p.decode(data))
    t2 = time.perf_counter()
    if not np.array_equal(recon, np.asarray(p.decode(data))):
      raise NonDeterministicDecode(
          f"{p.label}/{name}: decoding the same {len(data)} bytes twice gave "
          "different images (brief §2.4: same functions, shapes, backend)")
    if warm_bytes is not None and name == names[0]:
      encode_same = warm_bytes == data
    row = _measure(f"{p.label}/{name}", img, data, recon, t1 - t0, t2 - t1,
                   msssim)
    if p.estimate_bits is not None:
      row["est_bpp"] = float(p.estimate_bits(img)) / (img.shape[0] *
                                                      img.shape[1])
    per_image[name] = row
    bar.update()
  return _summarise(p.label, per_image, {"decode_deterministic": True,
                                         "encode_deterministic": encode_same})


def _anchor_curve(anchor: anchors_lib.Anchor, qualities,
                  images: Mapping[str, np.ndarray], msssim: bool, bar) -> list:
  per_q: dict[int, dict] = {int(q): {} for q in qualities}
  for name, img in images.items():
    for c in anchors_lib.code(anchor, img, qualities):
      per_q[c.quality][name] = _measure(f"{anchor.name}/{name}", img, c.data,
                                        c.recon, c.encode_s, c.decode_s,
                                        msssim)
      bar.update()
  return [_summarise(f"{anchor.name}-q{q}", rows, {"quality": q})
          for q, rows in per_q.items()]


def _bd_rows(curves: dict) -> list[dict]:
  rows = []
  for ref in REFERENCES:
    if ref not in curves:
      continue
    for name, curve in curves.items():
      for metric in ("psnr", "ms_ssim_db"):
        a = [(p["bpp"], p[metric]) for p in curves[ref]["points"]]
        t = [(p["bpp"], p[metric]) for p in curve["points"]]
        if any(v is None for _, v in a + t):
          continue  # no image large enough for MS-SSIM
        # Lossless points (infinite quality) cannot enter the integral.
        a = [x for x in a if math.isfinite(x[1])]
        t = [x for x in t if math.isfinite(x[1])]
        for method, need in bdrate.METHODS.items():
          row = {"test": name, "anchor": ref, "metric": metric,
                 "method": method}
          if method == "cubic" and min(len(a), len(t)) < need:
            continue  # pchip only for short curves
          try:
            res = bdrate.bd_rate(*zip(*a), *zip(*t), method=method)
            row.update(value=res.value, lo=res.lo, hi=res.hi,
                       overlap=res.overlap)
          except ValueError as e:
            row["error"] = str(e)
          rows.append(row)
  return rows


def _environment(device: str | None) -> dict:
  env = {"python": platform.python_version(), "machine": platform.machine(),
         "processor": platform.processor() or "unknown",
         "cpu_count": os.cpu_count(), "numpy": np.__version__,
         "pillow": PIL.__version__}
  if device is None and "jax" in sys.modules:  # only if a codec loaded jax
    jax = sys.modules["jax"]
    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
  env["learned_device"] = device or "not stated"
  return env


def run_rd(images: Mapping[str, np.ndarray],
           learned: Mapping[str, Sequence[LearnedPoint]],
           anchors: Sequence[str] = ("jpeg", "webp", "avif", "jxl"),
           msssim: bool = True, *,
           anchor_qualities: Mapping[str, Sequence[int]] | None = None,
           warmup: bool = True, kodak: bool = False,
           device: str | None = None, progress: bool = True) -> dict:
  """Measures every learned curve and anchor on `images`; BD-rates them.

  Args:
    images: name -> (H, W, 3) uint8 image.
    learned: curve name -> its operating points (any order).
    anchors: classical codecs to run (`anchors.NAMES`); one that cannot run
      here is skipped with its reason recorded in result["skipped"].
    msssim: also compute MS-SSIM (images with smaller side > 160 only).
    anchor_qualities: per-anchor quality sweep overriding the default.
    warmup: encode/decode the first image once, untimed, per learned point
      (jit compilation), and compare its bytes with the timed encode.
    kodak: the images are the Kodak set (drops the "not comparable" note).
    device: where the learned codecs ran, for the timing note.
    progress: show a tqdm bar.

  Returns:
    A JSON-ready dict: images, curves (per point: bpp, psnr, ms_ssim,
    ms_ssim_db, encode_s, decode_s, per_image, ...), bd rows, skipped
    anchors, environment, notes.

  Raises:
    NonDeterministicDecode: a learned point decodes the same bytes to two
      different images.
  """
  if not images:
    raise ValueError("run_rd needs at least one image")
  images = {k: np.asarray(v) for k, v in images.items()}
  for k, v in images.items():
    if v.ndim != 3 or v.shape[-1] != 3 or v.dtype != np.uint8:
      raise ValueError(f"image {k!r}: expected (H, W, 3) uint8, got "
                       f"{v.shape} {v.dtype}")
  clash = set(learned) & set(anchors)
  if clash:
    raise ValueError(f"learned curve names {sorted(clash)} clash with anchors")
  anchor_qualities = dict(anchor_qualities or {})
  skipped, runnable = {}, []
  for name in anchors:
    try:
      a = anchors_lib.get(name)
    except anchors_lib.AnchorUnavailable as e:
      skipped[name] = str(e)
      continue
    runnable.append((a, tuple(anchor_qualities.get(name, a.qualities))))
  n_points = sum(len(v) for v in learned.values()) + sum(
      len(q) for _, q in runnable)
  curves = {}
  with tqdm(total=n_points * len(images), desc="rd", unit="img",
            disable=not progress) as bar:
    for name, points in learned.items():
      if not points:
        raise ValueError(f"learned curve {name!r} has no points")
      curves[name] = {"kind": "learned", "settings": "",
                      "points": [_learned_point(p, images, msssim, warmup,
                                                bar) for p in points]}
    for a, qualities in runnable:
      curves[a.name] = {"kind": "anchor", "settings": a.settings,
                        "points": _anchor_curve(a, qualities, images, msssim,
                                                bar)}
  ms_names = [k for k, v in images.items()
              if msssim and min(v.shape[:2]) > metrics.MSSSIM_MIN_SIDE]
  warm = ("learned points after one untimed warm-up image (jit compilation "
          "excluded)" if warmup else "no warm-up: learned timings include "
          "jit compilation")
  notes = [
      (f"MS-SSIM (pytorch-msssim 1.0 semantics) over {len(ms_names)} of "
       f"{len(images)} images (smaller side > {metrics.MSSSIM_MIN_SIDE}); "
       "MS-SSIM dB = -10 log10(1 - mean MS-SSIM)."),
      ("PSNR: mean of per-image PSNRs; bpp: 8 x file bytes (all headers) / "
       "(H x W) of the original image, mean over images."),
      ("BD-rates are against JPEG/WebP measured on these images; never "
       "compare them with BD-rates against VTM (brief §4)."),
      (f"Timings: wall seconds per image on this machine, one process; "
       f"{warm}; jxl times include cjxl/djxl start-up and PNG I/O."),
  ]
  if not kodak:
    notes[:0] = [
        "Offline photo set, not comparable to published Kodak numbers.",
        ("JPEG-sourced photos flatter every codec: their JPEG artefacts "
         "and smoothed detail are cheap to code."),
    ]
  return {
      "images": {k: list(v.shape[:2]) for k, v in images.items()},
      "msssim_images": ms_names,
      "curves": curves,
      "bd": _bd_rows(curves),
      "skipped": skipped,
      "environment": _environment(device),
      "notes": notes,
  }


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _fmt(v, nd: int = 3) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return "inf" if v == math.inf else f"{v:.{nd}f}"
  return str(v)


def _markdown(result: dict) -> str:
  out = ["# Rate-distortion report", ""]
  imgs = ", ".join(f"{k} {h}x{w}" for k, (h, w) in result["images"].items())
  out += [f"Images ({len(result['images'])}): {imgs}.", ""]
  env = result["environment"]
  out += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
          ""]
  out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]]
  for name, reason in result["skipped"].items():
    out.append(f"- Skipped anchor {name}: {reason}")
  out.append("")
  for name, curve in result["curves"].items():
    out += [f"## {name} ({curve['kind']})", ""]
    if curve["settings"]:
      out += [f"Settings: {curve['settings']}", ""]
    est = any("est_bpp" in p for p in curve["points"])
    head = ["point", "bpp", "PSNR dB", "MS-SSIM", "MS-SSIM dB"]
    head += ["est bpp", "real/est"] if est else []
    head += ["enc s", "dec s"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in curve["points"]:
      cells = [p["label"], _fmt(p["bpp"], 4), _fmt(p["psnr"], 2),
               _fmt(p["ms_ssim"], 5), _fmt(p["ms_ssim_db"], 2)]
      if est:
        cells += [_fmt(p.get("est_bpp"), 4), _fmt(p.get("real_over_est"), 4)]
      cells += [_fmt(p["encode_s"], 4), _fmt(p["decode_s"], 4)]
      out.append("| " + " | ".join(cells) + " |")
    out.append("")
  out += ["## BD-rates", "",
          "Negative = fewer bits than the anchor at equal quality.", "",
          ("| curve | vs | metric | method | BD-rate % | overlap dB | "
           "overlap frac |"), "|---|---|---|---|---|---|---|"]
  for r in result["bd"]:
    if "error" in r:
      val, interval, frac = "n/a", r["error"], "-"
    else:
      val = f"{r['value']:+.2f}"
      interval = f"[{r['lo']:.2f}, {r['hi']:.2f}]"
      frac = f"{r['overlap']:.2f}"
    out.append(f"| {r['test']} | {r['anchor']} | {r['metric']} | "
               f"{r['method']} | {val} | {interval} | {frac} |")
  return "\n".join(out) + "\n"


def _plot(result: dict, path: str) -> None:
  from matplotlib.figure import Figure  # Agg canvas, no pyplot state

  fig = Figure(figsize=(12, 5), layout="constrained")
  ax_psnr, ax_ms = fig.subplots(1, 2)
  for name, curve in result["curves"].items():
    style = "-o" if curve["kind"] == "learned" else "--s"
    pts = sorted(curve["points"], key=lambda p: p["bpp"])
    bpp = [p["bpp"] for p in pts]
    ax_psnr.plot(bpp, [p["psnr"] for p in pts], style, ms=4, label=name)
    if all(p["ms_ssim_db"] is not None for p in pts):
      ax_ms.plot(bpp, [p["ms_ssim_db"] for p in pts], style, ms=4,
                 label=name)
  n = len(result["images"])
  ax_psnr.set(xlabel="bpp (real files)", ylabel="PSNR (dB), mean per image",
              title=f"PSNR, {n} images")
  ax_ms.set(xlabel="bpp (real files)", ylabel="MS-SSIM (dB)",
            title=f"MS-SSIM, {len(result['msssim_images'])} images")
  if not result["msssim_images"]:
    ax_ms.text(0.5, 0.5, "no image with smaller side > 160", ha="center",
               transform=ax_ms.transAxes)
  for ax in (ax_psnr, ax_ms):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.savefig(path, format="png", dpi=110)


def _atomic(path: str, write: Callable[[str], None]) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_text(text: str) -> Callable[[str], None]:
  def write(p: str) -> None:
    with open(p, "w", encoding="utf-8") as f:
      f.write(text)

  return write


def write_report(result: dict, out_dir: str) -> dict[str, str]:
  """Writes rd.json, rd.md and rd.png into `out_dir`, each atomically.

  Returns:
    {"json": path, "md": path, "png": path}.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"rd.{ext}")
           for ext in ("json", "md", "png")}
  text = json.dumps(_json_safe(result), indent=1, allow_nan=False)
  _atomic(paths["json"], _write_text(text + "\n"))
  _atomic(paths["md"], _write_text(_markdown(result)))
  _atomic(paths["png"], lambda p: _plot(result, p))
  return paths
