"""Trainer: sharded == unsharded, accumulation, resume, guards."""

import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.core import checkpoint as ckpt_lib
from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.core import trainer
from tests.core import toy


def _run(tmp_path, name, mesh_sizes, steps=6, accum=1, **kw):
  tc = trainer.TrainConfig(
      num_steps=steps, batch_size=32, learning_rate=1e-2, accum_steps=accum,
      checkpoint_every=3, progress=False, log_every=1, async_checkpoint=False,
      mesh=tuple(mesh_sizes.items()),
  )
  devices = jax.devices()[: int(np.prod([v for v in mesh_sizes.values()]))]
  mesh = mesh_lib.make_mesh(mesh_sizes, devices)
  state = trainer.train(toy.make_task(**kw), tc, str(tmp_path / name), mesh=mesh)
  return jax.device_get(state.params), state


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
    "layout",
    [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 8, "tensor": 1},
     {"data": 2, "fsdp": 2, "tensor": 2}],
    ids=["data8", "fsdp8", "d2f2t2"],
)
def test_sharded_equals_unsharded(tmp_path, layout):
  """Planted bug caught: a per-shard sum instead of a mean (loss scaled by 8)."""
  ref, _ = _run(tmp_path, "one", {"data": 1, "fsdp": 1, "tensor": 1})
  got, state = _run(tmp_path, "many", layout)
  chex.assert_trees_all_close(got, ref, atol=2e-5, rtol=2e-5)
  if layout["fsdp"] == 8:  # Parameters really are split over fsdp.
    spec = state.params["w1"].sharding.spec
    assert spec[0] == "fsdp", spec


def test_accumulation_equals_full_batch(tmp_path):
  ref, _ = _run(tmp_path, "full", {"data": 8}, accum=1)
  got, _ = _run(tmp_path, "acc", {"data": 8}, accum=4)
  chex.assert_trees_all_close(got, ref, atol=2e-5, rtol=2e-5)
  got1, _ = _run(tmp_path, "acc1", {"data": 1}, accum=2)
  chex.assert_trees_all_close(got1, ref, atol=2e-5, rtol=2e-5)


def _hlo_for(accum):
  mesh = mesh_lib.make_mesh({"data": 8})
  task = toy.make_task()
  tx = trainer.make_optimizer(trainer.TrainConfig())
  make_state, state_sh = trainer.init_state(task, tx, mesh)
  batch = next(task.batches(0))
  bsh = trainer.batch_shardings_for(batch, mesh)
  step = trainer.make_train_step(task.loss_fn, mesh, state_sh, bsh, accum)
  with jax.set_mesh(mesh):
    state = make_state()
    lowered = step.lower(state, trainer.put_batch(batch, bsh), jax.random.key(0))
    return lowered.compile().as_text()


def _computations(hlo):
  """name -> body text of each HLO computation."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name, comps[m.group(1)] = m.group(1), []
    elif name is not None:
      comps[name].append(line)
  return {k: "\n".join(v) for k, v in comps.items()}


def test_one_gradient_sync_with_accumulation():
  """The all-reduce count does not grow with microbatches, none in the loop.

  Planted bug caught: pmean inside the scan body (one sync per microbatch).
  """
  hlo4 = _hlo_for(4)
  comps = _computations(hlo4)
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo4))
  assert bodies, "expected a while loop over microbatches"
  for b in bodies:
    assert "all-reduce(" not in comps[b], f"sync inside loop body {b}"
  n4 = hlo4.count("all-reduce(")
  assert n4 >= 1
  assert n4 <= _hlo_for(1).count("all-reduce(") + 1


def test_resume_equals_uninterrupted(tmp_path):
  ref, _ = _run(tmp_path, "straight", {"data": 2}, steps=9)
  _run(tmp_path, "split", {"data": 2}, steps=6)
  assert ckpt_lib.Checkpointer(str(tmp_path / "split")).latest_step() == 6
  got, state = _run(tmp_path, "split", {"data": 2}, steps=9)
  assert int(state.step) == 9
  chex.assert_trees_all_close(got, ref, atol=1e-6)
  steps = [r["step"] for r in __import__(
      "jaxlib_models.core.metrics", fromlist=["x"]).read_metrics(str(tmp_path / "split"))]
  assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after resume"


def test_restore_onto_other_device_count(tmp_path):
  _run(tmp_path, "w", {"data": 8}, steps=6)
  got, state = _run(tmp_path, "w", {"data": 1}, steps=9)
  ref, _ = _run(tmp_path, "ref", {"data": 8}, steps=9)
  chex.assert_trees_all_close(got, ref, atol=2e-5)


def test_nan_guard_names_step(tmp_path):
  with pytest.raises(FloatingPointError, match=r"step 4\b"):
    _run(tmp_path, "nan", {"data": 1}, steps=8, nan_at=3)
  # The guard ran before saving: the checkpoint at step 3 holds finite params.
  assert ckpt_lib.Checkpointer(str(tmp_path / "nan")).latest_step() == 3


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  _run(tmp_path, "c", {"data": 1}, steps=3)
  d = tmp_path / "c" / "ckpt" / "3"
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 0 and "state" in root:
        with open(p, "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot restore checkpoint"):
    _run(tmp_path, "c", {"data": 1}, steps=6)


def test_missing_checkpoint_for_eval(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint"):
    trainer.restore_params(toy.make_task(), str(tmp_path / "empty"))


def test_cosine_schedule_and_sgd_momentum():
  """sgd on a constant unit gradient: each update is -lr(t); warmup from 0
  to the peak, cosine to final_lr_frac x peak at num_steps; momentum 0.5
  sums lr(t) x (1 + 0.5 + 0.25 ...)."""
  from jaxlib_models.core import trainer as tr

  tc = tr.TrainConfig(optimizer="sgd", learning_rate=1.0, num_steps=10,
                      lr_schedule="cosine", warmup_steps=2, final_lr_frac=0.1)
  tx = tr.make_optimizer(tc)
  p = jnp.zeros(())
  state = tx.init(p)
  lrs = []
  for _ in range(11):
    u, state = tx.update(jnp.ones(()), state, p)
    lrs.append(-float(u))
  np.testing.assert_allclose(lrs[:3], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(lrs[10], 0.1, atol=1e-6)
  assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
  tx = tr.make_optimizer(tr.TrainConfig(optimizer="sgd", learning_rate=1.0,
                                        momentum=0.5))
  state = tx.init(p)
  got = [-float(tx.update(jnp.ones(()), state, p)[0])]
  u, state = tx.update(jnp.ones(()), state, p)
  got.append(-float(tx.update(jnp.ones(()), state, p)[0]))
  np.testing.assert_allclose(got, [1.0, 1.5], atol=1e-6)
  with pytest.raises(ValueError, match="lr_schedule"):
    tr.TrainConfig(lr_schedule="linear")
