"""DiLoCo / local SGD: H=1 with SGD inner and outer lr 1 is synchronous DP;
cross-replica collectives only in the sync branch; bytes fall by H."""

import dataclasses
import json

import chex
import jax
import numpy as np
import optax
import pytest

from jaxlib_models.core import trainer
from jaxlib_models.parallel import hlo
from jaxlib_models.parallel import steps as steps_lib
from tests.parallel import lmtask

pytestmark = pytest.mark.usefixtures("fast_compile")

SGD = dict(optimizer="sgd", learning_rate=0.5)
LOCAL_SGD = dict(sync_every=1, outer_optimizer="sgd", outer_lr=1.0)


@pytest.fixture(scope="module")
def sync_dp(tmp_path_factory):
  state = lmtask.run(tmp_path_factory.mktemp("dp"), "dp", {"data": 8}, **SGD)
  return jax.device_get(state.params)


@pytest.mark.parametrize("sizes", [{"node": 8, "data": 1}, {"node": 2, "data": 4}],
                         ids=["8x1", "2x4"])
def test_h1_equals_synchronous(tmp_path, sync_dp, sizes):
  """Planted bugs caught: the delta averaged with the wrong sign, or inner
  states not reset to the new global parameters after a sync."""
  state = lmtask.run(tmp_path, "diloco", sizes, diloco=LOCAL_SGD, **SGD)
  chex.assert_trees_all_close(jax.device_get(state.params), sync_dp,
                              atol=2e-5, rtol=2e-5)


def test_h4_replicas_diverge_then_agree(tmp_path):
  d = dict(LOCAL_SGD, sync_every=4)
  state = lmtask.run(tmp_path, "h4", {"node": 8}, num_steps=4, diloco=d, **SGD)
  inner = jax.device_get(state.comm["inner_params"])
  # Right after a sync every replica holds the global parameters.
  for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(jax.device_get(state.params))):
    for r in range(8):
      chex.assert_trees_all_close(a[r], b, atol=0, rtol=0)
  state = lmtask.run(tmp_path, "h4b", {"node": 8}, num_steps=3, diloco=d, **SGD)
  inner = jax.device_get(state.comm["inner_params"])
  emb = inner["model"]["embed_tokens"]["embedding"]
  assert float(abs(emb[0] - emb[1]).max()) > 0  # replicas trained apart


def _lowered(sizes, **kw):
  """(StableHLO text of one DiLoCo train step, the Parallel plan, abstract
  params) for a tiny LM on a mesh of `sizes`."""
  t = lmtask.tc(mesh=sizes, **kw)
  task = lmtask.task(t)
  mesh = lmtask.mesh(sizes)
  par = trainer.plan_parallel(t, mesh)
  make_state, sh = trainer.init_state(task, par.tx, mesh, parallel=par)
  batch = next(task.batches(0))
  bsh = trainer.batch_shardings_for(batch, mesh)
  step = trainer.make_train_step(task.loss_fn, mesh, sh, bsh, 1,
                                 communicator=par.communicator,
                                 diloco=par.diloco, inner_tx=par.inner_tx)
  with jax.set_mesh(mesh):
    text = step.lower(make_state(), trainer.put_batch(batch, bsh),
                      jax.random.key(0)).as_text()
  return text, par, jax.eval_shape(lambda: make_state().params)


def test_collectives_only_in_sync_branch_and_bytes():
  mesh = lmtask.mesh({"node": 8, "data": 1})
  text, par, abstract = _lowered({"node": 8, "data": 1},
                                 diloco=dict(sync_every=10), **SGD)
  # The sync branch: the regions of the one stablehlo.case op.
  assert text.count('"stablehlo.case"(') == 1
  cols = hlo.collectives(text)
  inside = [c for c in cols if c.in_branch]
  outside = [c for c in cols if not c.in_branch]
  # Outside the branch only the scalar loss metrics cross replicas (and the
  # in-node mean, over groups of 1 device on this mesh).
  assert all(c.shape == () or c.group_size == 1 for c in outside), outside
  assert len([c for c in inside if c.shape]) == 11, inside  # one per leaf
  per_sync = sum(c.bytes_on_wire for c in inside)
  assert par.wire_bytes(abstract) == pytest.approx(per_sync / 10)
  t1 = lmtask.tc(mesh={"node": 8, "data": 1}, diloco=dict(sync_every=1), **SGD)
  assert trainer.plan_parallel(t1, mesh).wire_bytes(abstract) == pytest.approx(per_sync)


MOMENTUM = dict(SGD, momentum=0.9, learning_rate=0.1)


def test_h1_with_inner_state_sync_equals_synchronous_momentum(tmp_path):
  """`sync_inner_opt` with H=1 and averaging outer is synchronous momentum
  SGD on the mean gradient (planted: a psum instead of a mean of the
  momenta fails it)."""
  dp = jax.device_get(lmtask.run(tmp_path, "dp", {"data": 8},
                                 **MOMENTUM).params)
  on = lmtask.run(tmp_path, "on", {"node": 8, "data": 1},
                  diloco=dict(LOCAL_SGD, sync_inner_opt=True), **MOMENTUM)
  chex.assert_trees_all_close(jax.device_get(on.params), dp, atol=2e-5,
                              rtol=2e-5)


def test_inner_state_sync_gives_every_replica_the_mean_momentum(tmp_path):
  """H=2, 4 steps (the last one a sync): with `sync_inner_opt` every replica
  holds the same momentum, the mean of theirs; without it (the DiLoCo
  default) each keeps its own (planted: the flag ignored)."""
  moms = {}
  for flag in (False, True):
    d = dict(LOCAL_SGD, sync_every=2, sync_inner_opt=flag)
    st = lmtask.run(tmp_path, f"m{flag}", {"node": 8, "data": 1}, diloco=d,
                    **MOMENTUM)
    moms[flag] = [x for x in jax.tree.leaves(jax.device_get(
        st.comm["inner_opt"])) if x.dtype.kind == "f"]
  assert moms[True] and len(moms[True]) == len(moms[False])
  for leaf in moms[True]:
    for r in range(1, 8):
      chex.assert_trees_all_close(leaf[r], leaf[0], atol=0, rtol=0)
  assert max(float(abs(x[1] - x[0]).max()) for x in moms[False]) > 1e-6


def test_inner_state_sync_bytes_match_the_program():
  """The bytes `sync_inner_opt` adds (one all-reduce per momentum leaf) are
  the ones in the lowered sync branch."""
  texts, pars = [], []
  for flag in (False, True):
    text, par, abstract = _lowered(
        {"node": 2, "data": 4}, **MOMENTUM,
        diloco=dict(sync_every=5, sync_inner_opt=flag))
    texts.append(text)
    pars.append(par)
  for text, par in zip(texts, pars):
    inside = [c for c in hlo.collectives(text)
              if c.in_branch and c.group_size == 2]
    assert par.wire_bytes(abstract) == pytest.approx(
        sum(c.bytes_on_wire for c in inside) / 5)
  n_params = len(jax.tree.leaves(abstract))
  assert (len([c for c in hlo.collectives(texts[1]) if c.in_branch])
          == len([c for c in hlo.collectives(texts[0]) if c.in_branch])
          + n_params)


def test_lr_schedule_places_the_same_number_of_syncs():
  """schedule="lr": n = T // H syncs, the last after the final step, each
  phase an equal share of the learning-rate mass (to within one step's);
  with a constant rate it is the fixed schedule, and lr_power=0 spaces the
  syncs evenly whatever the rate."""
  d = steps_lib.DilocoConfig(sync_every=20, schedule="lr")
  const = steps_lib.resolve_sync_steps(d, 0.1, 300).sync_at
  assert const == tuple(range(19, 300, 20))
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 30, 300, end_value=0.01)
  at = np.array(steps_lib.resolve_sync_steps(d, lr, 300).sync_at)
  assert len(at) == 15 and at[-1] == 299 and (np.diff(at) > 0).all()
  w = np.asarray(lr(np.arange(300)))
  mass = np.diff(np.r_[0.0, np.cumsum(w)[at]])
  assert np.abs(mass - w.sum() / 15).max() <= w.max() + 1e-9
  gaps = np.diff(np.r_[-1, at])
  assert gaps[1] < 20 < gaps[-1]  # Short at the peak, long in the tail.
  even = steps_lib.resolve_sync_steps(
      dataclasses.replace(d, lr_power=0.0), lr, 300).sync_at
  assert even == const
  fixed = steps_lib.DilocoConfig(sync_every=20)
  assert steps_lib.resolve_sync_steps(fixed, lr, 300).sync_at == ()
  # More syncs asked than steps left after the rounding: still increasing.
  tight = steps_lib.resolve_sync_steps(
      steps_lib.DilocoConfig(sync_every=1, schedule="lr"), lr, 7).sync_at
  assert tight == tuple(range(7))


def test_step_syncs_exactly_at_the_scheduled_steps(tmp_path):
  """The trained run's `diloco/synced` metric is on at the resolved
  `sync_at` steps and nowhere else (planted: the table ignored, or off by
  one step)."""
  kw = dict(SGD, num_steps=9, lr_schedule="cosine", warmup_steps=3,
            learning_rate=0.2)
  d = dict(LOCAL_SGD, sync_every=3, schedule="lr")
  t = lmtask.tc(mesh={"node": 8, "data": 1}, diloco=d, **kw)
  want = trainer.plan_parallel(t, lmtask.mesh({"node": 8})).diloco.sync_at
  assert len(want) == 3 and want != (2, 5, 8)
  lmtask.run(tmp_path, "lr", {"node": 8, "data": 1}, diloco=d, **kw)
  with open(tmp_path / "lr" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  synced = tuple(r["step"] - 1 for r in rows
                 if r.get("diloco/synced", 0) > 0.5)
  assert synced == want


def test_config_errors():
  with pytest.raises(ValueError, match="diloco.schedule"):
    steps_lib.DilocoConfig(sync_every=2, schedule="cosine")
  with pytest.raises(ValueError, match="sync_at"):
    steps_lib.DilocoConfig(sync_every=2, sync_at=(3, 3))
  with pytest.raises(ValueError, match="lr_power"):
    steps_lib.DilocoConfig(sync_every=2, lr_power=-1)
  with pytest.raises(ValueError, match="sync_every"):
    steps_lib.DilocoConfig(sync_every=-1)
  with pytest.raises(ValueError, match="outer_optimizer"):
    steps_lib.DilocoConfig(outer_optimizer="adam")
  with pytest.raises(ValueError, match="unknown diloco"):
    steps_lib.DilocoConfig.from_dict({"H": 3})
  t = lmtask.tc(mesh={"node": 2, "fsdp": 4}, diloco=dict(sync_every=2))
  with pytest.raises(ValueError, match="fsdp"):
    trainer.plan_parallel(t, lmtask.mesh({"node": 2, "fsdp": 4}))
  with pytest.raises(ValueError, match="outer_comm"):
    lmtask.tc(diloco=dict(sync_every=2), comm=dict(name="bf16"))
