"""Converted-params cache (`diffusion.cache`): hits, misses, corruption.

Planted-bug checks done while writing these tests (each made a test fail):
leaving the mtime out of the key, re-raising on a corrupt entry, writing
the entry in place instead of through a temp file.
"""

import os
import warnings

import chex
import numpy as np
import pytest

from jaxlib_models.diffusion import cache


def _tree(seed=0):
  rng = np.random.RandomState(seed)
  return {"unet": {"conv_in": {"kernel": rng.randn(3, 3, 4, 8).astype(
      np.float32), "bias": np.zeros(8, np.float16)}},
          "step": np.array(3, np.int32)}


class _Build:

  def __init__(self, tree):
    self.tree, self.calls = tree, 0

  def __call__(self):
    self.calls += 1
    return self.tree


@pytest.fixture
def src(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"0123456789")
  return str(path)


def test_hit_returns_equal_tree_without_building(tmp_path, src):
  build = _Build(_tree())
  d = str(tmp_path / "c")
  first = cache.cached_params([src], "unet-f32", build, cache_dir=d)
  second = cache.cached_params([src], "unet-f32", build, cache_dir=d)
  assert build.calls == 1
  chex.assert_trees_all_equal(first, _tree())
  chex.assert_trees_all_equal(second, _tree())
  assert second["unet"]["conv_in"]["bias"].dtype == np.float16
  assert len(os.listdir(d)) == 1
  # A different tag is a different entry.
  cache.cached_params([src], "unet-bf16", build, cache_dir=d)
  assert build.calls == 2


def test_changed_size_or_mtime_misses(tmp_path, src):
  build = _Build(_tree())
  d = str(tmp_path / "c")
  cache.cached_params([src], "t", build, cache_dir=d)
  st = os.stat(src)
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  cache.cached_params([src], "t", build, cache_dir=d)
  assert build.calls == 2
  with open(src, "ab") as f:  # same mtime, other size
    f.write(b"x")
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  cache.cached_params([src], "t", build, cache_dir=d)
  assert build.calls == 3
  cache.cached_params([src], "t", build, cache_dir=d)
  assert build.calls == 3


def test_env_var_sets_default_dir(tmp_path, src, monkeypatch):
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
  cache.cached_params([src], "t", _Build(_tree()))
  assert len(os.listdir(tmp_path / "env")) == 1
  monkeypatch.delenv(cache.ENV_VAR)
  assert cache.default_cache_dir().endswith(
      os.path.join(".cache", "jaxlib_models"))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, src, damage):
  build = _Build(_tree())
  d = str(tmp_path / "c")
  cache.cached_params([src], "t", build, cache_dir=d)
  path = cache.cache_path([src], "t", d)
  with open(path, "rb") as f:
    data = f.read()
  damaged = {"truncate": data[:len(data) // 2], "empty": b"",
             "garbage": b"\x05"}[damage]
  with open(path, "wb") as f:
    f.write(damaged)
  with pytest.warns(RuntimeWarning, match="unreadable"):
    tree = cache.cached_params([src], "t", build, cache_dir=d)
  assert build.calls == 2
  chex.assert_trees_all_equal(tree, _tree())
  with warnings.catch_warnings():  # the entry was rewritten
    warnings.simplefilter("error")
    cache.cached_params([src], "t", build, cache_dir=d)
  assert build.calls == 2


def test_interrupted_write_leaves_no_partial_file(tmp_path, src,
                                                  monkeypatch):
  d = tmp_path / "c"

  def boom(fd):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "fsync", boom)  # after the bytes hit the temp file
  with pytest.raises(KeyboardInterrupt):
    cache.cached_params([src], "t", _Build(_tree()), cache_dir=str(d))
  assert os.listdir(d) == []
  monkeypatch.undo()
  build = _Build(_tree())
  cache.cached_params([src], "t", build, cache_dir=str(d))
  assert build.calls == 1 and len(os.listdir(d)) == 1


def test_unwritable_cache_only_warns(tmp_path, src):
  blocker = tmp_path / "file"
  blocker.write_text("not a dir")
  with pytest.warns(RuntimeWarning, match="could not write"):
    tree = cache.cached_params([src], "t", _Build(_tree()),
                               cache_dir=str(blocker / "sub"))
  chex.assert_trees_all_equal(tree, _tree())


def test_build_error_propagates_and_writes_nothing(tmp_path, src):
  def fail():
    raise RuntimeError("conversion failed")

  with pytest.raises(RuntimeError, match="conversion failed"):
    cache.cached_params([src], "t", fail, cache_dir=str(tmp_path / "c"))
  assert not (tmp_path / "c").exists()


def test_missing_source_raises(tmp_path):
  with pytest.raises(FileNotFoundError):
    cache.cached_params([str(tmp_path / "nope")], "t", _Build({}),
                        cache_dir=str(tmp_path))
