"""Config loading, overrides, mesh resolution; every config loads with :tiny."""

import glob
import os

import pytest

from jaxlib_models.core import config as config_lib
from jaxlib_models.core import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_tiny(path):
  cfg = config_lib.load_config(f"{path}:tiny")
  assert cfg.method
  full = config_lib.load_config(path)
  assert config_lib.flat_keys(cfg) and config_lib.flat_keys(full)


def test_overrides_parse_types():
  cfg = config_lib.load_config(f"{ROOT}/configs/spike_slab/sim.py:tiny")
  config_lib.apply_overrides(cfg, [
      "train.num_steps=7", "train.learning_rate=1", "model.hidden=(4, 3)",
      "model.activation=tanh", "train.progress=False",
  ])
  assert cfg.train.num_steps == 7
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert tuple(cfg.model.hidden) == (4, 3)
  assert cfg.model.activation == "tanh" and cfg.train.progress is False


def test_unknown_key_names_nearest():
  cfg = config_lib.load_config(f"{ROOT}/configs/spike_slab/sim.py:tiny")
  with pytest.raises(config_lib.ConfigError, match=r"'train\.num_step'.*train\.num_steps"):
    config_lib.apply_overrides(cfg, ["train.num_step=3"])
  with pytest.raises(config_lib.ConfigError, match="cannot parse as int"):
    config_lib.apply_overrides(cfg, ["train.num_steps=abc"])
  with pytest.raises(config_lib.ConfigError, match="expected int"):
    config_lib.apply_overrides(cfg, ["train.num_steps=2.5"])


def test_cli_parsing_and_missing_file():
  cfg, rest = config_lib.parse_config_args([
      f"--config={ROOT}/configs/spike_slab/sim.py:tiny", "--workdir", "w",
      "--config.train.batch_size", "16"])
  assert cfg.train.batch_size == 16 and rest == ["--workdir", "w"]
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config("configs/nope.py:tiny")
  with pytest.raises(ValueError, match="unknown config arg"):
    config_lib.load_config(f"{ROOT}/configs/spike_slab/sim.py:huge")


def test_mesh_shape_fills_and_errors():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2}, 8) == (1, 4, 2, 1)
  assert mesh_lib.mesh_shape({"tensor": -1}, 8) == (1, 1, 1, 8)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.mesh_shape({"model": 2}, 8)


def test_rules_replicate_indivisible_dims():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  assert mesh_lib.logical_to_spec(("in", "out"), (8, 3), mesh)[0] == "fsdp"
  assert mesh_lib.logical_to_spec(("in", "out"), (6, 3), mesh)[0] is None
  with pytest.raises(KeyError, match="no rule"):
    mesh_lib.logical_to_spec(("bogus",), (8,), mesh)
