"""Synthetic test images shared by the codec tests."""

import numpy as np


def smooth_noisy(h, w, seed=0):
  """(h, w, 3) uint8: smooth stripes plus Gaussian noise (sigma 8), a
  stand-in photo with structure at several scales."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = (128 + 60 * np.sin(xx / 7.0)[..., None]
          + 40 * np.cos(yy / 5.0)[..., None])
  return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def file_objective(nbytes: int, recon, img, lam: float) -> float:
  """A real file's rate-distortion cost: lambda 255^2 MSE (pixels in [0, 1])
  + bits per pixel, the loss the codecs are trained on."""
  mse = np.mean((recon.astype(np.float64) - img) ** 2) / 255.0**2
  return lam * 255.0**2 * mse + 8 * nbytes / (img.shape[0] * img.shape[1])
