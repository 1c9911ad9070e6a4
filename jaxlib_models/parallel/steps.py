"""Train steps for the data-parallel sync variants, and the ZeRO-1 layout.

`core.trainer` picks one of three steps from the train config:

- the plain step (in the trainer): the loss of the global batch under `jit`;
  XLA inserts the collectives that the parameter layout needs (all-reduce for
  DP and TP, all-gather and reduce-scatter for FSDP);
- `make_sync_step`: gradients of this device's microbatches inside
  `jax.shard_map`, then exactly one call of a `comm.Communicator` (exact or
  compressed mean, flat or hierarchical) per optimizer step;
- `make_diloco_step`: DiLoCo / local SGD. Each replica (a slice of the
  "node" mesh axis) takes inner optimizer steps with an exact gradient mean
  inside its node only; every `sync_every` steps the replicas average the
  parameter delta (optionally compressed) and an outer optimizer (Nesterov
  SGD by default) updates the global parameters.

ZeRO-1 (`zero1_shardings`): parameters stay replicated over the data axes,
the optimizer state is split over them; XLA then updates each shard locally
and all-gathers the new parameters.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.parallel import comm as comm_lib
from jaxlib_models.parallel import hlo

OUTER_OPTIMIZERS = ("nesterov", "sgd")
SYNC_SCHEDULES = ("fixed", "lr")


@dataclasses.dataclass(frozen=True)
class DilocoConfig:
  """DiLoCo / local SGD settings (train config key `diloco`).

  Replicas live on the "node" mesh axis: set e.g. mesh node=8 for 8
  single-device replicas, or node=2, data=4 for two replicas of 4 devices
  each (exact gradient mean inside a replica, every step).
  """

  sync_every: int = 0  # H inner steps per outer step; 0 = off (synchronous).
  # Outer optimizer on the averaged pseudo-gradient theta - theta_inner.
  # Defaults are MaxText's (outer lr 0.3, momentum 0.9, Nesterov); the DiLoCo
  # paper reports H=500 and outer lr 0.7 (not verified here). Local SGD is
  # outer_optimizer="sgd", outer_lr=1.0 (plain parameter averaging).
  outer_optimizer: str = "nesterov"
  outer_lr: float = 0.3
  outer_momentum: float = 0.9
  # Post-local SGD: synchronise every step for the first `warmup_steps`.
  warmup_steps: int = 0
  # Also average the replicas' inner optimizer states (e.g. momentum buffers)
  # at every outer sync, exactly (f32), so that each replica restarts from
  # the same parameters *and* momentum. Same number of syncs, more bytes per
  # sync (one more parameter-sized message per float state leaf). Not in the
  # DiLoCo paper (which keeps inner states local); off by default.
  sync_inner_opt: bool = False
  # When the replicas sync. "fixed": after every `sync_every`-th step.
  # "lr": as many syncs (num_steps // sync_every, the last one after the
  # final step), placed so that every inner phase covers an equal share of
  # sum_t lr_t ** lr_power over the run's learning-rate schedule (lr_power 1:
  # equal learning-rate mass per phase, so phases are short where the
  # learning rate peaks and long in the warm-up and at the end of a decay;
  # lr_power 0: evenly spaced). The idea: replicas drift apart by about the
  # learning-rate mass of a phase, not its step count. Not in the DiLoCo
  # paper (fixed H). On the study's LM it changed nothing measurable
  # (benchmarks/RESULTS.md, 2026-11-28).
  schedule: str = "fixed"
  lr_power: float = 1.0
  # Explicit 0-based steps after which the replicas sync (strictly
  # increasing); overrides `schedule`. Steps past the last one fall back to
  # every `sync_every`. The trainer fills it in for schedule="lr".
  sync_at: tuple = ()
  # How the pseudo-gradient travels between replicas (bf16 as in OpenDiLoCo,
  # int8, PowerSGD, ...); error feedback state is per replica.
  outer_comm: comm_lib.CommConfig = comm_lib.CommConfig()

  def __post_init__(self):
    if self.sync_every < 0:
      raise ValueError(f"diloco.sync_every={self.sync_every} must be >= 0 (0 = off)")
    if self.outer_optimizer not in OUTER_OPTIMIZERS:
      raise ValueError(
          f"diloco.outer_optimizer={self.outer_optimizer!r}: choose one of"
          f" {OUTER_OPTIMIZERS}")
    if self.outer_lr <= 0:
      raise ValueError(f"diloco.outer_lr={self.outer_lr} must be > 0")
    if not 0 <= self.outer_momentum < 1:
      raise ValueError(f"diloco.outer_momentum={self.outer_momentum} must be in [0, 1)")
    if self.warmup_steps < 0:
      raise ValueError(f"diloco.warmup_steps={self.warmup_steps} must be >= 0")
    if self.schedule not in SYNC_SCHEDULES:
      raise ValueError(f"diloco.schedule={self.schedule!r}: choose one of"
                       f" {SYNC_SCHEDULES}")
    if self.lr_power < 0:
      raise ValueError(f"diloco.lr_power={self.lr_power} must be >= 0")
    at = tuple(int(t) for t in self.sync_at)
    if any(t < 0 for t in at) or any(b <= a for a, b in zip(at, at[1:])):
      raise ValueError(f"diloco.sync_at={list(at)} must be strictly"
                       " increasing steps >= 0")
    object.__setattr__(self, "sync_at", at)
    if self.outer_comm.hierarchical:
      raise ValueError("diloco.outer_comm.hierarchical: the outer sync runs over"
                       " the node axis only; set it to False")

  @property
  def enabled(self) -> bool:
    return self.sync_every > 0

  @classmethod
  def from_dict(cls, d: Mapping) -> "DilocoConfig":
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown diloco settings {sorted(unknown)}; valid: {sorted(names)}")
    if isinstance(d.get("outer_comm"), Mapping):
      d["outer_comm"] = comm_lib.CommConfig.from_dict(d["outer_comm"])
    return cls(**d)

  def outer_tx(self) -> optax.GradientTransformation:
    if self.outer_optimizer == "nesterov":
      return optax.sgd(self.outer_lr, momentum=self.outer_momentum, nesterov=True)
    return optax.sgd(self.outer_lr)


def resolve_sync_steps(cfg: DilocoConfig, lr, num_steps: int) -> DilocoConfig:
  """`cfg` with `sync_at` filled in for schedule="lr" (else unchanged).

  Args:
    cfg: the DiLoCo settings.
    lr: the inner optimizer's learning rate: a float or an optax schedule
      (step -> lr; the inner step t uses lr(t)).
    num_steps: the run's length.

  Returns:
    The settings with `num_steps // sync_every` sync steps (at least one, the
    last at `num_steps - 1`), sync j at the first step where the running sum
    of lr_t ** lr_power reaches j / n of its total.
  """
  if not cfg.enabled or cfg.schedule == "fixed" or cfg.sync_at or num_steps < 1:
    return cfg
  n = max(1, num_steps // cfg.sync_every)
  t = np.arange(num_steps)
  rate = np.asarray(lr(t) if callable(lr) else np.full(num_steps, lr),
                    np.float64)
  w = np.abs(rate) ** cfg.lr_power
  if not w.sum() > 0:
    w = np.ones(num_steps)
  cum = np.cumsum(w) / w.sum()
  at = np.searchsorted(cum, np.arange(1, n + 1) / n - 1e-12)
  at[-1] = num_steps - 1
  for j in range(n):  # Strictly increasing, with room for the rest.
    lo = at[j - 1] + 1 if j else 0
    at[j] = min(max(at[j], lo), num_steps - n + j)
  return dataclasses.replace(cfg, sync_at=tuple(int(a) for a in at))


def as_dict(cfg) -> dict:
  """A config dataclass as nested plain dicts (for ConfigDict defaults)."""
  return dataclasses.asdict(cfg)


def zero1_shardings(shardings, abstract, mesh, axes=("node", "data")):
  """Adds the data axes to the first free divisible dim of every leaf.

  Applied to the optimizer state: each data-parallel device keeps 1/n of
  Adam's moments (ZeRO stage 1). Leaves with no divisible dimension stay as
  they are (logged by the caller's byte report, not an error).
  """

  def one(sh, leaf):
    if not leaf.shape:
      return sh
    spec = list(sh.spec) + [None] * (len(leaf.shape) - len(sh.spec))
    used = set()
    for s in spec:
      used.update((s,) if isinstance(s, str) else tuple(s or ()))
    free = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if not free:
      return sh
    size = math.prod(mesh.shape[a] for a in free)
    for i, (s, dim) in enumerate(zip(spec, leaf.shape)):
      if s is None and dim % size == 0:
        spec[i] = free[0] if len(free) == 1 else free
        return NamedSharding(mesh, P(*spec))
    return sh

  return jax.tree.map(one, shardings, abstract)


def local_grads(loss_fn, params, batch, rng, step, accum_steps: int):
  """Mean gradient and metrics over this device's microbatches, no sync.

  `params` must already be device-varying (`jax.lax.pcast`); otherwise the
  transpose of a replicated input inserts an all-reduce in every microbatch.
  """

  def grads_of(p, b):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, rng, step)
    return g, {"train/loss": loss, **aux}

  if accum_steps == 1:
    return grads_of(params, batch)

  def split(x):
    return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])

  micro = jax.tree.map(split, batch)

  def body(carry, mb):
    return jax.tree.map(jnp.add, carry, grads_of(params, mb)), None

  shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(
      lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), mesh_lib.BATCH_AXES,
                              to="varying"), shapes)
  (g, m), _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda x: x / accum_steps, (g, m))


def _specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def make_sync_step(loss_fn, mesh, state_shardings, batch_shardings,
                   accum_steps: int, communicator: "comm_lib.Communicator"):
  """`train_step(state, batch, rng)` with one communicator call per step."""
  axes = mesh_lib.BATCH_AXES
  # A state built without `parallel=` has no comm state: allowed for the
  # stateless exact mean (plain gradient accumulation), rebuilt every step.
  stateless = state_shardings.comm is None
  if stateless and communicator.cfg.name != "none":
    raise ValueError(
        f"comm={communicator.cfg.name!r} keeps state: build the train state"
        " with trainer.init_state(..., parallel=trainer.plan_parallel(...))")

  def local(params, comm_state, batch, rng, step):
    pv = jax.lax.pcast(params, axes, to="varying")
    g, m = local_grads(loss_fn, pv, batch, rng, step, accum_steps)
    m = jax.lax.pmean(m, axes)
    g, comm_state, stats = communicator(g, comm_state, jax.random.fold_in(rng, 7))
    return g, comm_state, {**m, **stats}

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    cs = communicator.init(state.params) if stateless else state.comm
    specs = communicator.state_specs(cs)
    compute = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), specs, _specs(batch_shardings), P(), P()),
        out_specs=(P(), specs, P()),
        check_vma=communicator.check_vma,
    )
    grads, cs, metrics = compute(state.params, cs, batch, rng, state.step)
    grads = jax.tree.map(jax.lax.with_sharding_constraint, grads,
                         state_shardings.params)
    metrics["grads/global_norm"] = optax.tree.norm(grads)
    state = state.apply_gradients(grads)
    return (state if stateless else state.replace(comm=cs)), metrics

  return train_step


# ----------------------------------------------------------------- DiLoCo


def _replica_mean(x):
  """Mean over the DiLoCo replicas of a float leaf (kept varying over
  "node", like the inner state it replaces); other leaves (step counts,
  equal on every replica) pass through."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return jax.lax.pcast(jax.lax.pmean(x, "node"), ("node",), to="varying")


def inner_opt_collectives(abstract_inner_opt, replicas: int) -> list:
  """The extra all-reduces of `sync_inner_opt` per sync (one per float
  leaf of one replica's inner optimizer state)."""
  return [hlo.Collective("all_reduce", tuple(x.shape), hlo.dtype_name(x.dtype),
                         replicas)
          for x in jax.tree.leaves(abstract_inner_opt)
          if jnp.issubdtype(x.dtype, jnp.floating)]


def diloco_check_mesh(mesh) -> None:
  bad = {a: mesh.shape[a] for a in ("fsdp", "tensor") if mesh.shape[a] > 1}
  if bad:
    raise ValueError(
        f"DiLoCo keeps a full parameter copy per replica; mesh axes {bad} must"
        " be 1 (use node=<replicas> and data=<devices per replica>)")


def diloco_init(params, inner_tx, outer_comm, num_replicas: int):
  """Per-replica inner parameters and optimizer states (leading replica dim)."""
  stacked = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_replicas,) + x.shape), params)
  return {
      "inner_params": stacked,
      "inner_opt": jax.vmap(inner_tx.init)(stacked),
      "outer_comm": outer_comm.init(params),
  }


def diloco_specs(comm_abstract, outer_comm) -> dict:
  lead = lambda x: P("node", *([None] * (x.ndim - 1)))
  return {
      "inner_params": jax.tree.map(lead, comm_abstract["inner_params"]),
      "inner_opt": jax.tree.map(lead, comm_abstract["inner_opt"]),
      "outer_comm": outer_comm.state_specs(comm_abstract["outer_comm"]),
  }


def make_diloco_step(loss_fn, mesh, state_shardings, batch_shardings,
                     accum_steps: int, cfg: DilocoConfig, inner_tx,
                     outer_comm: "comm_lib.Communicator"):
  """DiLoCo: H inner steps per replica, then an outer step on the mean delta.

  The state's `params` and `opt_state` are the global parameters and the
  outer optimizer state; `comm` holds the replicas' inner parameters and
  inner optimizer states (kept across syncs) and the outer communicator's
  state. Cross-replica collectives run only inside the sync branch.
  """
  diloco_check_mesh(mesh)
  inner_axes = ("data", "fsdp")
  all_axes = mesh_lib.BATCH_AXES
  outer_tx = cfg.outer_tx()
  comm_specs = _specs(state_shardings.comm)
  H, warm = cfg.sync_every, cfg.warmup_steps

  def local(theta, outer_opt, cstate, batch, rng, step):
    sq = lambda t: jax.tree.map(lambda x: x[0], t)
    ip, io = sq(cstate["inner_params"]), sq(cstate["inner_opt"])
    pv = jax.lax.pcast(ip, inner_axes, to="varying")
    g, m = local_grads(loss_fn, pv, batch, rng, step, accum_steps)
    g = jax.lax.pmean(g, inner_axes)  # Fast links: exact mean in the node.
    m = jax.lax.pmean(m, all_axes)
    upd, io = inner_tx.update(g, io, ip)
    ip = optax.apply_updates(ip, upd)

    def sync(args):
      ip, io, theta, outer_opt, ocs = args
      delta = jax.tree.map(jnp.subtract, theta, ip)
      mean, ocs, _ = outer_comm(delta, ocs, jax.random.fold_in(rng, 11))
      upd, outer_opt = outer_tx.update(mean, outer_opt, theta)
      theta = optax.apply_updates(theta, upd)
      ip = jax.lax.pcast(theta, ("node",), to="varying")
      if cfg.sync_inner_opt:
        io = jax.tree.map(_replica_mean, io)
      return ip, io, theta, outer_opt, ocs

    planned = (step + 1) % H == 0
    if cfg.sync_at:  # Explicit sync steps, then every H past the last.
      table = np.zeros(cfg.sync_at[-1] + 1, bool)
      table[list(cfg.sync_at)] = True
      last = table.size - 1
      listed = jnp.asarray(table)[jnp.minimum(step, last)]
      planned = jnp.where(step <= last, listed, planned)
    do_sync = planned | (step < warm)
    ip, io, theta, outer_opt, ocs = jax.lax.cond(
        do_sync, sync, lambda a: a,
        (ip, io, theta, outer_opt, cstate["outer_comm"]))
    ex = lambda t: jax.tree.map(lambda x: x[None], t)
    new = {"inner_params": ex(ip), "inner_opt": ex(io), "outer_comm": ocs}
    return theta, outer_opt, new, {**m, "diloco/synced": do_sync.astype(jnp.float32)}

  compute = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(), P(), comm_specs, _specs(batch_shardings), P(), P()),
      out_specs=(P(), P(), comm_specs, P()),
      check_vma=outer_comm.check_vma,
  )

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    theta, outer_opt, cstate, metrics = compute(
        state.params, state.opt_state, state.comm, batch, rng, state.step)
    return state.replace(step=state.step + 1, params=theta, opt_state=outer_opt,
                         comm=cstate), metrics

  return train_step


def comm_devices(mesh, cfg_diloco: DilocoConfig | None) -> int:
  """The device count that device-local state depends on (for resize)."""
  if cfg_diloco is not None and cfg_diloco.enabled:
    return mesh.shape["node"]
  return math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES)


def layout_summary(mesh, zero1: bool, comm: Any, diloco: DilocoConfig | None) -> str:
  sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
  parts = [f"mesh({sizes})"]
  if zero1:
    parts.append("zero1")
  if diloco is not None and diloco.enabled:
    parts.append(f"diloco(H={diloco.sync_every}, outer={diloco.outer_comm.name})")
  elif comm is not None and comm.name != "none":
    parts.append(f"comm={comm.name}{' hierarchical' if comm.hierarchical else ''}")
  return " ".join(parts)
