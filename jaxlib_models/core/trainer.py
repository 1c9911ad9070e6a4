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
import os
from collections.abc import Callable, Iterator
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

  def __post_init__(self):
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

  @classmethod
  def from_dict(cls, d) -> "TrainConfig":
    d = dict(d)
    if "mesh" in d:
      d["mesh"] = tuple(dict(d["mesh"]).items())
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


def make_optimizer(
    tc: TrainConfig, lr_scales=None
) -> optax.GradientTransformation:
  if tc.optimizer == "adam":
    opt = optax.adam(tc.learning_rate)
  elif tc.optimizer == "adamw":
    opt = optax.adamw(tc.learning_rate, weight_decay=tc.weight_decay)
  else:
    opt = optax.sgd(tc.learning_rate)
  if tc.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  if lr_scales is not None:
    opt = optax.chain(opt, scale_by_tree(lr_scales))
  return opt


def _mean_tree(trees):
  return jax.tree.map(lambda x: x / trees[1], trees[0])


def make_train_step(
    loss_fn,
    mesh: jax.sharding.Mesh,
    state_shardings,
    batch_shardings,
    accum_steps: int = 1,
):
  """Builds the jitted `train_step(state, batch, rng) -> (state, metrics)`.

  With `accum_steps == 1` the gradient is taken on the global batch and XLA
  inserts the data-parallel reduction. With more microbatches the local
  gradients are summed inside `jax.shard_map` and reduced with one `pmean`
  after the microbatch loop: one gradient sync per step whatever the count.
  """

  def grads_of(params, batch, rng, step):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, rng, step
    )
    return grads, {"train/loss": loss, **aux}

  def accumulated(params, batch, rng, step):
    def split(x):
      return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])

    micro = jax.tree.map(split, batch)
    # Varying copies: otherwise the transpose of the replicated parameters
    # inserts a psum in every microbatch; we want one pmean after the loop.
    params = jax.lax.pcast(params, mesh_lib.BATCH_AXES, to="varying")

    def body(carry, mb):
      g, m = grads_of(params, mb, rng, step)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng, step)
    zeros = jax.tree.map(
        lambda s: jax.lax.pcast(
            jnp.zeros(s.shape, s.dtype), mesh_lib.BATCH_AXES, to="varying"
        ),
        zeros,
    )
    (g, m), _ = jax.lax.scan(body, zeros, micro)
    g, m = jax.tree.map(lambda x: x / accum_steps, (g, m))
    # The one gradient sync of the step.
    return jax.lax.pmean((g, m), mesh_lib.BATCH_AXES)

  if accum_steps > 1:
    batch_spec = jax.tree.map(lambda s: s.spec, batch_shardings)
    compute = jax.shard_map(
        accumulated,
        mesh=mesh,
        in_specs=(P(), batch_spec, P(), P()),
        out_specs=P(),
    )
  else:
    compute = grads_of

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grads, metrics = compute(state.params, batch, rng, state.step)
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


def init_state(task: Task, tx, mesh, rules=mesh_lib.DEFAULT_RULES, seed=0):
  """Compiles sharded initialisation; returns (init_fn, state_shardings).

  Nothing is materialised here: `init_fn()` builds the state directly in its
  shardings (no full copy on one device), and the shardings alone serve as
  the restore target when a checkpoint exists.
  """
  rng = jax.random.key(seed)
  abstract = jax.eval_shape(task.init_params, rng)
  param_sh = mesh_lib.tree_shardings(task.param_axes, abstract, mesh, rules)

  def create(rng):
    params = task.init_params(rng)
    params = jax.lax.with_sharding_constraint(params, param_sh)
    return TrainState.create(params, tx)

  if task.pretrained is not None:
    def create_from(params):
      params = jax.lax.with_sharding_constraint(params, param_sh)
      return TrainState.create(params, tx)

    create_jit = jax.jit(create_from)
    with jax.set_mesh(mesh):
      compiled = create_jit.lower(abstract).compile()
    shardings = compiled.output_shardings.replace(params=param_sh)

    def make():  # traceable (train() takes its eval_shape)
      params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype),
                            task.pretrained(), abstract)
      return create_jit(jax.device_put(params, param_sh))

    return make, shardings
  with jax.set_mesh(mesh):
    compiled = jax.jit(create).lower(rng).compile()
  shardings = compiled.output_shardings
  shardings = shardings.replace(params=param_sh)
  return (lambda: compiled(rng)), shardings


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
  tx = make_optimizer(tc, task.lr_scales)
  make_state, state_sh = init_state(task, tx, mesh, rules, tc.seed)
  ckpt = ckpt_lib.Checkpointer(
      workdir,
      save_every=tc.checkpoint_every,
      max_to_keep=tc.keep_checkpoints,
      async_save=tc.async_checkpoint,
  )
  # Resume order: 1. latest checkpoint in workdir, 2. fresh initialisation.
  abstract = jax.eval_shape(make_state)
  restored = ckpt.restore_latest(ckpt_lib.abstract_like(abstract, state_sh))
  if restored is not None:
    state, meta, start = restored
    logging.info("resumed from step %d (%s)", start, ckpt.directory)
    print(f"resumed from step {start} ({ckpt.directory})", flush=True)
  else:
    state, start = make_state(), 0

  batches = task.batches(start)
  first = next(batches)
  batch_sh = batch_shardings_for(first, mesh)
  step_fn = make_train_step(task.loss_fn, mesh, state_sh, batch_sh, tc.accum_steps)
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
          ckpt.save(done, state, {**meta, "step": done}, force=True)
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
  tx = make_optimizer(tc, task.lr_scales)
  make_state, state_sh = init_state(task, tx, mesh, seed=seed)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  if not os.path.isdir(ckpt.directory) or ckpt.latest_step() is None:
    raise ckpt_lib.CheckpointError(
        f"no checkpoint in {ckpt.directory}; train first with"
        f" python -m train --config ... --workdir {workdir}"
    )
  abstract = jax.eval_shape(make_state)
  state, meta, step = ckpt.restore_latest(ckpt_lib.abstract_like(abstract, state_sh))
  ckpt.close()
  return state, meta, step
