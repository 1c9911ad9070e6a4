"""Offline photographs for training and evaluating codecs.

`builtin_photos()` finds the real photos shipped by installed packages:
scikit-learn (china.jpg, flower.jpg), matplotlib (grace_hopper.jpg) and, if
installed, scikit-image (astronaut, coffee, chelsea, motorcycle_left, rocket).
These are JPEG-sourced or few: training on them is a smoke test (brief
learned_image_compression.md §6). `load_folder()` reads any folder of PNGs
(e.g. a user's Kodak set).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

_SKIMAGE = ("astronaut.png", "coffee.png", "chelsea.png",
            "motorcycle_left.png", "rocket.jpg")


def load_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB; grey and RGBA are converted (alpha dropped)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image not found: {path}")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except OSError as e:
    raise ValueError(f"{path}: not a readable image ({e})") from e


def builtin_photos() -> dict[str, str]:
  """name -> path of the photographs found in installed packages."""
  out = {}
  import matplotlib  # noqa: PLC0415
  import sklearn  # noqa: PLC0415

  sk = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
  for f in ("china.jpg", "flower.jpg"):
    if os.path.exists(os.path.join(sk, f)):
      out[os.path.splitext(f)[0]] = os.path.join(sk, f)
  mpl = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                     "sample_data", "grace_hopper.jpg")
  if os.path.exists(mpl):
    out["grace_hopper"] = mpl
  try:
    import skimage  # noqa: PLC0415

    d = os.path.join(os.path.dirname(skimage.__file__), "data")
    for f in _SKIMAGE:
      if os.path.exists(os.path.join(d, f)):
        out[os.path.splitext(f)[0]] = os.path.join(d, f)
  except ImportError:
    pass
  return out


def load_folder(folder: str) -> dict[str, np.ndarray]:
  """Every .png in `folder` (sorted), as name -> image."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder}")
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
  if not names:
    raise ValueError(f"no .png files in {folder}")
  return {os.path.splitext(f)[0]: load_image(os.path.join(folder, f))
          for f in names}


def split(photos: dict, eval_names) -> tuple[dict, dict]:
  """(train, eval) with the named photos held out; unknown names fail."""
  missing = set(eval_names) - set(photos)
  if missing:
    raise ValueError(f"held-out photos {sorted(missing)} not available; "
                     f"have {sorted(photos)}")
  ev = {k: photos[k] for k in eval_names}
  tr = {k: v for k, v in photos.items() if k not in ev}
  if not tr:
    raise ValueError("no training photos left after holding out "
                     f"{sorted(eval_names)}")
  return tr, ev


def crops(images: list, batch: int, size: int, seed: int, step: int):
  """A deterministic batch of random (size x size) crops in [0, 1]."""
  rng = np.random.default_rng((seed, step))
  out = np.empty((batch, size, size, 3), np.float32)
  for b in range(batch):
    img = images[rng.integers(len(images))]
    h, w = img.shape[:2]
    if h < size or w < size:
      raise ValueError(f"photo {img.shape[:2]} smaller than the crop {size}")
    i, j = rng.integers(h - size + 1), rng.integers(w - size + 1)
    out[b] = img[i:i + size, j:j + size] / 255.0
  return out
