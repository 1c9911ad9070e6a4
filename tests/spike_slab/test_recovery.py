"""Statistical recovery check (brief §8.11), with a shuffled-label control.

Variable-selection generator, p = 50, n_train = 2000, 50-50 ReLU net, seeds
1-5, the demo's training settings (2500 steps, pi0 = 1e-3, theta step 30x).
Thresholds are the brief's. The control shows the check is not vacuous:
with shuffled labels there is nothing to find, so a selector that keeps
whatever has large weights would fail it. ~3 min on 2 cores (slow).
"""

import dataclasses
import os

import numpy as np
import pytest

from jaxlib_models.core import config as config_lib
from jaxlib_models.spike_slab import data as data_lib
from jaxlib_models.spike_slab import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = (1, 2, 3, 4, 5)


def _fit(tmp_path, seed, shuffle):
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "spike_slab", "sim.py"))
  config_lib.apply_overrides(cfg, [
      "train.num_steps=2500", "train.batch_size=64", "train.progress=False",
      "train.console=False", "train.checkpoint_every=100000",
      "train.async_checkpoint=False", "model.pi0=0.001", f"data.seed={seed}"])
  ds = data_lib.load("variable_selection", seed, p=50, n_train=2000, n_val=0,
                     n_test=500)
  if shuffle:
    perm = np.random.default_rng(seed).permutation(ds.num_train)
    ds = dataclasses.replace(ds, y_train=ds.y_train[perm])
  params, mcfg, ds = experiment.fit(cfg, str(tmp_path / f"s{seed}{shuffle}"), ds)
  return experiment.evaluate(params, mcfg, ds)


@pytest.mark.slow
def test_recovers_true_features_and_control_selects_nothing(tmp_path):
  runs = [_fit(tmp_path, s, False) for s in SEEDS]
  pips = np.array([r["feature_pip"] for r in runs])  # (seeds, p)
  hits = (pips[:, :5] > 0.5).sum(0)
  assert np.all(hits >= 4), f"true-feature hits per feature over 5 seeds: {hits}"
  nuisance = (pips[:, 5:] > 0.5).mean()
  assert nuisance <= 0.10, f"nuisance features above 0.5: {nuisance:.3f}"
  for r in runs:
    assert r["pruned"]["rmse"] <= 1.05 * r["full"]["rmse"], r
  control = [_fit(tmp_path, s, True)["features_kept"] for s in SEEDS[:3]]
  assert np.mean(control) <= 2, f"shuffled labels selected {control}"
