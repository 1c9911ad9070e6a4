"""Tests of node pruning, bias folding and feature removal (brief §8.4)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import pips
from jaxlib_models.spike_slab import prune
from jaxlib_models.spike_slab.config import SpikeSlabConfig

_ON, _OFF = 40.0, -40.0


pytestmark = pytest.mark.usefixtures("fast_compile")


def _np_forward(weights, x, activation):
  """float64 NumPy forward pass (independent of core.forward)."""
  act = {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh}[activation]
  h = np.asarray(x, np.float64)
  for l, (w, b) in enumerate(weights):
    h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    if l < len(weights) - 1:
      h = act(h)
  return h


def _hand_built(activation="relu"):
  """Net (5, 4, 4, 2) with dead inputs, dead outputs and a dead feature.

  Feature 4: every outgoing phi = 0. Hidden layer 1: node 1 has every
  incoming phi = 0 and bias 0.7 (emits a constant), node 2 every outgoing
  phi = 0. Hidden layer 2: node 0 has dead inputs and bias 0.5, node 2 dead
  outputs. Every other edge has phi = 1.
  """
  cfg = SpikeSlabConfig(
      widths=(5, 4, 4, 2), activation=activation, likelihood="classification"
  )
  params = core.init(jax.random.key(0), cfg)
  rng = np.random.default_rng(0)
  thetas = [
      np.full((a, b), _ON) for a, b in zip(cfg.widths[:-1], cfg.widths[1:])
  ]
  thetas[0][4, :] = _OFF
  thetas[0][:, 1] = _OFF
  thetas[1][2, :] = _OFF
  thetas[1][:, 0] = _OFF
  thetas[2][2, :] = _OFF
  ms = [rng.uniform(0.2, 0.6, b) for b in cfg.widths[1:]]
  ms[0][1], ms[1][0] = 0.7, 0.5
  for l in range(cfg.num_layers):
    layer = dict(params[core.layer_name(l)])
    layer["theta"] = jnp.asarray(thetas[l], jnp.float32)
    layer["mu"] = jnp.asarray(rng.normal(0, 1, layer["mu"].shape), jnp.float32)
    layer["m"] = jnp.asarray(ms[l], jnp.float32)
    params[core.layer_name(l)] = layer
  return cfg, params


class PruneTest(chex.TestCase):

  @parameterized.parameters("relu", "tanh")
  def test_pruned_mean_network_equals_unpruned(self, activation):
    """Brief §8.4: folding keeps the function; without folding it changes.

    The pruned network (widths (4, 2, 2, 2)) matches the unpruned mean
    network to 1e-6 on random inputs; with fold=False the output moves by
    more than 1e-3, so the test is sensitive. Removing feature 4 (all
    outgoing phi = 0) changes nothing. Planted bug: fold=False (or folding
    a(b) into the wrong row) fails.
    """
    cfg, params = _hand_built(activation)
    x = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    full = np.asarray(
        core.forward(core.mean_network(params, cfg), x, activation)
    )
    net = prune.prune(params, cfg)
    assert net.widths == (4, 2, 2, 2)
    np.testing.assert_array_equal(net.kept_features, [0, 1, 2, 3])
    np.testing.assert_array_equal(net.kept_nodes[0], [0, 3])
    np.testing.assert_array_equal(net.kept_nodes[1], [1, 3])
    np.testing.assert_allclose(
        np.asarray(net.forward(x)), full, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(net.forward_selected(x[:, :4])), full, rtol=1e-6, atol=1e-6
    )
    unfolded = prune.prune(params, cfg, fold=False)
    assert np.max(np.abs(np.asarray(unfolded.forward(x)) - full)) > 1e-3

  def test_prune_network_folds_only_constant_nodes(self):
    """prune_network semantics on plain weights (float64 NumPy oracle).

    Feature 0 is dropped; hidden node 1 is dropped and gets input only from
    feature 0, so after the deletion it is constant and is folded; hidden
    node 2 is dropped with live inputs and is just deleted. The result
    equals the original net with x_0 = 0 and row 2 of W_1 zeroed. Planted
    bug: testing constancy on the original (undeleted) column fails.
    """
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    w0[1:, 1] = 0.0
    b0 = np.array([0.1, 0.8, -0.3, 0.4], np.float32)
    w1 = rng.normal(size=(4, 2)).astype(np.float32)
    b1 = rng.normal(size=2).astype(np.float32)
    net = prune.prune_network(
        [(w0, b0), (w1, b1)],
        np.array([False, True, True]),
        [np.array([True, False, False, True])],
        "tanh",
    )
    x = rng.normal(size=(6, 3))
    x0 = x.copy()
    x0[:, 0] = 0.0
    w1_cut = w1.copy()
    w1_cut[2, :] = 0.0
    want = _np_forward([(w0, b0), (w1_cut, b1)], x0, "tanh")
    np.testing.assert_allclose(
        np.asarray(net.forward(x)), want, rtol=1e-5, atol=1e-6
    )
    assert net.widths == (2, 2, 2)

  def test_flops_params_and_widths(self):
    """Counts of the hand-built pruned net, worked by hand.

    Widths (4, 2, 2, 2): 4*2 + 2*2 + 2*2 = 16 multiply-adds; 16 weights +
    6 biases. Dense (5, 4, 4, 2): 20 + 16 + 8 = 44.
    """
    cfg, params = _hand_built()
    net = prune.prune(params, cfg)
    assert net.flops() == 16
    assert net.num_params == 22
    assert prune.flops_dense(cfg.widths) == 44

  def test_prune_params_matches_pruned_net_and_trains(self):
    """prune_params: the small BNN's mean network is the pruned network.

    Then loss_fn, its gradient and predict run under small_cfg (smoke part).
    Planted bug: skipping the bias-mean folding of dropped nodes fails the
    1e-6 comparison.
    """
    cfg, params = _hand_built()
    feature_keep, node_keeps = pips.keep_masks(params, cfg)
    small, small_cfg = prune.prune_params(params, cfg, feature_keep, node_keeps)
    assert small_cfg.widths == (4, 2, 2, 2)
    net = prune.prune(params, cfg)
    x = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
    got = core.forward(
        core.mean_network(small, small_cfg), x[:, :4], cfg.activation
    )
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(net.forward(x)), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(small["layer_1"]["theta"]),
        np.asarray(params["layer_1"]["theta"])[np.ix_([0, 3], [1, 3])],
    )
    batch = {"x": jnp.asarray(x[:, :4]), "y": jnp.arange(7) % 2}
    grads, aux = jax.jit(
        jax.grad(core.loss_fn, has_aux=True), static_argnames=("cfg",)
    )(
        small,
        batch,
        jax.random.key(0),
        cfg=small_cfg,
        num_data=70,
        step=1,
        total_steps=10,
    )
    chex.assert_trees_all_equal_structs(grads, small)
    chex.assert_tree_all_finite((grads, aux))
    probs = core.predict(small, jax.random.key(1), batch["x"], small_cfg, 2)
    chex.assert_shape(probs["probs"], (7, 2))

  def test_node_kind_prune_params(self):
    """Node kind: gates (1, d) restricted to kept nodes; folding matches.

    Node 1 (phi ~ 0) and node 3 (phi = 0.05) drop; prune zeroes the dropped
    nodes' incoming mean weights and folds a(m); the oracle zeroes those
    columns and evaluates the full net in NumPy. Planted bug: restricting
    theta rows instead of columns raises or fails.
    """
    cfg = SpikeSlabConfig(widths=(3, 4, 1), kind="node_spike_slab")
    params = core.init(jax.random.key(0), cfg)
    layer = dict(params["layer_0"])
    layer["theta"] = jnp.array([[3.0, _OFF, 3.0, -3.0]], jnp.float32)
    layer["m"] = jnp.array([0.1, 0.4, -0.2, 0.3], jnp.float32)
    params["layer_0"] = layer
    feature_keep, node_keeps = pips.keep_masks(params, cfg)
    np.testing.assert_array_equal(
        np.asarray(node_keeps[0]), [True, False, True, False]
    )
    small, small_cfg = prune.prune_params(params, cfg, feature_keep, node_keeps)
    assert small_cfg.widths == (3, 2, 1)
    chex.assert_shape(small["layer_0"]["theta"], (1, 2))
    weights = [
        (np.array(w), np.array(b)) for w, b in core.mean_network(params, cfg)
    ]
    weights[0][0][:, [1, 3]] = 0.0
    x = np.random.default_rng(4).normal(size=(5, 3))
    want = _np_forward(weights, x, "relu")
    got = core.forward(
        core.mean_network(small, small_cfg), jnp.asarray(x, jnp.float32), "relu"
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(
            prune.prune(params, cfg).forward(jnp.asarray(x, jnp.float32))
        ),
        want,
        rtol=1e-5,
        atol=1e-6,
    )

  def test_dense_kind_prunes_nothing(self):
    """Dense kind keeps every unit and the function (smoke test)."""
    cfg = SpikeSlabConfig(widths=(3, 4, 1), kind="dense")
    params = core.init(jax.random.key(0), cfg)
    net = prune.prune(params, cfg)
    assert net.widths == cfg.widths
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(
        np.asarray(net.forward(x)),
        np.asarray(core.forward(core.mean_network(params, cfg), x, "relu")),
        rtol=1e-6,
    )

  def test_prune_params_rejects_empty_layer(self):
    """An all-dropped hidden layer cannot become a valid config."""
    cfg = SpikeSlabConfig(widths=(3, 4, 1))
    params = core.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="at least one"):
      prune.prune_params(params, cfg, np.ones(3, bool), [np.zeros(4, bool)])

  def test_magnitude_keep(self):
    """Keeps the node_counts largest |W_in col| * |W_out row| per layer.

    Layer 1: in norms (1, 2, 3), out norms (3, 1, 1), scores (3, 2, 3):
    keep 2 -> nodes 0 and 2 (ties to the lower index). Layer 2: in norms
    (3, sqrt 2), out norms (1, 4), scores (3, 5.66): keep 1 -> node 1.
    Planted bug: ranking by the incoming norm alone keeps nodes 1, 2 and
    node 0 and fails.
    """
    w0 = np.diag([1.0, 2.0, 3.0])
    w1 = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w2 = np.array([[1.0], [4.0]])
    weights = [(w0, np.zeros(3)), (w1, np.zeros(2)), (w2, np.zeros(1))]
    masks = prune.magnitude_keep(weights, [2, 1])
    np.testing.assert_array_equal(masks[0], [True, False, True])
    np.testing.assert_array_equal(masks[1], [False, True])
    rng = np.random.default_rng(5)
    weights = [
        (rng.normal(size=(4, 6)), np.zeros(6)),
        (rng.normal(size=(6, 5)), np.zeros(5)),
        (rng.normal(size=(5, 1)), np.zeros(1)),
    ]
    masks = prune.magnitude_keep(weights, [3, 5])
    assert [int(m.sum()) for m in masks] == [3, 5]
