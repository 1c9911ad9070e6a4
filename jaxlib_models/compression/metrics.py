"""Image-quality metrics of the RD harness: PSNR and MS-SSIM on uint8 RGB.

Protocol of brief learned_image_compression.md §5: both images are the
rounded 8-bit RGB pictures (the reconstruction already clamped and rounded);
PSNR is per image over all RGB values and averaged over images; MS-SSIM
follows pytorch-msssim 1.0 (the implementation CompressAI reports with;
Wang, Simoncelli, Bovik, "Multiscale structural similarity for image quality
assessment", Asilomar 2003). Plain NumPy in float64; not jitted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# pytorch-msssim 1.0 defaults (ms_ssim(..., data_range=255)).
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
_DATA_RANGE = 255.0
# Four 2x poolings must leave a side of at least one window.
MSSSIM_MIN_SIDE = (_WIN_SIZE - 1) * 2 ** (len(MSSSIM_WEIGHTS) - 1)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ValueError(f"expected RGB images (H, W, 3), got {a.shape}")
  if a.dtype != np.uint8 or b.dtype != np.uint8:
    raise ValueError(f"expected uint8 images (rounded 8-bit pixels), got "
                     f"{a.dtype} and {b.dtype}")
  return a, b


def psnr(a, b) -> float:
  """PSNR in dB of two (H, W, 3) uint8 images, 10·log10(255² / MSE).

  The MSE runs over every RGB value. Identical images give +inf (returned
  explicitly, no division by zero).
  """
  a, b = _pair(a, b)
  mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
  if mse == 0.0:
    return math.inf
  return 10.0 * math.log10(_DATA_RANGE**2 / mse)


def mean_psnr(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
  """Mean of the per-image PSNRs (not the PSNR of the mean MSE).

  This is the Kodak reporting rule of CompressAI (brief §5). Any identical
  pair makes the mean +inf.
  """
  values = [psnr(a, b) for a, b in pairs]
  if not values:
    raise ValueError("mean_psnr needs at least one image pair")
  return float(np.mean(values))


# The float32 window pytorch-msssim 1.0 builds (_fspecial_gauss_1d(11, 1.5):
# exp(-c²/4.5) normalised in float32 on torch 2.13 CPU), pinned value by
# value. Its float64 sum is 1 - 3.07e-8, and var = E[x²] - mu² on 0..255
# pixels amplifies that: a float64-exact window moves MS-SSIM by ~1.2e-6 and a
# NumPy float32 rebuild (exp and sum round differently) by ~1e-6, both beyond
# the 1e-6 agreement the harness promises.
_TORCH_WINDOW = ("0.0010283804", "0.007598758", "0.036000773", "0.10936069",
                 "0.21300553", "0.26601171", "0.21300553", "0.10936069",
                 "0.036000773", "0.007598758", "0.0010283804")


def _gauss_window() -> np.ndarray:
  g = np.array([np.float32(v) for v in _TORCH_WINDOW]).astype(np.float64)
  coords = np.arange(_WIN_SIZE, dtype=np.float64) - _WIN_SIZE // 2
  exact = np.exp(-(coords**2) / (2.0 * _WIN_SIGMA**2))
  # Guards the pinned values against typos: within float32 rounding of the
  # exact normalised Gaussian.
  assert np.allclose(g, exact / exact.sum(), rtol=3e-7, atol=0), g
  return g


_WINDOW = _gauss_window()


def _filter_valid(x_HWC: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' correlation with g along H, then W."""
  win = np.lib.stride_tricks.sliding_window_view
  x = win(x_HWC, g.size, axis=0) @ g  # (H-10, W, C)
  return win(x, g.size, axis=1) @ g  # (H-10, W-10, C)


def _ssim_terms(x_HWC, y_HWC, g) -> tuple[np.ndarray, np.ndarray]:
  """(ssim, cs) per channel, each the mean of its map."""
  c1 = (_K1 * _DATA_RANGE) ** 2
  c2 = (_K2 * _DATA_RANGE) ** 2
  mu_x, mu_y = _filter_valid(x_HWC, g), _filter_valid(y_HWC, g)
  var_x = _filter_valid(x_HWC * x_HWC, g) - mu_x * mu_x
  var_y = _filter_valid(y_HWC * y_HWC, g) - mu_y * mu_y
  cov = _filter_valid(x_HWC * y_HWC, g) - mu_x * mu_y
  cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
  lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  return (lum_map * cs_map).mean(axis=(0, 1)), cs_map.mean(axis=(0, 1))


def _avg_pool2(x_HWC: np.ndarray) -> np.ndarray:
  """2x2 average pooling, stride 2, zero padding (side mod 2) on both ends
  counted in the mean (torch avg_pool2d, count_include_pad=True)."""
  h, w = x_HWC.shape[:2]
  ph, pw = h % 2, w % 2
  x = np.pad(x_HWC, ((ph, ph), (pw, pw), (0, 0)))
  ho, wo = (h + 2 * ph - 2) // 2 + 1, (w + 2 * pw - 2) // 2 + 1
  x = x[: 2 * ho, : 2 * wo]
  return x.reshape(ho, 2, wo, 2, -1).mean(axis=(1, 3))


def ms_ssim(a, b) -> float:
  """MS-SSIM of two (H, W, 3) uint8 images, pytorch-msssim 1.0 semantics.

  data_range 255, Gaussian window 11 with sigma 1.5, valid filtering,
  K = (0.01, 0.03), five scales with weights `MSSSIM_WEIGHTS`, 2x average
  pooling with padding (side mod 2) between scales, ReLU on the contrast-
  structure terms and on the last scale's SSIM, product over scales per
  channel, then the mean over the three channels.

  Raises:
    ValueError: if the smaller side is not larger than 160 (the four
      poolings would leave less than one window).
  """
  a, b = _pair(a, b)
  if min(a.shape[:2]) <= MSSSIM_MIN_SIDE:
    raise ValueError(
        f"MS-SSIM needs the smaller image side > {MSSSIM_MIN_SIDE} "
        f"(window {_WIN_SIZE}, 4 downsamplings); got {a.shape[:2]}. "
        "Report PSNR only for such images (brief §7.8).")
  g = _WINDOW
  x, y = a.astype(np.float64), b.astype(np.float64)
  levels = len(MSSSIM_WEIGHTS)
  factors_LC = []
  for i in range(levels):
    ssim_c, cs_c = _ssim_terms(x, y, g)
    if i < levels - 1:
      factors_LC.append(np.maximum(cs_c, 0.0))
      x, y = _avg_pool2(x), _avg_pool2(y)
  factors_LC.append(np.maximum(ssim_c, 0.0))
  w_L1 = np.asarray(MSSSIM_WEIGHTS, np.float64)[:, None]
  per_channel = np.prod(np.stack(factors_LC) ** w_L1, axis=0)
  return float(per_channel.mean())


def ms_ssim_db(v: float) -> float:
  """MS-SSIM in dB, -10·log10(1 - v); v = 1 gives +inf."""
  v = float(v)
  if not 0.0 <= v <= 1.0 + 1e-12:  # rounding can overshoot 1 by an ulp
    raise ValueError(f"MS-SSIM value {v} outside [0, 1]")
  if v >= 1.0:
    return math.inf
  return -10.0 * math.log10(1.0 - v)
