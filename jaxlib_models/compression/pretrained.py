"""The small trained codecs shipped with the library (`pretrained/*.npz`).

  from jaxlib_models.compression import pretrained
  pretrained.names()            # ['hyperprior-q1', ..., 'checkerboard-q1', ...]
  codec = pretrained.load("hyperprior-q2")

Each model is a mean-scale hyperprior (N = 64, M = 96) trained by
`compression.ship`: 45 s on an H200 on the five libjxl-testdata photos, then
on a CPU on the 27 photos of `compression.corpus` (never on the evaluation
photos); q1..qK sort the models by lambda (rate). The JSON beside each file
says how each phase was trained (device, steps, seconds, corpus). They are
small and briefly trained: close to JPEG at low rates, not competitive
learned codecs (benchmarks/RESULTS.md).
Weights are stored as float16 and used as float32 (the model id hashes the
values actually used, so every machine agrees on it).

checkerboard-q1..qK are Fu et al.'s checkerboard context (two parameter
networks, Gaussian for both sets) trained on top of hyperprior-qK with its
transforms frozen (`ship --context checkerboard`): same reconstruction
quality, fewer bits. Their files hold the head only; the JSON names the
base file and its sha256, and `load` merges the two (a missing or changed
base is refused with the file named).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import codec as codec_lib
from jaxlib_models.compression import hyperprior, ship
from jaxlib_models.core import io

DIR = os.path.join(os.path.dirname(__file__), "pretrained")


FAMILIES = ("hyperprior", "checkerboard")


def _files(folder: str = DIR,
           family: str = "hyperprior") -> list[tuple[float, str]]:
  out = []
  pre = f"{family}_lam"
  for f in glob.glob(os.path.join(folder, pre + "*.npz")):
    lam = float(os.path.basename(f)[len(pre):-len(".npz")])
    out.append((lam, f[:-len(".npz")]))
  return sorted(out)


def names(folder: str = DIR) -> list[str]:
  """hyperprior-q1..qK, then checkerboard-q1..qK (heads on the
  hyperpriors), each family sorted by lambda."""
  return [f"{fam}-q{i + 1}" for fam in FAMILIES
          for i in range(len(_files(folder, fam)))]


def default_name(folder: str = DIR) -> str | None:
  """The CLI's default model: the middle hyperprior."""
  hp = [n for n in names(folder) if n.startswith("hyperprior-")]
  return hp[len(hp) // 2] if hp else None


def info(name: str, folder: str = DIR) -> dict:
  """The training record (JSON) of a shipped model."""
  return io.read_json(_stem(name, folder) + ".json")


def lam(name: str, folder: str = DIR) -> float:
  """The training lambda of a model: its record's, else its file name's
  (hyperprior_lam<lambda>.npz)."""
  rec = info(name, folder)  # Also checks the name.
  if "lambda" in rec:
    return float(rec["lambda"])
  fam, i = _split(name)
  return _files(folder, fam)[i][0]


def stem_of(name: str, folder: str = DIR) -> str:
  """The file stem of a shipped model, e.g. "hyperprior_lam0.0035"."""
  return os.path.basename(_stem(name, folder))


def _split(name: str) -> tuple[str, int]:
  fam, _, q = name.rpartition("-q")
  return fam, int(q) - 1 if q.isdigit() else -1


def _stem(name: str, folder: str) -> str:
  known = names(folder)
  if name not in known:
    raise ValueError(f"unknown model {name!r}; shipped models: {known}"
                     + ("" if known else f" (none found in {folder})"))
  fam, i = _split(name)
  return _files(folder, fam)[i][1]


def config_of(rec: dict) -> hyperprior.HyperpriorConfig:
  """The model config of a record: every stored field (context model,
  families, N_dec, synthesis_bypass, ...), not only N, M and kind."""
  c = dict(rec["config"])
  known = {f.name for f in dataclasses.fields(hyperprior.HyperpriorConfig)}
  unknown = sorted(set(c) - known)
  if unknown:
    raise ValueError(f"model config fields {unknown} are unknown to this"
                     " jaxlib_models (written by a newer version? upgrade)")
  return hyperprior.HyperpriorConfig(**c)


@functools.lru_cache(maxsize=8)
def load(name: str, folder: str = DIR) -> codec_lib.Codec:
  """A ready Codec (coding tables built) for a shipped model."""
  stem = _stem(name, folder)
  rec = io.read_json(stem + ".json")
  cfg = config_of(rec)
  like = jax.eval_shape(lambda: hyperprior.Hyperprior(cfg).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
  arrays = _base_arrays(stem, rec, folder) if rec.get("base") else {}
  with np.load(stem + ".npz") as z:
    arrays.update(z)
  params = ship.unflatten_params(arrays, like)
  return codec_lib.Codec.from_params(cfg, params)


def _base_arrays(stem: str, rec: dict, folder: str) -> dict:
  """The frozen base model's stored arrays of a head-only model (a
  checkerboard head trained on a hyperprior by `ship --context`)."""
  path = os.path.join(folder, rec["base"] + ".npz")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{stem}.npz is a head trained on {rec['base']}.npz, which is not in"
        f" {folder}: put the base model beside it")
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if rec.get("base_sha256") and digest != rec["base_sha256"]:
    raise ValueError(
        f"{stem}.npz was trained on a different {rec['base']}.npz (sha256"
        f" {rec['base_sha256'][:12]}..., found {digest[:12]}...): retrain the"
        " head (python -m jaxlib_models.compression.ship --context"
        " checkerboard --base FOLDER) or restore the base file")
  with np.load(path) as z:
    return dict(z)


def find_by_id(model_id: bytes, folder: str = DIR) -> str | None:
  """The shipped model whose id is `model_id` (None if none is)."""
  for n in names(folder):
    if load(n, folder).model_id == model_id:
      return n
  return None
