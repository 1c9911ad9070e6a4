"""The generic sharded training loop every method of the library uses.

A method hands over a `Task` (how to initialise parameters, a loss, logical
axis names of the parameters, a resumable batch source); `train` does the
rest: mesh, sharded initialisation, one jitted and donated train step,
gradient accumulation with one gradient sync per step, checkpoints that
resume automatically, metrics, progress and the NaN/Inf guard.

Loss contract: `loss_fn(params, batch, rng, step) -> (loss, aux)` returns a
mean over the batch's examples plus terms that do not depend on the batch,
so the mean over shards and microbatches equals the full-batch loss. `rng` is
the same on every shard and microbatch (the step key), so a method's weight
noise does not depend on how the batch is split.
"""

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlib_models.core import checkpoint as ckpt_lib
from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.core import metrics as metrics_lib
from jaxlib_models.core.train_state import TrainState

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and loop settings shared by every method."""

  num_steps: int = 1000
  batch_size: int = 128  # Global batch, split over the data and fsdp axes.
  learning_rate: float = 1e-3
  optimizer: str = "adam"  # adam | adamw | sgd
  momentum: float = 0.0  # sgd only; 0 = plain SGD.
  nesterov: bool = False  # sgd with momentum only.
  # Learning-rate schedule: "constant", or "cosine" (linear warmup over
  # warmup_steps, then cosine decay to lr * final_lr_frac at num_steps).
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  final_lr_frac: float = 0.1
  weight_decay: float = 0.0  # adamw only.
  grad_clip: float = 0.0  # Global-norm clipping; 0 disables.
  accum_steps: int = 1  # Microbatches per step; gradients synced once.
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  progress: bool = True  # tqdm bar; without it, JSON lines on stdout...
  console: bool = True  # ...unless this is False (quiet, e.g. in studies).
  mesh: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))
  # Parallel layout and data-parallel sync (jaxlib_models.parallel; see
  # docs/scaling.md). Logical-axis rules: None = core.mesh.DEFAULT_RULES.
  rules: tuple[tuple[str, Any], ...] | None = None
  zero1: bool = False  # Optimizer state split over the data axes.
  comm: Any = None  # parallel.CommConfig or dict; None = exact mean.
  diloco: Any = None  # parallel.DilocoConfig or dict; None = synchronous.

  def __post_init__(self):
    from jaxlib_models.parallel import comm as comm_lib  # noqa: PLC0415
    from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

    if self.comm is None:
      object.__setattr__(self, "comm", comm_lib.CommConfig())
    elif isinstance(self.comm, Mapping):
      object.__setattr__(self, "comm", comm_lib.CommConfig.from_dict(self.comm))
    if self.diloco is None:
      object.__setattr__(self, "diloco", steps_lib.DilocoConfig())
    elif isinstance(self.diloco, Mapping):
      object.__setattr__(self, "diloco", steps_lib.DilocoConfig.from_dict(self.diloco))
    if self.rules is not None:
      object.__setattr__(self, "rules", tuple(
          (k, tuple(v) if isinstance(v, list) else v)
          for k, v in (self.rules.items() if isinstance(self.rules, Mapping)
                       else self.rules)))
      for name, axes in self.rules:
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in flat if a not in mesh_lib.MESH_AXES]
        if bad:
          raise ValueError(
              f"train.rules: logical axis {name!r} maps to unknown mesh axes"
              f" {bad}; mesh axes are {mesh_lib.MESH_AXES} (or None to"
              " replicate)")
    if self.comm.local_momentum > 0 and (self.momentum > 0
                                         or self.optimizer != "sgd"):
      raise ValueError(
          f"comm.local_momentum={self.comm.local_momentum} applies momentum on"
          " each device before the sync, so the optimizer must be plain SGD:"
          f" got optimizer={self.optimizer!r}, momentum={self.momentum}; set"
          " train.optimizer=sgd and train.momentum=0 (or comm.local_momentum=0)")
    if self.diloco.enabled and (self.comm.name != "none"
                                or self.comm.local_momentum > 0):
      raise ValueError(
          f"comm.name={self.comm.name!r} with diloco.sync_every>0: DiLoCo syncs"
          " inside a node exactly; compress its outer sync with"
          " diloco.outer_comm instead")
    if self.num_steps < 0:
      raise ValueError(f"{self.num_steps=} must be >= 0")
    if self.batch_size < 1 or self.accum_steps < 1:
      raise ValueError(f"{self.batch_size=} and {self.accum_steps=} must be >= 1")
    if self.batch_size % self.accum_steps:
      raise ValueError(
          f"{self.batch_size=} must be divisible by {self.accum_steps=}"
      )
    if self.learning_rate <= 0:
      raise ValueError(f"{self.learning_rate=} must be > 0")
    if self.optimizer not in ("adam", "adamw", "sgd"):
      raise ValueError(f"{self.optimizer=}: choose adam, adamw or sgd")
    if self.lr_schedule not in ("constant", "cosine"):
      raise ValueError(f"{self.lr_schedule=}: choose constant or cosine")
    if self.warmup_steps < 0 or not 0 <= self.final_lr_frac <= 1:
      raise ValueError(f"{self.warmup_steps=} must be >= 0 and"
                       f" {self.final_lr_frac=} in [0, 1]")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"{self.momentum=} must be in [0, 1)")

  @classmethod
  def from_dict(cls, d) -> "TrainConfig":
    d = dict(d)
    if "mesh" in d:
      d["mesh"] = tuple(dict(d["mesh"]).items())
    if isinstance(d.get("rules"), Mapping) and not d["rules"]:
      d["rules"] = None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown train settings {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)


@dataclasses.dataclass
class Task:
  """What a method gives the trainer."""

  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[[Any, Batch, jax.Array, jax.Array], tuple[jax.Array, dict]]
  param_axes: Any  # Pytree of logical-name tuples matching the params.
  batches: Callable[[int], Iterator[Batch]]  # start_step -> host batches.
  meta: dict = dataclasses.field(default_factory=dict)  # Saved with ckpts.
  # Optional per-parameter learning-rate multipliers (pytree like params).
  lr_scales: Any = None
  # Optional pretrained starting point (fine-tuning): returns a params pytree
  # shaped like init_params' output; it is passed to the compiled init as an
  # argument (never baked into the program as a constant).
  pretrained: Callable[[], Any] | None = None


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed factor (per-group lr)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def parallel_defaults() -> dict:
  """The parallel train settings with their defaults, for config files.

  Every method's config puts these in its `train` section so that a user can
  switch layout and sync on the command line, e.g.
  `--config.train.comm.name=powersgd --config.train.mesh.node=2`.
  """
  from jaxlib_models.parallel import comm as comm_lib  # noqa: PLC0415
  from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

  return dict(
      mesh=dict(node=1, data=-1, fsdp=1, tensor=1),
      zero1=False,
      comm=steps_lib.as_dict(comm_lib.CommConfig()),
      diloco=steps_lib.as_dict(steps_lib.DilocoConfig()),
  )


def lr_schedule(tc: TrainConfig):
  """The learning rate: a float, or an optax schedule (step -> lr)."""
  if tc.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if tc.warmup_steps else tc.learning_rate, tc.learning_rate,
        tc.warmup_steps, max(tc.num_steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.final_lr_frac)
  if tc.warmup_steps:
    return optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  return tc.learning_rate


def make_optimizer(
    tc: TrainConfig, lr_scales=None
) -> optax.GradientTransformation:
  lr = lr_schedule(tc)
  if tc.optimizer == "adam":
    opt = optax.adam(lr)
  elif tc.optimizer == "adamw":
    opt = optax.adamw(lr, weight_decay=tc.weight_decay)
  else:
    opt = optax.sgd(lr, momentum=tc.momentum or None, nesterov=tc.nesterov)
  if tc.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  if lr_scales is not None:
    opt = optax.chain(opt, scale_by_tree(lr_scales))
  return opt


def make_train_step(
    loss_fn,
    mesh: jax.sharding.Mesh,
    state_shardings,
    batch_shardings,
    accum_steps: int = 1,
    *,
    communicator=None,
    diloco=None,
    inner_tx=None,
):
  """Builds the jitted `train_step(state, batch, rng) -> (state, metrics)`.

  Plain step (accum_steps == 1, no communicator, no DiLoCo): the gradient of
  the global batch; XLA inserts the reductions the layout needs. With a
  communicator (always used for accum_steps > 1) the local gradients of the
  microbatches are summed inside `jax.shard_map` and synced by one
  communicator call per step, exact or compressed. With `diloco` enabled,
  the DiLoCo step of `parallel.steps` (needs `inner_tx`).
  """
  from jaxlib_models.parallel import comm as comm_lib  # noqa: PLC0415
  from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

  if diloco is not None and diloco.enabled:
    train_step = steps_lib.make_diloco_step(
        loss_fn, mesh, state_shardings, batch_shardings, accum_steps, diloco,
        inner_tx, communicator)
  elif communicator is not None or accum_steps > 1:
    if communicator is None:
      communicator = comm_lib.Communicator(
          comm_lib.CommConfig(), mesh_lib.BATCH_AXES, dict(mesh.shape))
    train_step = steps_lib.make_sync_step(
        loss_fn, mesh, state_shardings, batch_shardings, accum_steps,
        communicator)
  else:

    def train_step(state: TrainState, batch, rng):
      rng = jax.random.fold_in(rng, state.step)
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, batch, rng, state.step)
      metrics = {"train/loss": loss, **aux}
      grads = jax.tree.map(
          jax.lax.with_sharding_constraint, grads, state_shardings.params
      )
      metrics["grads/global_norm"] = optax.tree.norm(grads)
      return state.apply_gradients(grads), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_shardings, replicated),  # state, batch, rng
      out_shardings=(state_shardings, replicated),  # state, metrics
      donate_argnums=0,  # the previous state is dead after the call
  )


@dataclasses.dataclass
class Parallel:
  """What `plan_parallel` resolved from a train config for one mesh."""

  communicator: Any  # parallel.Communicator or None (plain jit step).
  diloco: Any  # parallel.DilocoConfig (enabled or not).
  inner_tx: Any  # DiLoCo's inner optimizer (the config's), else None.
  tx: optax.GradientTransformation  # What TrainState.tx holds.
  comm_init: Callable | None  # params -> device-local state.
  comm_specs: Callable | None  # abstract comm state -> PartitionSpecs.
  zero1: bool
  devices: int  # The device count that the comm state depends on.

  def sync_communicator(self):
    """The communicator of the gradient (or DiLoCo outer) sync; for the plain
    step, the exact mean XLA inserts, modelled over all batch devices."""
    from jaxlib_models.parallel import comm as comm_lib  # noqa: PLC0415

    return self.communicator or comm_lib.Communicator(
        comm_lib.CommConfig(), ("data",), {"data": self.devices})

  def syncs_per_step(self) -> float:
    return 1.0 / self.diloco.sync_every if self.diloco.enabled else 1.0

  def sync_collectives(self, abstract_params) -> list:
    """The collectives of one sync (`parallel.hlo.Collective`s): the
    communicator's, plus DiLoCo's inner-state mean with `sync_inner_opt`."""
    from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

    out = list(self.sync_communicator().wire_bytes_breakdown(abstract_params))
    if self.diloco.enabled and self.diloco.sync_inner_opt:
      inner = jax.eval_shape(self.inner_tx.init, abstract_params)
      out += steps_lib.inner_opt_collectives(inner, self.devices)
    return out

  def wire_bytes(self, abstract_params) -> int:
    """Bytes each device sends per optimizer step (analytic ring model)."""
    from jaxlib_models.parallel import hlo  # noqa: PLC0415

    if self.devices == 1 and self.communicator is None:
      return 0
    return (hlo.total_bytes(self.sync_collectives(abstract_params))
            * self.syncs_per_step())


def plan_parallel(tc: TrainConfig, mesh, lr_scales=None) -> Parallel:
  """Resolves the sync variant (plain, communicator, DiLoCo) for `mesh`."""
  from jaxlib_models.parallel import comm as comm_lib  # noqa: PLC0415
  from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

  opt = make_optimizer(tc, lr_scales)
  shape = dict(mesh.shape)
  n_batch = math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES)
  micro = tc.batch_size // tc.accum_steps
  if micro % n_batch:
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_lib.BATCH_AXES)
    raise ValueError(
        f"train.batch_size={tc.batch_size} (microbatch {micro} with"
        f" accum_steps={tc.accum_steps}) does not split over the {n_batch}"
        f" batch-parallel devices ({sizes}); use a microbatch that is a"
        f" multiple of {n_batch}, e.g. batch_size="
        f"{max(1, round(micro / n_batch)) * n_batch * tc.accum_steps}")
  if tc.diloco.enabled:
    steps_lib.diloco_check_mesh(mesh)
    outer = comm_lib.Communicator(tc.diloco.outer_comm, ("node",), shape)
    reps = mesh.shape["node"]
    diloco = steps_lib.resolve_sync_steps(tc.diloco, lr_schedule(tc),
                                          tc.num_steps)
    return Parallel(
        communicator=outer, diloco=diloco, inner_tx=opt,
        tx=tc.diloco.outer_tx(),
        comm_init=lambda p: steps_lib.diloco_init(p, opt, outer, reps),
        comm_specs=lambda a: steps_lib.diloco_specs(a, outer),
        zero1=False, devices=reps)
  n = math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES)
  comm = None
  if (tc.comm.name != "none" or tc.comm.hierarchical or tc.accum_steps > 1
      or tc.comm.clip_local > 0 or tc.comm.local_momentum > 0):
    if tc.comm.hierarchical:
      if mesh.shape["fsdp"] > 1:
        raise ValueError("comm.hierarchical syncs over (node, data); set mesh fsdp=1")
      axes = ("node", "data")
    else:
      axes = mesh_lib.BATCH_AXES
    comm = comm_lib.Communicator(tc.comm, axes, shape)
    if tc.comm.name != "none" and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
      logging.warning(
          "comm=%s runs the model data-parallel inside shard_map: parameters"
          " split over fsdp/tensor are gathered for the step; compression is"
          " meant for the DP and ZeRO-1 layouts", tc.comm.name)
  return Parallel(
      communicator=comm, diloco=tc.diloco, inner_tx=None, tx=opt,
      comm_init=None if comm is None else comm.init,
      comm_specs=None if comm is None else comm.state_specs,
      zero1=tc.zero1, devices=n)


def _like_params(opt_abs, params_abs, param_sh, mesh):
  """Optimizer-state shardings: a leaf that mirrors a parameter (Adam's mu
  and nu, momentum) is laid out like it; counters and scalars replicate.

  Sharding propagation alone leaves `zeros_like(params)` replicated, which
  would keep a full optimizer state on every device under FSDP.
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_abs)[0]:
    by_path[tuple(path)] = leaf.shape
  sh_by_path = {tuple(p): s for p, s in
                jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    path = tuple(path)
    for k in range(len(path)):
      suffix = path[k:]
      if suffix in by_path and by_path[suffix] == leaf.shape:
        return sh_by_path[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_abs)


def init_state(task: Task, tx, mesh, rules=mesh_lib.DEFAULT_RULES, seed=0,
               parallel: Parallel | None = None):
  """Compiles sharded initialisation; returns (init_fn, state_shardings).

  Nothing is materialised here: `init_fn()` builds the state directly in its
  shardings (no full copy on one device), and the shardings alone serve as
  the restore target when a checkpoint exists. `parallel` adds the
  device-local comm state and the ZeRO-1 optimizer-state layout.
  """
  from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

  rng = jax.random.key(seed)
  abstract = jax.eval_shape(task.init_params, rng)
  param_sh = mesh_lib.tree_shardings(task.param_axes, abstract, mesh, rules)
  comm_init = parallel.comm_init if parallel is not None else None

  def from_params(params):
    params = jax.lax.with_sharding_constraint(params, param_sh)
    comm = comm_init(params) if comm_init is not None else None
    return TrainState.create(params, tx, comm)

  if task.pretrained is not None:
    build = from_params
    arg = abstract
  else:
    build = lambda r: from_params(task.init_params(r))
    arg = rng
  with jax.set_mesh(mesh):
    compiled = jax.jit(build).lower(arg).compile()
  state_abs = jax.eval_shape(build, arg)
  shardings = compiled.output_shardings.replace(
      params=param_sh,
      opt_state=_like_params(state_abs.opt_state, abstract, param_sh, mesh))
  if parallel is not None and parallel.zero1:
    shardings = shardings.replace(opt_state=steps_lib.zero1_shardings(
        shardings.opt_state, state_abs.opt_state, mesh))
  if comm_init is not None:
    specs = parallel.comm_specs(state_abs.comm)
    shardings = shardings.replace(comm=jax.tree.map(
        lambda sp: NamedSharding(mesh, sp), specs,
        is_leaf=lambda x: isinstance(x, P)))
  build_jit = jax.jit(build, out_shardings=shardings)

  if task.pretrained is not None:
    def make():  # traceable (train() takes its eval_shape)
      params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype),
                            task.pretrained(), abstract)
      return build_jit(jax.device_put(params, param_sh))

    return make, shardings
  return (lambda: build_jit(rng)), shardings


def batch_shardings_for(batch: Batch, mesh) -> dict:
  return {
      k: NamedSharding(
          mesh,
          mesh_lib.logical_to_spec(
              ("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), mesh
          ),
      )
      for k, v in batch.items()
  }


def put_batch(batch: Batch, shardings) -> dict:
  """Global host batch -> sharded arrays; each host sends only its shards.

  Every host draws the same (deterministic) global batch, so this is also
  correct with several processes.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
  return out


def _check_finite(step: int, host: dict, ckpt_dir: str, last_saved) -> None:
  bad = {k: v for k, v in host.items() if not np.all(np.isfinite(v))}
  if bad:
    raise FloatingPointError(
        f"non-finite metrics at step {step}: {bad}. Last saved checkpoint:"
        f" step {last_saved} in {ckpt_dir}. Lower the learning rate, enable"
        " grad_clip, or check the data for NaN/Inf."
    )


def train(
    task: Task,
    tc: TrainConfig,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    config_json: str | None = None,
) -> TrainState:
  """Trains `task` for `tc.num_steps`, resuming from `workdir` if possible."""
  mesh = mesh or mesh_lib.make_mesh(dict(tc.mesh))
  os.makedirs(workdir, exist_ok=True)
  if config_json is not None and jax.process_index() == 0:
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(config_json)
    os.replace(tmp, os.path.join(workdir, "config.json"))
  logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
  par = plan_parallel(tc, mesh, task.lr_scales)
  make_state, state_sh = init_state(task, par.tx, mesh, tc.rules or rules,
                                    tc.seed, par)
  ckpt = ckpt_lib.Checkpointer(
      workdir,
      save_every=tc.checkpoint_every,
      max_to_keep=tc.keep_checkpoints,
      async_save=tc.async_checkpoint,
  )
  # Resume order: 1. latest checkpoint in workdir, 2. fresh initialisation.
  abstract = jax.eval_shape(make_state)
  restored = ckpt.restore_latest(ckpt_lib.abstract_like(abstract, state_sh),
                                 comm_devices=par.devices)
  if restored is not None:
    state, meta, start = restored
    logging.info("resumed from step %d (%s)", start, ckpt.directory)
    print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    if par.comm_init is not None and state.comm is None:
      # Saved on another device count (or without comm state): policy reset.
      print(f"comm state reset: the checkpoint was not written for"
            f" {par.devices} devices", flush=True)
      with jax.set_mesh(mesh):
        state = state.replace(comm=jax.jit(
            par.comm_init, out_shardings=state_sh.comm)(state.params))
  else:
    state, start = make_state(), 0
  wire = par.wire_bytes(abstract.params)
  if jax.process_index() == 0:
    from jaxlib_models.parallel import steps as steps_lib  # noqa: PLC0415

    print(f"layout: {steps_lib.layout_summary(mesh, par.zero1, tc.comm, tc.diloco)};"
          f" gradient bytes sent per device per step: {wire:,.0f}", flush=True)

  batches = task.batches(start)
  first = next(batches)
  batch_sh = batch_shardings_for(first, mesh)
  step_fn = make_train_step(
      task.loss_fn, mesh, state_sh, batch_sh, tc.accum_steps,
      communicator=par.communicator, diloco=par.diloco, inner_tx=par.inner_tx)
  rng = jax.random.key(tc.seed + 1)
  writer = metrics_lib.MetricsWriter(
      workdir, tc.num_steps, start, tc.log_every, progress=tc.progress,
      console=tc.console,
  )
  meta = {**task.meta, "workdir": os.path.abspath(workdir)}
  last_saved = start if restored is not None else None
  pending = None  # (step, metrics) fetched one step late: async host loop.
  try:
    with jax.set_mesh(mesh):
      for step in range(start, tc.num_steps):
        batch = first if step == start else next(batches)
        state, metrics = step_fn(state, put_batch(batch, batch_sh), rng)
        done = step + 1  # Updates applied so far.
        if pending is not None:
          host = jax.device_get(pending[1])
          _check_finite(pending[0], host, ckpt.directory, last_saved)
          if pending[0] % tc.log_every == 0:
            writer.write(pending[0], host)
        pending = (done, metrics)
        if ckpt.manager.should_save(done) or done == tc.num_steps:
          host = jax.device_get(metrics)  # Never save a non-finite state.
          _check_finite(done, host, ckpt.directory, last_saved)
          ckpt.save(done, state, {**meta, "step": done,
                                  "comm_devices": par.devices}, force=True)
          last_saved = done
      if pending is not None:
        host = jax.device_get(pending[1])
        _check_finite(pending[0], host, ckpt.directory, last_saved)
        writer.write(pending[0], host)
  finally:
    writer.close()
    ckpt.close()
  return state


def restore_params(task: Task, workdir: str, mesh=None, seed: int = 0, tc=None):
  """Loads the newest checkpoint's state for evaluation; clear error if none."""
  tc = tc or TrainConfig()
  mesh = mesh or mesh_lib.make_mesh({"data": -1})
  par = plan_parallel(tc, mesh, task.lr_scales)
  make_state, state_sh = init_state(task, par.tx, mesh, tc.rules or
                                    mesh_lib.DEFAULT_RULES, seed, par)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  if not os.path.isdir(ckpt.directory) or ckpt.latest_step() is None:
    raise ckpt_lib.CheckpointError(
        f"no checkpoint in {ckpt.directory}; train first with"
        f" python -m train --config ... --workdir {workdir}"
    )
  abstract = jax.eval_shape(make_state)
  state, meta, step = ckpt.restore_latest(
      ckpt_lib.abstract_like(abstract, state_sh), comm_devices=par.devices)
  ckpt.close()
  return state, meta, step
