"""Orbax checkpointing with automatic resume.

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves no half-written checkpoint that could be
resumed: the next run resumes from the last finalized step.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the model."""


class Checkpointer:
  """One CheckpointManager under `workdir/ckpt` saving {state, meta}."""

  def __init__(
      self,
      workdir: str,
      *,
      save_every: int = 500,
      max_to_keep: int = 2,
      async_save: bool = True,
  ):
    self.directory = os.path.abspath(os.path.join(workdir, "ckpt"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=max(1, save_every),
            enable_async_checkpointing=async_save,
            create=True,
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False):
    """Saves {state, meta}; a TrainState's device-local `comm` goes apart.

    The `comm` item (error-feedback residuals, DiLoCo replicas) depends on
    the device count, so it is stored as its own item and `restore` loads it
    only onto the same count (`meta["comm_devices"]`).
    """
    items = {"meta": ocp.args.JsonSave(meta)}
    comm = getattr(state, "comm", None)
    if comm is not None:
      items["comm"] = ocp.args.StandardSave(comm)
      state = state.replace(comm=None)
    items["state"] = ocp.args.StandardSave(state)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any,
              comm_devices: int | None = None) -> tuple[Any, dict]:
    """Restores `step` onto the shardings of `abstract_state`.

    Parameters and optimizer state reshard onto any mesh. A TrainState's
    `comm` is restored only when the checkpoint holds one written for
    `comm_devices` devices; otherwise it comes back as None and the caller
    re-initialises it (policy "reset": zero residuals, replicas = global).
    """
    path = os.path.join(self.directory, str(step))
    comm_abs = getattr(abstract_state, "comm", None)
    if comm_abs is not None:
      abstract_state = abstract_state.replace(comm=None)
    try:
      out = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore(),
          ),
      )
      state, meta = out.state, dict(out.meta)
      if (comm_abs is not None and os.path.isdir(os.path.join(path, "comm"))
          and meta.get("comm_devices") == comm_devices):
        comm = self.manager.restore(
            step, args=ocp.args.Composite(comm=ocp.args.StandardRestore(comm_abs))
        ).comm
        state = state.replace(comm=comm)
    except Exception as e:  # orbax raises many types; name the file.
      raise CheckpointError(
          f"cannot restore checkpoint {path}: {type(e).__name__}: {e}. The"
          " files are corrupt or were written by a different model config."
          f" Delete {path} to resume from an earlier step, or use a new"
          " --workdir to start over."
      ) from e
    return state, meta

  def restore_latest(self, abstract_state: Any, comm_devices: int | None = None):
    """(state, meta, step) of the newest checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    state, meta = self.restore(step, abstract_state, comm_devices)
    return state, meta, step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`, the restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )
