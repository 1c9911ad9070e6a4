"""Offline photographs for training and evaluating codecs.

Two disjoint sets, so that no evaluation photo is ever trained on:

- `eval_photos()`: the held-out "pseudo-Kodak" set of 12 real photographs
  shipped by PyPI packages (scikit-image, scikit-learn, matplotlib; brief
  learned_image_compression.md §6), centre-cropped to multiples of 64 (hubble
  and retina to 768x512). Six come from JPEG files (rocket, hubble, retina,
  china, flower, grace_hopper), whose block artefacts flatter every codec; results on this set are not comparable to
  published Kodak numbers.
- `training_photos()`: the CC0 photographs of Debian's `libjxl-testdata`
  (`apt-get install libjxl-testdata`): flower.png (2268x1512), hdr_room.png
  and three 500x500 wesaturate photos; or any folder of PNGs. Five photos are
  a small corpus (models trained on them overfit); `compression.corpus`
  builds the 27-photo folder the shipped models were trained on.

`builtin_photos()` (paths of every package photo) and `load_folder()` (any
folder of PNGs, e.g. a user's Kodak) are kept for the tiny configs and users.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image



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
  """name -> path of the evaluation-set photos found in installed packages
  (those of a missing package are left out)."""
  out = {}
  for name, pkg, f in EVAL_SET:
    try:
      path = os.path.join(_package_dir(pkg), f)
    except ImportError:
      continue
    if os.path.exists(path):
      out[name] = path
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


# name -> (package, file): the held-out evaluation set (12 photos).
EVAL_SET = (
    ("astronaut", "skimage", "astronaut.png"),
    ("coffee", "skimage", "coffee.png"),
    ("chelsea", "skimage", "chelsea.png"),
    ("motorcycle_left", "skimage", "motorcycle_left.png"),
    ("motorcycle_right", "skimage", "motorcycle_right.png"),
    ("rocket", "skimage", "rocket.jpg"),
    ("hubble", "skimage", "hubble_deep_field.jpg"),
    ("retina", "skimage", "retina.jpg"),
    ("ihc", "skimage", "ihc.png"),
    ("china", "sklearn", "china.jpg"),
    ("flower", "sklearn", "flower.jpg"),
    ("grace_hopper", "matplotlib", "grace_hopper.jpg"),
)
_MAX_EVAL = (512, 768)  # hubble and retina are centre-cropped to this.

LIBJXL_TESTDATA = "/usr/share/libjxl-testdata"
TRAIN_SET = (
    "jxl/flower/flower.png",
    "jxl/hdr_room.png",
    "external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png",
    "external/wesaturate/500px/tmshre_riaphotographs_srgb8.png",
    "external/wesaturate/500px/u76c0g_bliznaca_srgb8.png",
)


def _package_dir(pkg: str) -> str:
  if pkg == "skimage":
    import skimage  # noqa: PLC0415

    return os.path.join(os.path.dirname(skimage.__file__), "data")
  if pkg == "sklearn":
    import sklearn  # noqa: PLC0415

    return os.path.join(os.path.dirname(sklearn.__file__), "datasets",
                        "images")
  import matplotlib  # noqa: PLC0415

  return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                      "sample_data")


def centre_crop(img: np.ndarray, multiple: int = 64,
                max_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Largest centred crop with sides a multiple of `multiple` (and at most
  max_hw)."""
  h, w = img.shape[:2]
  ch, cw = h - h % multiple, w - w % multiple
  if max_hw is not None:
    ch, cw = min(ch, max_hw[0]), min(cw, max_hw[1])
  if ch < multiple or cw < multiple:
    raise ValueError(f"image {h}x{w} is smaller than {multiple}x{multiple}")
  i, j = (h - ch) // 2, (w - cw) // 2
  return img[i:i + ch, j:j + cw]


def eval_photos(names=None) -> dict[str, np.ndarray]:
  """The held-out evaluation photos (name -> uint8 image), EVAL_SET order."""
  out = {}
  known = [n for n, _, _ in EVAL_SET]
  for name in names or known:
    if name not in known:
      raise ValueError(f"unknown evaluation photo {name!r}; have {known}")
    _, pkg, f = EVAL_SET[known.index(name)]
    try:
      path = os.path.join(_package_dir(pkg), f)
    except ImportError as e:
      raise ImportError(f"evaluation photo {name!r} ships with {pkg}, which "
                        f"is not installed: pip install {pkg.replace('skimage', 'scikit-image').replace('sklearn', 'scikit-learn')}") from e
    img = load_image(path)
    out[name] = centre_crop(img, 64, _MAX_EVAL if max(img.shape[:2]) > 800
                            else None)
  return out


def training_photos(folder: str | None = None) -> dict[str, np.ndarray]:
  """The training corpus: `folder`'s PNGs, else libjxl-testdata's photos.

  Never overlaps `eval_photos()` (different sources; checked by name)."""
  if folder:
    photos = load_folder(folder)
  else:
    root = os.environ.get("JAXLIB_MODELS_LIBJXL_TESTDATA", LIBJXL_TESTDATA)
    missing = [f for f in TRAIN_SET if not os.path.exists(os.path.join(root, f))]
    if missing:
      raise FileNotFoundError(
          f"training photos not found under {root} (missing {missing[0]}):"
          " install them with `sudo apt-get install libjxl-testdata`, or set"
          " JAXLIB_MODELS_LIBJXL_TESTDATA to an unpacked copy, or pass a"
          " folder of PNGs (--config.data.train_folder=...)")
    photos = {"jxl_" + os.path.splitext(os.path.basename(f))[0].replace(
        "_srgb8", ""): load_image(os.path.join(root, f)) for f in TRAIN_SET}
  clash = set(photos) & {n for n, _, _ in EVAL_SET}
  if clash:
    raise ValueError(f"training photos {sorted(clash)} have the names of"
                     " held-out evaluation photos; rename or remove them")
  return photos
