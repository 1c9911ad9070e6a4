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
