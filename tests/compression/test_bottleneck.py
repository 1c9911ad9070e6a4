"""Factorised prior: monotone CDF, normalised PMF, aux-loss quantiles, and z
coded to real bits and back exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlib_models.compression import bottleneck, coder


def _trained(c=4, steps=400, seed=0):
  """Fits the prior to Laplace-ish latents with per-channel scales, plus the
  aux loss (what a codec's training does for z)."""
  eb = bottleneck.EntropyBottleneck(c)
  rng = np.random.default_rng(seed)
  z_data = (rng.laplace(size=(2048, c)) * np.array([0.3, 1.0, 3.0, 8.0])[:c]
            + np.array([0.0, 2.0, -1.0, 5.0])[:c]).astype(np.float32)
  params = eb.init(jax.random.key(0), jnp.zeros((1, c)))["params"]
  # As a codec does: the aux loss (quantiles) gets its own, faster optimiser.
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "aux" if "quantiles" in str(path) else "main", params)
  tx = optax.multi_transform({"main": optax.adam(1e-2),
                              "aux": optax.adam(0.3)}, labels)
  st = tx.init(params)

  def loss(p, key):
    _, lik = eb.apply({"params": p}, jnp.asarray(z_data), key, True)
    rate = -jnp.mean(jnp.sum(jnp.log2(lik), -1))
    return rate + eb.apply({"params": p}, method="aux_loss")

  @jax.jit
  def step(p, st, key):
    g = jax.grad(loss)(p, key)
    up, st = tx.update(g, st, p)
    return optax.apply_updates(p, up), st

  for i in range(steps):
    params, st = step(params, st, jax.random.key(i))
  return eb, params, z_data


def test_cdf_is_monotone_and_pmf_sums_to_one():
  """Untrained and trained: l(x) increases on a grid; the discretised PMF
  over a wide integer range sums to 1 (catches a dropped softplus)."""
  eb, params, _ = _trained(steps=200)
  x = jnp.linspace(-60, 60, 2001)
  l = eb.apply({"params": params}, jnp.broadcast_to(x, (4, 1, 2001)),
               method="logits_cdf")
  assert bool(jnp.all(jnp.diff(l, axis=-1) > 0))
  v = jnp.arange(-200, 201, dtype=jnp.float32)
  med = np.asarray(eb.apply({"params": params}, method="medians"))
  vals = jnp.asarray(v[:, None] + med[None, :])
  p = eb.apply({"params": params}, vals, method="likelihood")
  np.testing.assert_allclose(np.sum(np.asarray(p, np.float64), 0), 1.0,
                             atol=1e-4)


def test_aux_loss_moves_quantiles_to_the_tails():
  eb, params, z = _trained()
  q = np.asarray(params["quantiles"])[:, 0, :]
  # The learned range covers the data and the median sits inside it.
  assert np.all(q[:, 0] < z.min(0)) and np.all(q[:, 2] > z.max(0))
  assert np.all((q[:, 0] < q[:, 1]) & (q[:, 1] < q[:, 2]))
  aux = float(eb.apply({"params": params}, method="aux_loss"))
  p0 = eb.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  aux0 = float(eb.apply({"params": p0}, method="aux_loss"))
  assert aux < 0.2 * aux0, (aux, aux0)


def test_z_round_trip_bit_exact_with_real_rate():
  """z coded with the stored table decodes to exactly round(z - med) + med;
  real bits within 1 % of the model's -sum log2 P (float32 model vs the
  float64 table) and of the table's ideal rate."""
  eb, params, z = _trained()
  table, med = bottleneck.coding_table(eb, params)
  table = coder.CodingTable.from_arrays(table.to_arrays())  # As stored.
  data = bottleneck.encode_z(z, table, med)
  zh = bottleneck.decode_z(data, z.shape, table, med)
  want = (np.round(z - med) + med).astype(np.float32)
  np.testing.assert_array_equal(zh, want)
  _, lik = eb.apply({"params": params}, jnp.asarray(z))
  model_bits = float(-np.sum(np.log2(np.asarray(lik, np.float64))))
  real = 8 * (len(data) - 12)
  assert abs(real - model_bits) / model_bits < 0.01, (real, model_bits)


def test_unconverged_quantiles_and_wrong_channels_fail_clearly():
  eb = bottleneck.EntropyBottleneck(2, init_scale=10.0)
  params = eb.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
  params = jax.tree.map(lambda a: a, params)
  params["quantiles"] = jnp.asarray([[[-1e5, 0.0, 1e5]]] * 2)
  with pytest.raises(ValueError, match="not converged"):
    bottleneck.coding_table(eb, params)
  with pytest.raises(ValueError, match="3 channels, the bottleneck 2"):
    eb.apply({"params": params}, jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match="needs an rng"):
    eb.apply({"params": params}, jnp.zeros((5, 2)), None, True)
