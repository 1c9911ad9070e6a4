"""Tests of edge, node and feature inclusion probabilities (brief §8.3)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import special

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import pips
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def _with_thetas(cfg, thetas, seed=0):
  """Initial params of cfg with the given per-layer theta (float32)."""
  params = core.init(jax.random.key(seed), cfg)
  for l, theta in enumerate(thetas):
    layer = dict(params[core.layer_name(l)])
    layer["theta"] = jnp.asarray(
        np.broadcast_to(theta, layer["theta"].shape), jnp.float32
    )
    params[core.layer_name(l)] = layer
  return params


class PipsTest(chex.TestCase):

  def test_pips_match_monte_carlo_of_hard_masks(self):
    """Brief §8.3: pi_in, pi_out, pi_in_and_out, pi_feat vs 1e5 masks (4 sd).

    Widths (4, 3, 5, 2), random logits. Planted bugs: log_sigmoid(theta) in
    place of log_sigmoid(-theta), or "in_and_out" returning pi_in, fail.
    """
    cfg = SpikeSlabConfig(widths=(4, 3, 5, 2), likelihood="classification")
    rng = np.random.default_rng(0)
    thetas = [
        rng.normal(-1.0, 1.2, (a, b))
        for a, b in zip(cfg.widths[:-1], cfg.widths[1:])
    ]
    params = _with_thetas(cfg, thetas)
    n = 100_000
    masks = [
        rng.random((n,) + t.shape)
        < special.expit(
            np.asarray(params[core.layer_name(l)]["theta"], np.float64)
        )
        for l, t in enumerate(thetas)
    ]

    def check(got, draws_nk):
      p = draws_nk.mean(0)
      sd = np.sqrt(np.maximum(p * (1 - p), 1e-4) / n)
      np.testing.assert_array_less(np.abs(np.asarray(got) - p), 4 * sd)

    check(pips.feature_pip(params, cfg), masks[0].any(2))
    for d in ("in", "out", "in_and_out"):
      got = pips.node_pips(params, cfg, d)
      assert len(got) == 2
      for h in (1, 2):
        any_in, any_out = masks[h - 1].any(1), masks[h].any(2)
        mc = {"in": any_in, "out": any_out, "in_and_out": any_in & any_out}[d]
        check(got[h - 1], mc)
    for l, phi in enumerate(pips.edge_pip(params, cfg)):
      check(phi.reshape(-1), masks[l].reshape(n, -1))

  def test_saturated_logits_are_exact_and_finite(self):
    """Brief §8.3: theta = +-40 gives finite, exact PIPs in float32.

    All incoming theta = -40 (k edges): pi = 1 - (1 - sigmoid(-40))^k
    ~ k * 4.25e-18, compared at 1e-5 relative with a float64 oracle. Planted
    bug: the naive 1 - prod(1 - sigmoid(theta)) returns 0 and fails.
    """
    cfg = SpikeSlabConfig(widths=(6, 3, 1))
    theta0 = np.full((6, 3), -40.0)
    theta0[:, 2] = 40.0  # Node 2: every incoming edge on.
    theta0[0, 1] = 40.0  # Node 1: one edge on.
    params = _with_thetas(cfg, [theta0, -40.0])
    (pi_in,) = pips.node_pips(params, cfg, "in")
    (pi_out,) = pips.node_pips(params, cfg, "out")
    feat = pips.feature_pip(params, cfg)
    chex.assert_tree_all_finite((pi_in, pi_out, feat))
    tiny = special.expit(-40.0)
    want_k = lambda k: -np.expm1(k * np.log1p(-tiny))
    np.testing.assert_allclose(
        np.asarray(pi_in), [want_k(6), 1.0, 1.0], rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(pi_out), want_k(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(feat)[0], 1.0)
    np.testing.assert_allclose(np.asarray(feat)[1:], 1.0)  # Node 2 edges.
    params = _with_thetas(cfg, [-40.0, -40.0])
    np.testing.assert_allclose(
        np.asarray(pips.feature_pip(params, cfg)), want_k(3), rtol=1e-5
    )

  def test_node_kind_uses_node_gate_and_dense_is_all_ones(self):
    """Node kind: node PIP = phi_k for every definition; dense: ones.

    Planted bug: applying the per-edge "in" formula to the (1, d) node gates
    gives 1 - (1 - phi) = phi for "in" but pi_out for "out" and fails.
    """
    cfg = SpikeSlabConfig(widths=(3, 4, 2, 1), kind="node_spike_slab")
    params = _with_thetas(
        cfg, [[[-2.0, 0.0, 1.0, 3.0]], [[0.5, -0.5]], [[1.0]]]
    )
    for d in ("in", "out", "in_and_out"):
      got = pips.node_pips(params, cfg, d)
      np.testing.assert_allclose(
          np.asarray(got[0]), special.expit([-2.0, 0.0, 1.0, 3.0]), rtol=1e-6
      )
      np.testing.assert_allclose(
          np.asarray(got[1]), special.expit([0.5, -0.5]), rtol=1e-6
      )
    edges = pips.edge_pip(params, cfg)
    chex.assert_shape(edges[0], (3, 4))
    np.testing.assert_allclose(
        np.asarray(edges[0][2]), special.expit([-2.0, 0.0, 1.0, 3.0]), rtol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(pips.feature_pip(params, cfg)), 1.0
    )
    dense = SpikeSlabConfig(widths=(3, 4, 1), kind="dense")
    dparams = core.init(jax.random.key(0), dense)
    np.testing.assert_array_equal(
        np.asarray(pips.node_pips(dparams, dense)[0]), 1.0
    )
    np.testing.assert_array_equal(
        np.asarray(pips.edge_pip(dparams, dense)[1]), 1.0
    )
    fk, nk = pips.keep_masks(dparams, dense)
    assert bool(jnp.all(fk)) and bool(jnp.all(nk[0]))

  @parameterized.parameters("pip", "mpm_edges")
  def test_keep_masks_follow_the_rule(self, rule):
    """keep_masks: pi > t per rule; "pip" and "mpm_edges" disagree by design.

    Hidden node 0 has 4 incoming edges at phi = 0.2: pi_in = 0.59 > 0.5
    (kept by "pip" with definition "in") though no edge has phi > 0.5
    (dropped by "mpm_edges"). Node 1 has one edge at phi = 0.9 (kept by
    both); node 2 has all edges at 0.01 (dropped by both). Features 1-3
    have edges (0.2, 0.01, 0.01): pi_feat = 0.22, dropped. Planted bug:
    swapping the two rules fails.
    """
    cfg = SpikeSlabConfig(widths=(4, 3, 1), node_pip="in", node_rule=rule)
    lo, mid, hi = special.logit([0.01, 0.2, 0.9])
    theta0 = np.array([[mid, hi, lo]] + [[mid, lo, lo]] * 3)
    params = _with_thetas(cfg, [theta0, 3.0])
    feature_keep, (node_keep,) = pips.keep_masks(params, cfg)
    np.testing.assert_array_equal(
        np.asarray(feature_keep), [True, False, False, False]
    )
    want = {"pip": [True, True, False], "mpm_edges": [False, True, False]}
    np.testing.assert_array_equal(np.asarray(node_keep), want[rule])
    # A higher threshold drops node 0 under "pip" too.
    _, (node_keep,) = pips.keep_masks(params, cfg, threshold=0.7)
    np.testing.assert_array_equal(np.asarray(node_keep), [False, True, False])

  def test_feature_with_dead_edges_is_dropped(self):
    """pi_feat <= t drops the feature (all outgoing phi = 0.01, 3 edges).

    Planted bug: summing log_sigmoid over the wrong axis (per node instead
    of per feature) fails.
    """
    cfg = SpikeSlabConfig(widths=(3, 4, 1))
    theta0 = np.full((3, 4), special.logit(0.01))
    theta0[0, 0] = theta0[1, 3] = 3.0
    params = _with_thetas(cfg, [theta0, 3.0])
    feature_keep, _ = pips.keep_masks(params, cfg)
    np.testing.assert_array_equal(np.asarray(feature_keep), [True, True, False])
    np.testing.assert_allclose(
        float(pips.feature_pip(params, cfg)[2]), 1 - 0.99**4, rtol=1e-5
    )
