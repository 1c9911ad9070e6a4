"""Checkpoints saved on 8 devices restore on 4, 2 and 1 and training goes on
with the loss curve of an uninterrupted run; device-local comm state (error
feedback) is kept on the same device count and reset on another."""

import shutil

import chex
import jax
import numpy as np
import pytest

from jaxlib_models.core import checkpoint as ckpt_lib
from tests.parallel import lmtask

pytestmark = pytest.mark.usefixtures("fast_compile")

STEPS, HALF = 6, 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("full")
  state = lmtask.run(d, "run", {"data": 8}, num_steps=STEPS, checkpoint_every=HALF,
                     async_checkpoint=True)
  return lmtask.losses(str(d / "run")), jax.device_get(state.params)


@pytest.fixture(scope="module")
def half_on_eight(tmp_path_factory):
  d = tmp_path_factory.mktemp("half")
  lmtask.run(d, "run", {"data": 8}, num_steps=HALF, checkpoint_every=HALF,
             async_checkpoint=True)
  return d / "run"


@pytest.mark.parametrize("devices", [4, 2, 1])
def test_restore_on_fewer_devices(tmp_path, uninterrupted, half_on_eight, devices):
  """Planted bugs caught: restarting the data stream at step 0, or restoring
  the optimizer state as fresh zeros (the losses after step 3 differ)."""
  ref_losses, ref_params = uninterrupted
  work = tmp_path / f"on{devices}"
  shutil.copytree(half_on_eight, work)
  state = lmtask.run(tmp_path, f"on{devices}", {"data": devices},
                     num_steps=STEPS, checkpoint_every=HALF)
  got = lmtask.losses(str(work))
  for s in range(HALF + 1, STEPS + 1):
    np.testing.assert_allclose(got[s], ref_losses[s], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(state.params), ref_params,
                              atol=2e-5, rtol=2e-5)
  leaf = jax.tree.leaves(state.params)[0]
  assert len(leaf.sharding.device_set) == devices


def _comm_run(tmp_path, name, sizes, steps, **kw):
  return lmtask.run(tmp_path, name, sizes, num_steps=steps, checkpoint_every=HALF,
                    comm={"name": "topk", "ratio": 0.1}, **kw)


def test_error_feedback_state_resumes_or_resets(tmp_path, capsys):
  full = _comm_run(tmp_path, "full", {"data": 8}, STEPS)
  _comm_run(tmp_path, "part", {"data": 8}, HALF)
  shutil.copytree(tmp_path / "part", tmp_path / "same")
  resumed = _comm_run(tmp_path, "same", {"data": 8}, STEPS)
  # Same device count: residuals restored, identical to uninterrupted.
  chex.assert_trees_all_close(jax.device_get(resumed.params),
                              jax.device_get(full.params), atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(jax.device_get(resumed.comm),
                              jax.device_get(full.comm), atol=1e-6, rtol=1e-6)
  capsys.readouterr()
  shutil.copytree(tmp_path / "part", tmp_path / "four")
  four = _comm_run(tmp_path, "four", {"data": 4}, STEPS)
  assert "comm state reset" in capsys.readouterr().out
  assert int(four.step) == STEPS


def test_corrupt_checkpoint_names_the_file(tmp_path, half_on_eight):
  work = tmp_path / "bad"
  shutil.copytree(half_on_eight, work)
  for p in (work / "ckpt" / str(HALF) / "state").rglob("*"):
    if p.is_file() and p.stat().st_size > 0 and "manifest" not in p.name:
      p.write_bytes(b"\0" * 8)
  with pytest.raises(ckpt_lib.CheckpointError, match=str(HALF)):
    lmtask.run(tmp_path, "bad", {"data": 2}, num_steps=STEPS)
