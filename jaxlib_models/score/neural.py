"""Neural score model trained by denoising score matching: the comparison.

M: batch, D: dimension, F: time features, H: hidden width.

A small MLP eps_theta(x, t) predicts the noise of X_t = X_0 + sqrt(t) Z; the
score is s_theta(x, t) = -eps_theta(x, t) / sqrt(t) (the eps-parameterisation
of DSM, loss E_{t, z} |eps_theta(X_0 + sqrt(t) z, t) - z|^2, i.e. the DSM loss
weighted by lambda(t) = t). log t ~ U[log t_min, log t_max]; by default the
sampler's own range [t0, T] for the data's n. Trained with the foundation's
trainer (optax, checkpoints, resume), so every parallel layout applies.
Oko, Akiyama, Suzuki (ICML 2023) study this estimator's rates (ReLU nets).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core import trainer


@dataclasses.dataclass(frozen=True)
class NeuralConfig:
  """Network and DSM settings."""

  hidden: tuple[int, ...] = (128, 128, 128)
  time_features: int = 16  # Sinusoidal features of log t.
  t_min: float | None = None  # None: the sampler's t0 for this n.
  t_max: float | None = None  # None: the sampler's T for this n.

  def __post_init__(self):
    if not self.hidden or min(self.hidden) < 1:
      raise ValueError(f"hidden={self.hidden} needs positive widths")
    if self.time_features < 2 or self.time_features % 2:
      raise ValueError(f"time_features={self.time_features} must be even "
                       ">= 2")


class ScoreMLP(nn.Module):
  """eps_theta(x, t): an MLP on (x, Fourier features of log t)."""

  dim: int
  hidden: tuple[int, ...]
  time_features: int

  @nn.compact
  def __call__(self, x_MD, t_M):
    half = self.time_features // 2
    freqs_F = jnp.exp(jnp.linspace(0.0, math.log(100.0), half)) / 10.0
    lt_MF = jnp.log(t_M)[:, None] * freqs_F[None]
    h = jnp.concatenate([x_MD / jnp.sqrt(1.0 + t_M)[:, None],
                         jnp.sin(lt_MF), jnp.cos(lt_MF)], axis=-1)
    for i, w in enumerate(self.hidden):
      h = nn.silu(nn.Dense(w, name=f"dense_{i}")(h))
    return nn.Dense(self.dim, name="out",
                    kernel_init=nn.initializers.zeros)(h)


def make_model(dim: int, cfg: NeuralConfig) -> ScoreMLP:
  return ScoreMLP(dim, tuple(cfg.hidden), cfg.time_features)


def score_fn(model: ScoreMLP, params):
  """(y_MD, t) -> s_theta(y, t), traceable (for the samplers)."""

  def fn(y_MD, t):
    t_M = jnp.broadcast_to(jnp.asarray(t, y_MD.dtype), y_MD.shape[:1])
    return -model.apply({"params": params}, y_MD, t_M) / jnp.sqrt(t_M)[:, None]

  return fn


def make_task(X_ND: np.ndarray, cfg: NeuralConfig, tc: trainer.TrainConfig,
              t_range: tuple[float, float], data_seed: int = 0
              ) -> trainer.Task:
  """The DSM fit of X as a trainer Task (batches resume by step)."""
  X = np.asarray(X_ND, np.float32)
  n, d = X.shape
  model = make_model(d, cfg)
  lo, hi = math.log(t_range[0]), math.log(t_range[1])

  def init_params(key):
    return model.init(key, jnp.zeros((1, d)), jnp.ones((1,)))["params"]

  def loss_fn(params, batch, rng, step):
    x0 = batch["x"]
    k1, k2 = jax.random.split(rng)
    # Per-example keys from the row index keep the loss independent of how
    # the batch is split over devices.
    logt = jax.random.uniform(k1, x0.shape[:1], x0.dtype, lo, hi)
    t = jnp.exp(logt)
    z = jax.random.normal(k2, x0.shape, x0.dtype)
    eps = model.apply({"params": params}, x0 + jnp.sqrt(t)[:, None] * z, t)
    loss = jnp.mean(jnp.sum((eps - z) ** 2, axis=-1))
    return loss, {"train/dsm": loss}

  def batches(start_step):
    step = start_step
    while True:
      idx = np.random.default_rng((data_seed, step)).integers(
          0, n, tc.batch_size)
      yield {"x": X[idx]}
      step += 1

  shapes = jax.eval_shape(init_params, jax.random.key(0))
  axes = jax.tree.map(lambda s: ("in", "out") if s.ndim == 2 else ("out",),
                      shapes)
  return trainer.Task(init_params, loss_fn, axes, batches,
                      meta={"n": n, "dim": d, "t_range": list(t_range)})


def fit(X_ND, cfg: NeuralConfig, tc: trainer.TrainConfig, workdir: str,
        t_range: tuple[float, float], data_seed: int = 0):
  """Trains (or resumes) the DSM model; returns (model, params)."""
  task = make_task(X_ND, cfg, tc, t_range, data_seed)
  state = trainer.train(task, tc, workdir)
  params = jax.device_get(state.params)
  return make_model(np.asarray(X_ND).shape[1], cfg), params
