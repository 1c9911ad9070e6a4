"""Codec training entry points on the tiny config (smoke: wiring, resume,
real held-out bitstreams) and the photo loaders' errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxlib_models.compression import data
from jaxlib_models.core import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
TINY = os.path.join(ROOT, "configs", "compression", "hyperprior.py") + ":tiny"

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_builtin_photos_exist():
  photos = data.builtin_photos()
  assert {"china", "flower", "grace_hopper"} <= set(photos)
  img = data.load_image(photos["china"])
  assert img.dtype == np.uint8 and img.shape[-1] == 3


def test_train_resume_eval_on_a_png_folder(tmp_path, capsys):
  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    arr = rng.integers(0, 255, (100, 90, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / f"p{i}.png")
  Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8)).save(
      folder / "grey.png")  # Grey: converted to RGB.
  wd = str(tmp_path / "run")
  base = [f"--config={TINY}", f"--workdir={wd}",
          f"--config.data.folder={folder}", "--config.data.eval_names=('p2',)"]
  assert cli.run("python -m train", "", "train_main", base) == 0
  assert cli.run("python -m train", "", "train_main",
                 base + ["--config.train.num_steps=6"]) == 0
  assert "resumed from step 4" in capsys.readouterr().out
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["step"] == 6 and set(res["images"]) == {"p2"}
  assert res["mean"]["bpp"] > 0


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="image folder not found"):
    data.load_folder(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .png files"):
    data.load_folder(str(tmp_path / "empty"))
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="not a readable image"):
    data.load_image(str(bad))
  with pytest.raises(ValueError, match="not available"):
    data.split({"a": 1, "b": 2}, ("c",))
  with pytest.raises(ValueError, match="no training photos"):
    data.split({"a": 1}, ("a",))
  with pytest.raises(ValueError, match="smaller than the crop"):
    data.crops([np.zeros((10, 10, 3), np.uint8)], 1, 64, 0, 0)


@pytest.mark.parametrize("variant", ["tiny", "serial_tiny"])
def test_context_model_configs_train_and_code(tmp_path, variant):
  """The Fu preset (checkerboard, GMM anchors, L1, channel skipping) and the
  serial baseline train through the CLI and write real held-out bitstreams."""
  cfg = os.path.join(ROOT, "configs", "compression",
                     "checkerboard.py") + ":" + variant
  wd = str(tmp_path / "run")
  assert cli.run("python -m train", "", "train_main",
                 [f"--config={cfg}", f"--workdir={wd}",
                  "--config.train.num_steps=2"]) == 0
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["step"] == 2 and res["mean"]["bpp"] > 0


def test_corpus_source_holds_out_the_twelve_photos(monkeypatch, tmp_path):
  """source="corpus": training photos from libjxl-testdata (or a folder),
  evaluation on the 12 package photos; a missing corpus names the fix."""
  from jaxlib_models.compression import entry  # noqa: PLC0415
  from jaxlib_models.core import config as config_lib  # noqa: PLC0415

  config = config_lib.load_config(TINY[:-len(":tiny")])
  folder = tmp_path / "train"
  folder.mkdir()
  Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(folder / "t.png")
  config.data.train_folder = str(folder)
  tr, ev = entry._photos(config.data)
  assert set(tr) == {"t"} and len(ev) == 12
  config.data.train_folder = ""
  monkeypatch.setenv("JAXLIB_MODELS_LIBJXL_TESTDATA", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="libjxl-testdata"):
    entry._photos(config.data)
