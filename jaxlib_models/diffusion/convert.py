"""PyTorch state dicts <-> Flax parameter trees, and CLIP folders.

The mapping is mechanical because every Flax module is named after its
PyTorch state-dict key (video-editing brief §2.1, "Weights I/O"):

- key segments become tree levels, and an integer segment joins its parent
  with `_` (`encoder.layers.3` <-> `encoder/layers_3`);
- leaf rules: linear `weight (O, I)` <-> `kernel (I, O)`; conv
  `weight (O, I, kh, kw)` <-> `kernel (kh, kw, I, O)`; a LayerNorm/GroupNorm
  `weight` <-> `scale`; an embedding `weight` <-> `embedding`; `bias` and any
  other name (e.g. `class_embedding`) unchanged.

Which `weight` a key becomes is read from the target tree (its abstract
shapes), so loading is strict: a missing tensor, an extra tensor or a wrong
shape raises `ConversionError` naming the tensor. Files are read with
`safetensors` (numpy framework, BF16 via ml_dtypes); torch is never imported.
"""

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from jaxlib_models.core import io as core_io
from jaxlib_models.diffusion.clip import (CLIPTextConfig, CLIPVisionConfig,
                                          init_text_params, init_vision_params)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Buffers some checkpoints carry and the Flax models recompute.
_BUFFERS = re.compile(r"(^|\.)position_ids$")
_INT = re.compile(r"\d+")
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight",
                       "embedding": "weight"}


class ConversionError(ValueError):
  """A checkpoint does not match the architecture it is loaded into."""


# --------------------------------------------------------------------------
# Generic key and tensor rules.


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """`a.b.0.c.weight` -> ("a", "b_0", "c", "weight") (leaf name kept)."""
  out: list[str] = []
  for seg in key.split("."):
    if _INT.fullmatch(seg) and out:
      out[-1] = f"{out[-1]}_{seg}"
    else:
      out.append(seg)
  return tuple(out)


def path_to_torch_key(path: Iterable[str],
                      literal: frozenset[str] = frozenset()) -> str:
  """Inverse of `torch_key_to_path` on module paths (leaf renamed too).

  Args:
    path: tree path; the last entry is the Flax leaf name.
    literal: module names whose `_<int>` suffix is part of the PyTorch name
      (e.g. diffusers' `linear_1`) and must not become `.1`.
  """
  path = list(path)
  segs = []
  for seg in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", seg)
    if m and seg not in literal:
      segs += [m.group(1), m.group(2)]
    else:
      segs.append(seg)
  segs.append(_FLAX_TO_TORCH_LEAF.get(path[-1], path[-1]))
  return ".".join(segs)


def _to_flax(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim in (3, 4, 5):  # (O, I, *k) -> (*k, I, O)
    n = x.ndim
    return x.transpose(tuple(range(2, n)) + (1, 0))
  return x


def _to_torch(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim in (3, 4, 5):  # (*k, I, O) -> (O, I, *k)
    n = x.ndim
    return x.transpose((n - 1, n - 2) + tuple(range(n - 2)))
  return x


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if leaf == "kernel" and len(shape) > 2:
    return (shape[-1], shape[-2]) + shape[:-2]
  return shape


def _flat_paths(tree) -> list[tuple[tuple[str, ...], object]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(str(k.key) for k in p), x) for p, x in leaves]


def params_from_torch_state(
    get_tensor: Callable[[str], np.ndarray],
    keys: Iterable[str],
    abstract_params,
    *,
    literal: frozenset[str] = frozenset(),
    source: str = "state dict",
    dtype=np.float32,
) -> dict:
  """Builds a Flax tree shaped like `abstract_params` from PyTorch tensors.

  Args:
    get_tensor: returns the PyTorch-layout tensor of a key.
    keys: every key the source holds (used to report extra tensors).
    abstract_params: target tree (arrays or ShapeDtypeStructs); fixes the
      expected keys, leaf kinds and shapes.
    literal: see `path_to_torch_key`.
    source: quoted in errors.
    dtype: dtype of the returned numpy leaves.

  Returns:
    Nested dict of numpy arrays with the structure of `abstract_params`.

  Raises:
    ConversionError: the first missing tensor, every extra tensor, or the
      first tensor of the wrong shape.
  """
  keys = set(keys)
  flat = _flat_paths(abstract_params)
  wanted = {path_to_torch_key(p, literal): (p, leaf) for p, leaf in flat}
  missing = [k for k in wanted if k not in keys]
  if missing:
    raise ConversionError(
        f"{source}: tensor {missing[0]!r} is missing ({len(missing)} of"
        f" {len(wanted)} expected tensors absent)")
  extra = sorted(k for k in keys if k not in wanted)
  if extra:
    raise ConversionError(
        f"{source}: {len(extra)} unexpected tensor(s) for this architecture,"
        f" e.g. {extra[:5]}")
  out: dict = {}
  for key, (path, leaf) in wanted.items():
    raw = np.asarray(get_tensor(key))
    x = _to_flax(path[-1], raw)
    if tuple(x.shape) != tuple(leaf.shape):
      raise ConversionError(
          f"{source}: tensor {key!r} has shape {tuple(raw.shape)}, the config"
          f" needs {_torch_shape(path[-1], tuple(leaf.shape))}")
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(x.astype(dtype))
  return out


def torch_state_from_params(
    params, *, literal: frozenset[str] = frozenset()
) -> dict[str, np.ndarray]:
  """The inverse of `params_from_torch_state`: key -> float32 torch layout."""
  state = {}
  for path, x in _flat_paths(params):
    x = np.asarray(x, np.float32)
    state[path_to_torch_key(path, literal)] = np.ascontiguousarray(
        _to_torch(path[-1], x))
  return state


# --------------------------------------------------------------------------
# Safetensors folders.


# transformers names first, then diffusers' (`diffusion_pytorch_model`).
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")


def _safetensor_files(folder: str) -> list[str]:
  for stem in WEIGHT_STEMS:
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(index):
      with open(index) as fh:
        try:
          names = sorted(set(json.load(fh)["weight_map"].values()))
        except (ValueError, KeyError) as e:
          raise ConversionError(
              f"{index}: no valid 'weight_map' ({e})") from None
      files = [os.path.join(folder, n) for n in names]
      for f in files:
        if not os.path.exists(f):
          raise ConversionError(f"shard {f} named in {index} does not exist")
      return files
    if os.path.exists(single):
      return [single]
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder")
  bins = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".ckpt"))]
  hint = (f"; it holds {bins[:3]}: PyTorch pickles are not read (no torch at"
          " run time), re-save them as safetensors" if bins else "")
  raise FileNotFoundError(
      f"{folder}: no {WEIGHTS_NAME}, {INDEX_NAME} or"
      f" diffusion_pytorch_model.safetensors{hint}")


def read_safetensors_folder(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of a (possibly sharded) safetensors folder, as numpy."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  state = {}
  for path in _safetensor_files(folder):
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        state[k] = f.get_tensor(k)
  return state


def write_safetensors(path: str, state: Mapping[str, np.ndarray]) -> None:
  """Writes one safetensors file atomically, with PyTorch metadata."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".safetensors")
  os.close(fd)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp,
              metadata={"format": "pt"})
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_config(folder: str) -> tuple[dict, str]:
  path = os.path.join(os.fspath(folder), CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  with open(path) as fh:
    return json.load(fh), path


# --------------------------------------------------------------------------
# CLIP.


def _select(state: dict, tower: str, projection: str, keep_projection: bool,
            is_clip_model: bool) -> dict:
  """Keys of one CLIP tower, prefixed `<tower>.` as our tree expects.

  transformers 5 saves a bare CLIPTextModel / CLIPVisionModel without the
  `text_model.` / `vision_model.` prefix that SD checkpoints, CLIPModel and
  the *WithProjection classes use; both layouts are accepted.
  """
  proj_key = projection + ".weight"
  state = {k: v for k, v in state.items() if not _BUFFERS.search(k)}
  if is_clip_model:  # a full CLIPModel: drop the other tower and logit_scale
    return {k: v for k, v in state.items()
            if k.startswith(tower + ".") or (keep_projection and k == proj_key)}
  if not any(k.startswith(tower + ".") for k in state):
    state = {(k if k == proj_key else f"{tower}.{k}"): v
             for k, v in state.items()}
  if not keep_projection:
    state.pop(proj_key, None)
  return state


def load_clip_text(
    folder: str,
    *,
    with_projection: bool | None = None,
    dtype=np.float32,
) -> tuple[CLIPTextConfig, dict]:
  """Loads a transformers CLIP text encoder folder (safetensors).

  Accepts SD's `text_encoder/` (CLIPTextModel), CLIPTextModelWithProjection
  and full CLIPModel folders (the text tower is taken).

  Args:
    folder: holds `config.json` and `model.safetensors` (or shards + index).
    with_projection: also load `text_projection`; None: when the folder has
      one (CLIPModel, CLIPTextModelWithProjection).
    dtype: dtype of the returned leaves (numpy).

  Returns:
    (config, params) for `clip.encode_text`.

  Raises:
    ConversionError: missing, extra or misshapen tensors (the message names
      the first one).
  """
  d, cfg_path = _read_config(folder)
  cfg = CLIPTextConfig.from_hf_dict(d, with_projection=with_projection,
                                    source=cfg_path)
  state = _select(read_safetensors_folder(folder), "text_model",
                  "text_projection", cfg.projection_dim is not None,
                  d.get("model_type") == "clip")
  abstract = jax.eval_shape(lambda: init_text_params(cfg, jax.random.key(0)))
  params = params_from_torch_state(state.__getitem__, state.keys(), abstract,
                                   source=os.fspath(folder), dtype=dtype)
  return cfg, params


def load_clip_vision(
    folder: str,
    *,
    with_projection: bool | None = None,
    dtype=np.float32,
) -> tuple[CLIPVisionConfig, dict]:
  """Loads a transformers CLIP vision folder (CLIPVisionModel[WithProjection]
  or the vision tower of a CLIPModel); see `load_clip_text`."""
  d, cfg_path = _read_config(folder)
  cfg = CLIPVisionConfig.from_hf_dict(d, with_projection=with_projection,
                                      source=cfg_path)
  state = _select(read_safetensors_folder(folder), "vision_model",
                  "visual_projection", cfg.projection_dim is not None,
                  d.get("model_type") == "clip")
  abstract = jax.eval_shape(
      lambda: init_vision_params(cfg, jax.random.key(0)))
  params = params_from_torch_state(state.__getitem__, state.keys(), abstract,
                                   source=os.fspath(folder), dtype=dtype)
  return cfg, params


def _save(folder: str, hf_config: dict, params) -> None:
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, WEIGHTS_NAME),
                    torch_state_from_params(params))
  core_io.write_text(os.path.join(folder, CONFIG_NAME),
                     json.dumps(hf_config, indent=2) + "\n")


def save_clip_text(folder: str, cfg: CLIPTextConfig, params) -> None:
  """Writes a CLIPTextModel(WithProjection) folder in the SD key layout
  (`text_model.*`), loadable by transformers and by `load_clip_text`."""
  _save(folder, cfg.to_hf_dict(), params)


def save_clip_vision(folder: str, cfg: CLIPVisionConfig, params) -> None:
  """Writes a CLIPVisionModel(WithProjection) folder (`vision_model.*`)."""
  _save(folder, cfg.to_hf_dict(), params)
