"""The shipped codecs' training corpus builder (compression.corpus) on
package trees the test writes: selection, shrinking, manifest, errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxlib_models.compression import corpus, data


def test_shrink_factor_rule():
  # Always at least 2 (hides JPEG blocks), more for very large wallpapers.
  assert corpus.shrink_factor(1600, 2560) == 2
  assert corpus.shrink_factor(1024, 1280) == 2
  assert corpus.shrink_factor(2600, 1000) == 3
  assert corpus.shrink_factor(2880, 5120) == 4


def _fake_trees(root, shape=(90, 130), skip=None):
  rng = np.random.default_rng(0)
  trees = {}
  for pkg, (_, _, files) in corpus.WALLPAPERS.items():
    trees[pkg] = os.path.join(root, pkg)
    for _, rel in files:
      if rel == skip:
        continue
      path = os.path.join(trees[pkg], rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
      Image.fromarray(img).save(path, quality=95)
  return trees


def test_build_from_trees_writes_shrunk_pngs_and_manifest(tmp_path):
  trees = _fake_trees(tmp_path / "pkgs")
  out = tmp_path / "corpus"
  rows = corpus.build_from_trees(str(out), trees, with_libjxl=False)
  want = sum(len(f) for _, _, f in corpus.WALLPAPERS.values())
  assert len(rows) == want == 22
  pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  assert len(pngs) == want
  manifest = json.loads((out / "MANIFEST.json").read_text())["photos"]
  assert [r["name"] for r in manifest] == [r["name"] for r in rows]
  for r in manifest:
    img = data.load_image(str(out / (r["name"] + ".png")))
    assert img.shape == (45, 65, 3)  # 90 x 130 halved
    assert r["shrink"] == 2 and r["licence"] == "GPL-2+"
  # The shrink is a Lanczos resample of the source, not a crop.
  first = corpus.WALLPAPERS["mate-backgrounds"][2][0][1]
  src = data.load_image(os.path.join(trees["mate-backgrounds"], first))
  np.testing.assert_array_equal(
      data.load_image(str(out / "mate_aqua.png")), corpus.shrink(src, 2))
  assert not set(manifest[0]) - {"name", "package", "version", "path",
                                 "licence", "shrink", "size", "sha256"}


def test_missing_file_names_package_and_path(tmp_path):
  rel = corpus.WALLPAPERS["plasma-workspace-wallpapers"][2][3][1]
  trees = _fake_trees(tmp_path / "pkgs", skip=rel)
  with pytest.raises(FileNotFoundError,
                     match="plasma-workspace-wallpapers.*FallenLeaf"):
    corpus.build_from_trees(str(tmp_path / "out"), trees, with_libjxl=False)


def test_missing_deb_without_apt_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
  with pytest.raises(FileNotFoundError, match="apt-get download"):
    corpus._find_deb("mate-backgrounds", str(tmp_path), str(tmp_path))
