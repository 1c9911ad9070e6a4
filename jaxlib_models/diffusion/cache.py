"""On-disk cache of converted parameter trees.

Converting a full SD 1.5 UNet from PyTorch layout takes tens of seconds on
a 2-core CPU (video-editing brief §2.1: 76 s with diffusers' converter), so
`cached_params` stores the converted numpy tree once and reloads it. The
entry is keyed on the source files' absolute paths, sizes and modification
times, a caller tag (model kind, dtype, LoRA scale, ...) and the library
version, so any change to them misses. Entries are `flax.serialization`
msgpack files written atomically (`core.io.write_bytes`); a corrupt or
unreadable entry is rebuilt with a warning, never an exception.
"""

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import serialization

import jaxlib_models
from jaxlib_models.core import io as core_io

ENV_VAR = "JAXLIB_MODELS_CACHE"
_FORMAT = 1  # bump when the entry layout changes


def default_cache_dir() -> str:
  """`$JAXLIB_MODELS_CACHE`, else `~/.cache/jaxlib_models`."""
  return os.environ.get(ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxlib_models")


def cache_key(source_files: Sequence[str], tag: str) -> str:
  """Hex digest of (paths, sizes, mtimes, tag, library version).

  Raises:
    FileNotFoundError: a source file does not exist.
  """
  files = []
  for f in source_files:
    path = os.path.abspath(os.fspath(f))
    st = os.stat(path)
    files.append([path, st.st_size, st.st_mtime_ns])
  blob = json.dumps({"files": files, "tag": tag, "format": _FORMAT,
                     "version": jaxlib_models.__version__}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(source_files: Sequence[str], tag: str,
               cache_dir: str | None = None) -> str:
  """Where `cached_params` keeps the entry for these arguments."""
  safe_tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)[:48] or "params"
  key = cache_key(source_files, tag)[:40]
  return os.path.join(cache_dir or default_cache_dir(),
                      f"{safe_tag}-{key}.msgpack")


def cached_params(
    source_files: Sequence[str],
    tag: str,
    build: Callable[[], object],
    cache_dir: str | None = None,
):
  """Returns `build()`'s tree, from the cache when the sources are unchanged.

  Args:
    source_files: files the tree is converted from (e.g. the safetensors
      checkpoint and LoRA); their paths, sizes and mtimes enter the key.
    tag: everything else the tree depends on (model kind, dtype, LoRA
      scale...); part of the key and of the file name.
    build: converts the sources; returns nested dicts of arrays (a Flax
      params tree). Called only on a miss.
    cache_dir: entry folder; default `default_cache_dir()`.

  Returns:
    The tree with numpy leaves; equal on a hit to what `build` returned.

  Raises:
    FileNotFoundError: a source file does not exist. Errors of `build`
      propagate; cache read/write failures only warn.
  """
  path = cache_path(source_files, tag, cache_dir)
  if os.path.exists(path):
    try:
      with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      if not isinstance(tree, dict):
        raise TypeError(f"entry holds a {type(tree).__name__}, not a tree")
      return tree
    except Exception as e:  # noqa: BLE001  (any damage means: rebuild)
      warnings.warn(f"params cache entry {path} is unreadable ({e!r});"
                    " rebuilding it", RuntimeWarning, stacklevel=2)
  tree = jax.tree.map(np.asarray, build())
  try:
    data = serialization.msgpack_serialize(tree)
    core_io.write_bytes(path, data)
  except (OSError, TypeError, ValueError) as e:
    warnings.warn(f"could not write params cache entry {path} ({e!r})",
                  RuntimeWarning, stacklevel=2)
  return tree
