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
