"""Bjøntegaard delta rate (BD-rate) and the published Kodak RD curves.

Method (brief learned_image_compression.md §5): map each curve to
(PSNR, ln R) with its points sorted by PSNR; take the overlapping PSNR
interval [lo, hi]; integrate each curve's ln R over it, either with a
piecewise-cubic Hermite interpolant (`pchip`, scipy PchipInterpolator) or with
the least-squares cubic polynomial of G. Bjøntegaard, "Calculation of average
PSNR differences between RD-curves", VCEG-M33 (2001) (`cubic`);
BD = exp((A_test - A_anchor) / (hi - lo)) - 1, in percent. Negative means the
test curve needs fewer bits for the same quality. The same function serves any
quality axis (e.g. MS-SSIM dB) in place of PSNR.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.polynomial import Polynomial
from scipy.interpolate import PchipInterpolator

METHODS = {"pchip": 2, "cubic": 4}  # method -> fewest points per curve


@dataclasses.dataclass(frozen=True)
class BDResult:
  """One BD-rate with the interval it was integrated over."""

  value: float  # BD-rate in percent; negative = test saves rate.
  lo: float  # Lower end of the overlapping quality interval (dB).
  hi: float  # Upper end of the overlapping quality interval (dB).
  overlap: float  # (hi - lo) / span of both curves together, in (0, 1].
  method: str  # "pchip" or "cubic".

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _curve(name: str, rates, quality, method: str):
  r = np.asarray(rates, np.float64)
  q = np.asarray(quality, np.float64)
  if r.ndim != 1 or q.ndim != 1 or r.shape != q.shape:
    raise ValueError(f"{name}: rates and quality must be 1-D of equal length,"
                     f" got shapes {r.shape} and {q.shape}")
  need = METHODS[method]
  if r.size < need:
    raise ValueError(f"{name}: {method} BD-rate needs at least {need} RD "
                     f"points per curve, got {r.size}")
  if not (np.all(np.isfinite(r)) and np.all(np.isfinite(q))):
    raise ValueError(f"{name}: rates and quality must be finite (an "
                     f"infinite PSNR means a lossless point; drop it): "
                     f"rates {r.tolist()}, quality {q.tolist()}")
  if np.any(r <= 0):
    raise ValueError(f"{name}: rates must be positive, got {r.tolist()}")
  order = np.argsort(q, kind="stable")
  q, ln_r = q[order], np.log(r[order])
  if np.any(np.diff(q) <= 0):
    raise ValueError(f"{name}: quality values must be distinct (ln R is "
                     f"interpolated as a function of quality), got "
                     f"{q.tolist()}")
  return q, ln_r


def _integral(q, ln_r, lo: float, hi: float, method: str) -> float:
  if method == "pchip":
    return float(PchipInterpolator(q, ln_r).integrate(lo, hi))
  # Polynomial.fit solves the same least-squares problem as VCEG-M33's
  # polyfit, on a domain scaled to [-1, 1] (better conditioned).
  antiderivative = Polynomial.fit(q, ln_r, 3).integ()
  return float(antiderivative(hi) - antiderivative(lo))


def bd_rate(rates_anchor, psnr_anchor, rates_test, psnr_test,
            method: str = "pchip") -> BDResult:
  """BD-rate of a test curve against an anchor curve, in percent.

  Args:
    rates_anchor: anchor rates (bpp or any positive rate unit).
    psnr_anchor: anchor quality in dB, one per rate (PSNR, MS-SSIM dB, ...).
    rates_test: test rates, in the same unit as the anchor.
    psnr_test: test quality in dB.
    method: "pchip" (at least 2 points per curve) or "cubic" (least-squares
      cubic of VCEG-M33, at least 4 points per curve).

  Returns:
    BDResult with the value in percent and the overlap interval [lo, hi].

  Raises:
    ValueError: unknown method, too few points, non-positive or non-finite
      rates, repeated quality values, or curves whose quality ranges do not
      overlap.
  """
  if method not in METHODS:
    raise ValueError(f"unknown BD method {method!r}; use one of "
                     f"{sorted(METHODS)}")
  qa, la = _curve("anchor", rates_anchor, psnr_anchor, method)
  qt, lt = _curve("test", rates_test, psnr_test, method)
  lo, hi = max(qa[0], qt[0]), min(qa[-1], qt[-1])
  if hi <= lo:
    raise ValueError(
        f"curves do not overlap in quality: anchor spans [{qa[0]:.3f}, "
        f"{qa[-1]:.3f}] dB, test spans [{qt[0]:.3f}, {qt[-1]:.3f}] dB")
  span = max(qa[-1], qt[-1]) - min(qa[0], qt[0])
  diff = (_integral(qt, lt, lo, hi, method) -
          _integral(qa, la, lo, hi, method)) / (hi - lo)
  return BDResult(value=float(np.expm1(diff) * 100.0), lo=float(lo),
                  hi=float(hi), overlap=float((hi - lo) / span),
                  method=method)


# Published Kodak RD points (24 images, 768x512): (bpp, RGB PSNR dB), each the
# mean over images, as listed in brief learned_image_compression.md §4.
KODAK_CURVES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # CompressAI results/image/kodak/vtm.json (VTM intra 4:4:4; the file does
    # not state the VTM version). The anchor of every BD number in the brief.
    "vtm": ((0.048, 0.112, 0.246, 0.491, 0.875, 1.431, 2.325, 3.633),
            (26.14, 28.49, 31.20, 34.26, 37.42, 40.42, 43.51, 46.59)),
    # CompressAI results/image/kodak/compressai-bmshj2018-hyperprior_mse.json
    "bmshj2018-hyperprior": (
        (0.131, 0.209, 0.320, 0.478, 0.669, 0.939, 1.259, 1.660),
        (27.58, 29.20, 30.97, 32.84, 34.53, 36.74, 38.58, 40.56)),
    # CompressAI results/image/kodak/compressai-mbt2018-mean_mse.json
    "mbt2018-mean": ((0.124, 0.198, 0.307, 0.461, 0.662, 0.914, 1.234, 1.619),
                     (27.70, 29.36, 31.13, 32.95, 34.97, 36.91, 38.84, 40.63)),
    # CompressAI results/image/kodak/compressai-mbt2018_mse.json (serial AR)
    "mbt2018": ((0.111, 0.187, 0.288, 0.432, 0.639, 0.885, 1.200, 1.587),
                (28.09, 29.65, 31.36, 33.09, 35.09, 36.99, 38.93, 40.64)),
    # CompressAI results/image/kodak/compressai-cheng2020-anchor_mse.json
    "cheng2020-anchor": ((0.120, 0.184, 0.271, 0.417, 0.594, 0.806),
                         (28.58, 29.97, 31.34, 33.39, 35.12, 36.70)),
    # CompressAI results/image/kodak/compressai-cheng2020-attn_mse.json
    "cheng2020-attn": ((0.116, 0.174, 0.269, 0.427, 0.595, 0.806),
                       (28.43, 29.77, 31.32, 33.36, 34.95, 36.62)),
    # CompressAI results/image/kodak/paper-elic2022_mse.json (paper points)
    "elic": ((0.124, 0.196, 0.334, 0.491, 0.704, 0.857),
             (29.11, 30.70, 32.78, 34.58, 36.49, 37.62)),
    # Minnen & Singh 2020 ChARM, paper points (brief §4; file not named)
    "minnen2020-charm": ((0.113, 0.190, 0.300, 0.461, 0.669, 0.899),
                         (28.62, 30.26, 31.96, 33.83, 35.76, 37.41)),
    # He et al. 2021 checkerboard on cheng2020, paper points (brief §4)
    "he2021-ckbd": ((0.098, 0.164, 0.298, 0.439, 0.650, 0.794),
                    (27.83, 29.52, 31.77, 33.65, 35.64, 36.73)),
    # LIC-TCM Large: jmliu206/LIC_TCM RD_data.md
    "tcm-large": ((0.155, 0.194, 0.300, 0.443, 0.625, 0.880),
                  (30.07, 30.85, 32.59, 34.33, 36.15, 38.07)),
    # MLIC++: JiangWeibeta/MLIC results/kodak/mlicplusplus_mse.json
    "mlic++": ((0.108, 0.175, 0.272, 0.413, 0.592, 0.802),
               (29.16, 30.71, 32.33, 34.17, 35.82, 37.32)),
    # S2LIC: marker centroids read off wyq2021/S2LIC assets/kodak_psnr.png
    # (±0.005 bpp, ±0.03 dB; figure reading, not published numbers).
    "s2lic-figure": ((0.1113, 0.1875, 0.3168, 0.3769, 0.6161, 0.8298),
                     (29.16, 30.74, 32.67, 33.45, 35.85, 37.52)),
}
VTM = KODAK_CURVES["vtm"]


def bd_vs_vtm(name: str, method: str = "pchip") -> BDResult:
  """BD-rate of a published Kodak curve against the `vtm.json` points."""
  if name not in KODAK_CURVES:
    raise KeyError(f"unknown curve {name!r}; have {sorted(KODAK_CURVES)}")
  return bd_rate(*VTM, *KODAK_CURVES[name], method=method)
