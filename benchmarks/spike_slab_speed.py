r"""SVI step speed: our NumPyro model + guide against a plain-JAX ELBO.

  .venv/bin/python benchmarks/spike_slab_speed.py [--steps 200]

Both train the same spike-and-slab network (ReLU regression, batch 128) with
Adam, one jitted step each; the NumPyro side is numpyro.infer.SVI with
TraceMeanField_ELBO and the registered closed-form KLs (the library's public
model), the plain-JAX side is `spike_slab.core.loss_fn` (the fast path). The
first 5 steps (compilation, warm-up) are excluded. Prints ms/step, steps/s
and the ratio; record the output in benchmarks/RESULTS.md.
"""

import argparse
import platform
import time

import jax
import numpy as np
import optax
from numpyro.infer import SVI, TraceMeanField_ELBO

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import model as npm
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def _time(step, state, xs, ys, steps):
  for i in range(5):
    state, loss = step(state, xs[i], ys[i], i)
  jax.block_until_ready(loss)
  t = time.perf_counter()
  for i in range(steps):
    state, loss = step(state, xs[i % len(xs)], ys[i % len(ys)], i + 5)
  jax.block_until_ready(loss)
  return (time.perf_counter() - t) / steps


def bench(widths, steps, batch=128, n=4096):
  cfg = SpikeSlabConfig(widths=widths)
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(16, batch, widths[0])).astype(np.float32)
  ys = rng.normal(size=(16, batch)).astype(np.float32)
  params = core.init(jax.random.key(0), cfg)
  tx = optax.adam(1e-3)

  # Plain JAX: closed-form ELBO, optax update, one jitted step.
  @jax.jit
  def jax_step(carry, x, y, i):
    p, o = carry
    key = jax.random.fold_in(jax.random.key(1), i)
    (loss, _), g = jax.value_and_grad(core.loss_fn, has_aux=True)(
        p, {"x": x, "y": y}, key, cfg=cfg, num_data=n, step=i,
        total_steps=1000)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  t_jax = _time(jax_step, (params, tx.init(params)), xs, ys, steps)

  # NumPyro: the library's model + custom guide through numpyro's SVI.
  svi = SVI(npm.make_model(cfg), npm.make_guide(cfg), tx, TraceMeanField_ELBO())
  state = svi.init(jax.random.PRNGKey(1), xs[0], ys[0], num_data=n,
                   init_params=npm.to_numpyro_params(params))

  @jax.jit
  def npy_step(state, x, y, i):
    return svi.update(state, x, y, num_data=n,
                      temperature=cfg.tau, kl_weight=1.0)

  t_npy = _time(npy_step, state, xs, ys, steps)
  return t_npy, t_jax


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=200)
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}),"
        f" float32, jax {jax.__version__}")
  print("| network | NumPyro SVI ms/step | plain JAX ms/step | NumPyro steps/s |"
        " plain JAX steps/s | NumPyro / plain-JAX time |")
  print("|---|---|---|---|---|---|")
  for widths, steps in (((20, 50, 50, 1), args.steps),
                        ((784, 400, 400, 1), max(20, args.steps // 4))):
    t_npy, t_jax = bench(widths, steps)
    print(f"| {'-'.join(map(str, widths))} | {1e3 * t_npy:.2f} | {1e3 * t_jax:.2f}"
          f" | {1 / t_npy:.0f} | {1 / t_jax:.0f} | {t_npy / t_jax:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
