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
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shardings of `abstract_state`."""
    path = os.path.join(self.directory, str(step))
    try:
      out = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:  # orbax raises many types; name the file.
      raise CheckpointError(
          f"cannot restore checkpoint {path}: {type(e).__name__}: {e}. The"
          " files are corrupt or were written by a different model config."
          f" Delete {path} to resume from an earlier step, or use a new"
          " --workdir to start over."
      ) from e
    return out.state, dict(out.meta)

  def restore_latest(self, abstract_state: Any):
    """(state, meta, step) of the newest checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    state, meta = self.restore(step, abstract_state)
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
