"""Training state: step, parameters and optimizer state, one pytree."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """What a checkpoint holds. `tx` is static and is not saved.

  `comm` is device-local training state that depends on the device count:
  error-feedback residuals of a gradient communicator, DiLoCo's per-replica
  inner parameters and optimizer states (`jaxlib_models.parallel`). It is
  checkpointed as its own item and reset when a run resumes on a different
  number of devices.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  comm: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation,
             comm: Any = None) -> "TrainState":
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        tx=tx,
        comm=comm,
    )

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)
