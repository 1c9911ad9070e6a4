"""The small trained codecs shipped with the library (`pretrained/*.npz`).

  from jaxlib_models.compression import pretrained
  pretrained.names()            # ['hyperprior-q1', 'hyperprior-q2', ...]
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
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import codec as codec_lib
from jaxlib_models.compression import hyperprior, ship
from jaxlib_models.core import io

DIR = os.path.join(os.path.dirname(__file__), "pretrained")


def _files(folder: str = DIR) -> list[tuple[float, str]]:
  out = []
  for f in glob.glob(os.path.join(folder, "hyperprior_lam*.npz")):
    lam = float(os.path.basename(f)[len("hyperprior_lam"):-len(".npz")])
    out.append((lam, f[:-len(".npz")]))
  return sorted(out)


def names(folder: str = DIR) -> list[str]:
  return [f"hyperprior-q{i + 1}" for i in range(len(_files(folder)))]


def info(name: str, folder: str = DIR) -> dict:
  """The training record (JSON) of a shipped model."""
  return io.read_json(_stem(name, folder) + ".json")


def lam(name: str, folder: str = DIR) -> float:
  """The training lambda of a model: its record's, else its file name's
  (hyperprior_lam<lambda>.npz)."""
  rec = info(name, folder)  # Also checks the name.
  if "lambda" in rec:
    return float(rec["lambda"])
  return _files(folder)[names(folder).index(name)][0]


def _stem(name: str, folder: str) -> str:
  files = _files(folder)
  known = names(folder)
  if name not in known:
    raise ValueError(f"unknown model {name!r}; shipped models: {known}"
                     + ("" if known else f" (none found in {folder})"))
  return files[known.index(name)][1]


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
  cfg = config_of(io.read_json(stem + ".json"))
  like = jax.eval_shape(lambda: hyperprior.Hyperprior(cfg).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
  with np.load(stem + ".npz") as z:
    params = ship.unflatten_params(dict(z), like)
  return codec_lib.Codec.from_params(cfg, params)


def find_by_id(model_id: bytes, folder: str = DIR) -> str | None:
  """The shipped model whose id is `model_id` (None if none is)."""
  for n in names(folder):
    if load(n, folder).model_id == model_id:
      return n
  return None
