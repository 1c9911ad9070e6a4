"""A small MLP regression task for testing the trainer (not a method)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core import trainer


def make_task(n=256, d=8, h=16, batch=32, nan_at=None, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (np.sin(x[:, 0]) + x[:, 1] ** 2).astype(np.float32)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d, h), jnp.float32) / np.sqrt(d),
        "b1": jnp.zeros((h,), jnp.float32),
        "w2": jax.random.normal(k2, (h, 1), jnp.float32) / np.sqrt(h),
    }

  def loss_fn(params, batch, rng, step):
    # Weight noise from the step key only: independent of the batch split.
    noise = 1e-2 * jax.random.normal(rng, params["w1"].shape)
    hid = jax.nn.relu(batch["x"] @ (params["w1"] + noise) + params["b1"])
    err = (hid @ params["w2"])[:, 0] - batch["y"]
    loss = jnp.mean(err**2) + 1e-3 * jnp.sum(params["w1"] ** 2)
    if nan_at is not None:
      loss = jnp.where(step >= nan_at, jnp.nan, loss)
    return loss, {"train/mse": jnp.mean(err**2)}

  def batches(start_step):
    step = start_step
    while True:
      idx = np.random.default_rng((seed, step)).choice(n, batch, replace=False)
      yield {"x": x[idx], "y": y[idx]}
      step += 1

  axes = {"w1": ("in", "out"), "b1": ("out",), "w2": ("in", None)}
  return trainer.Task(init_params, loss_fn, axes, batches)
