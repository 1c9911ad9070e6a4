"""DP, FSDP, ZeRO-1, TP and FSDP+TP on the LM: equal to one device, the
expected collectives in the compiled program, and per-device bytes that
shrink by the mesh factor."""

import chex
import jax
import numpy as np
import pytest

from jaxlib_models.core import trainer
from tests.parallel import lmtask

pytestmark = pytest.mark.usefixtures("fast_compile")

LAYOUTS = {
    "dp": ({"data": 8}, {}),
    "fsdp": ({"data": 1, "fsdp": 8}, {}),
    "zero1": ({"data": 8}, {"zero1": True}),
    "tp": ({"data": 4, "tensor": 2}, {}),
    "fsdp_tp": ({"data": 1, "fsdp": 4, "tensor": 2}, {}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  state = lmtask.run(tmp_path_factory.mktemp("ref"), "one", {"data": 1})
  return jax.device_get(state.params)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_one_device(tmp_path, reference, name):
  """Planted bug caught: a per-shard sum instead of a mean, or the ZeRO-1
  shard updated but not gathered."""
  sizes, kw = LAYOUTS[name]
  state = lmtask.run(tmp_path, name, sizes, **kw)
  chex.assert_trees_all_close(jax.device_get(state.params), reference,
                              atol=2e-5, rtol=2e-5)
  # Replicas agree: every device holding the same index holds the same bytes.
  for leaf in jax.tree.leaves(state.params):
    by_index = {}
    for s in leaf.addressable_shards:
      by_index.setdefault(str(s.index), []).append(np.asarray(s.data))
    for copies in by_index.values():
      for c in copies[1:]:
        np.testing.assert_array_equal(c, copies[0])


def _compiled(sizes, **kw):
  t = lmtask.tc(mesh=sizes, **kw)
  task = lmtask.task(t)
  mesh = lmtask.mesh(sizes)
  par = trainer.plan_parallel(t, mesh)
  make_state, sh = trainer.init_state(task, par.tx, mesh, parallel=par)
  batch = next(task.batches(0))
  bsh = trainer.batch_shardings_for(batch, mesh)
  step = trainer.make_train_step(task.loss_fn, mesh, sh, bsh, t.accum_steps,
                                 communicator=par.communicator)
  with jax.set_mesh(mesh):
    state = make_state()
    text = step.lower(state, trainer.put_batch(batch, bsh),
                      jax.random.key(0)).compile().as_text()
  return state, text


def _per_device_bytes(tree):
  return sum(l.addressable_shards[0].data.nbytes for l in jax.tree.leaves(tree))


def _total_bytes(tree):
  return sum(l.nbytes for l in jax.tree.leaves(tree))


def test_collectives_and_bytes():
  dp, dp_hlo = _compiled({"data": 8})
  assert "all-reduce" in dp_hlo and "all-gather" not in dp_hlo
  assert _per_device_bytes(dp.params) == _total_bytes(dp.params)

  fsdp, fsdp_hlo = _compiled({"data": 1, "fsdp": 8})
  assert "all-gather" in fsdp_hlo
  assert "reduce-scatter" in fsdp_hlo or "all-reduce" in fsdp_hlo
  # Every weight matrix has an embed dimension (32) split 8 ways; only the
  # (layers, 32) norm weights, which carry no logical name, stay replicated.
  big = [l for l in jax.tree.leaves(fsdp.params) if l.size >= 512]
  assert len(big) == 8
  for leaf in big:
    assert leaf.addressable_shards[0].data.nbytes * 8 == leaf.nbytes, leaf.sharding
  assert _per_device_bytes(fsdp.opt_state) < _total_bytes(fsdp.opt_state) / 6

  z1, z1_hlo = _compiled({"data": 8}, zero1=True)
  assert "all-gather" in z1_hlo  # updated shards gathered into replicated params
  assert _per_device_bytes(z1.params) == _total_bytes(z1.params)
  mu = z1.opt_state[0].mu
  specs = [l.sharding.spec for l in jax.tree.leaves(mu)]
  assert all("data" in str(s) for s in specs), specs
  assert _per_device_bytes(z1.opt_state) < _total_bytes(z1.opt_state) / 6

  tp, tp_hlo = _compiled({"data": 4, "tensor": 2})
  assert "all-reduce" in tp_hlo
  gate = tp.params["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert gate.sharding.spec[-1] == "tensor"
  assert gate.addressable_shards[0].data.nbytes * 2 == gate.nbytes
