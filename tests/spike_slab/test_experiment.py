"""The spike-and-slab fit through the generic trainer: sharding, bad input."""

import dataclasses
import os

import chex
import jax
import numpy as np
import pytest

from jaxlib_models.core import config as config_lib
from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.spike_slab import data as data_lib
from jaxlib_models.spike_slab import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**over):
  cfg = config_lib.load_config(
      os.path.join(ROOT, "configs", "spike_slab", "sim.py") + ":tiny")
  config_lib.apply_overrides(cfg, [
      "train.num_steps=8", "train.progress=False", "train.checkpoint_every=100",
      "train.async_checkpoint=False", "data.kwargs.p=16",
      *[f"{k}={v}" for k, v in over.items()]])
  return cfg


@pytest.mark.parametrize("layout", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=4)],
                         ids=["data8", "fsdp8", "data2_fsdp4"])
def test_sharded_fit_equals_single_device(tmp_path, layout):
  """8 simulated devices vs 1: same parameters after 8 SVI steps.

  Planted bug caught: summing instead of averaging shard losses."""
  cfg = _config()
  ref, _, _ = experiment.fit(cfg, str(tmp_path / "one"),
                             mesh=mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]))
  got, _, _ = experiment.fit(cfg, str(tmp_path / "many"),
                             mesh=mesh_lib.make_mesh(layout))
  chex.assert_trees_all_close(got, ref, atol=5e-5, rtol=5e-5)


def test_numpyro_loss_trains_through_the_same_step(tmp_path):
  cfg = _config(loss_impl="numpyro")
  params, mcfg, ds = experiment.fit(cfg, str(tmp_path / "npy"))
  chex.assert_tree_all_finite(params)
  assert params["layer_0"]["theta"].shape == (16, 20)


def test_nan_and_wrong_shape_data_are_clear_errors(tmp_path):
  cfg = _config()
  ds = data_lib.load("variable_selection", 1, p=16, n_train=256, n_val=0, n_test=64)
  x = ds.x_train.copy()
  x[7, 3] = np.nan
  bad = dataclasses.replace(ds, x_train=x)
  with pytest.raises(ValueError, match=r"NaN.*row|row.*NaN|7"):
    experiment.fit(cfg, str(tmp_path / "nan"), bad)
  wrong = dataclasses.replace(ds, y_train=ds.y_train[:-3])
  with pytest.raises(ValueError, match="253|256"):
    experiment.fit(cfg, str(tmp_path / "shape"), wrong)
  with pytest.raises(ValueError, match="unknown dataset"):
    data_lib.load("mnist_5k", 0)
