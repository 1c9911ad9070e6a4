"""Posterior inclusion probabilities of edges, nodes and input features.

Brief §2.4 (../shared/methods/spike_and_slab_bnn.md): under the mean-field
Bernoulli posterior of Bai et al. (arXiv 2011.07439) the probability that a
node has at least one active edge is 1 - prod_j (1 - phi_j), which is how
arXiv 2411.00273 recovers the node PIPs that per-weight inclusion "typically
loses" [reconstruction]. Products of (1 - phi) are computed as
-expm1(sum_j log_sigmoid(-theta_j)), exact and finite for |theta| up to at
least 40 in float32 (pitfall 9).

I: layer inputs, O: layer outputs, D: input features, K: nodes of a layer.
"""

import jax
import jax.numpy as jnp

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def _any_on(theta: jax.Array, axis: int) -> jax.Array:
  """1 - prod (1 - sigmoid(theta)) along `axis`, without cancellation."""
  return -jnp.expm1(jnp.sum(jax.nn.log_sigmoid(-theta), axis=axis))


def edge_pip(params: core.Params, cfg: SpikeSlabConfig) -> list[jax.Array]:
  """Edge inclusion probabilities phi = sigmoid(theta), one (I, O) per layer.

  Kind "node_spike_slab": an edge is active iff its target node is, so the
  node phi of shape (1, O) is broadcast to (I, O). Kind "dense": ones.

  Args:
    params: variational parameters.
    cfg: model settings.

  Returns:
    List of (d_in, d_out) arrays.
  """
  pips = []
  for l in range(cfg.num_layers):
    layer = params[core.layer_name(l)]
    shape = layer["mu"].shape
    if cfg.kind == "dense":
      pips.append(jnp.ones(shape, layer["mu"].dtype))
    else:
      pips.append(jnp.broadcast_to(jax.nn.sigmoid(layer["theta"]), shape))
  return pips


def node_pips(
    params: core.Params,
    cfg: SpikeSlabConfig,
    definition: str | None = None,
) -> list[jax.Array]:
  """Inclusion probability of every hidden node (brief §2.4).

  Kind "spike_slab": for hidden node k,
    "in": pi_in(k) = 1 - prod_{j -> k} (1 - phi_jk), some incoming edge on;
    "out": pi_out(k) = 1 - prod_{k -> m} (1 - phi_km), some outgoing edge on;
    "in_and_out": pi_in(k) * pi_out(k) (independent under mean field).
  Kind "node_spike_slab" (Jantre et al., arXiv 2108.11000): the node PIP is
  the node's own gate phi_k (the "in" part; `definition` is ignored). Kind
  "dense": ones.

  Args:
    params: variational parameters.
    cfg: model settings.
    definition: "in", "out" or "in_and_out"; default cfg.node_pip.

  Returns:
    One (d_l,) array per hidden layer l = 1 .. L.
  """
  definition = definition or cfg.node_pip
  if definition not in ("in", "out", "in_and_out"):
    raise ValueError(f"unknown node PIP {definition=}")
  pips = []
  for l in range(1, cfg.num_layers):
    theta_in = params.get(core.layer_name(l - 1), {}).get("theta")
    if cfg.kind == "dense":
      pips.append(jnp.ones((cfg.widths[l],), jnp.float32))
    elif cfg.kind == "node_spike_slab":
      pips.append(jax.nn.sigmoid(theta_in[0]))
    else:
      theta_out = params[core.layer_name(l)]["theta"]
      pi_in_K = _any_on(theta_in, axis=0)
      pi_out_K = _any_on(theta_out, axis=1)
      pips.append(
          {"in": pi_in_K, "out": pi_out_K, "in_and_out": pi_in_K * pi_out_K}[
              definition
          ]
      )
  return pips


def feature_pip(params: core.Params, cfg: SpikeSlabConfig) -> jax.Array:
  """Input-feature PIP pi_feat(i) = 1 - prod_k (1 - phi_ik) (brief §2.4).

  Over the first-layer edges of feature i. Kinds "node_spike_slab" and
  "dense" have no per-edge gates on the inputs, so every feature has PIP 1
  (they do not select features).

  Args:
    params: variational parameters.
    cfg: model settings.

  Returns:
    (p,) array.
  """
  if cfg.kind != "spike_slab":
    return jnp.ones((cfg.widths[0],), jnp.float32)
  return _any_on(params[core.layer_name(0)]["theta"], axis=1)


def keep_masks(
    params: core.Params,
    cfg: SpikeSlabConfig,
    threshold: float | None = None,
) -> tuple[jax.Array, list[jax.Array]]:
  """Which features and hidden nodes survive pruning (brief §2.5).

  Features: pi_feat > t. Hidden nodes, cfg.node_rule "pip": node PIP > t
  (definition cfg.node_pip); "mpm_edges": some incoming edge has phi > t
  (t = 0.5, the median probability model of Barbieri & Berger 2004, is the
  rule of the brief; node kind: the node's phi > t). Features always use
  pi_feat.

  Args:
    params: variational parameters.
    cfg: model settings.
    threshold: t; default cfg.threshold.

  Returns:
    (feature_keep (p,) bool, [node_keep (d_l,) bool per hidden layer]).
  """
  t = cfg.threshold if threshold is None else threshold
  feature_keep = feature_pip(params, cfg) > t
  if cfg.node_rule == "pip":
    node_keeps = [pi > t for pi in node_pips(params, cfg)]
  elif cfg.node_rule == "mpm_edges":
    edges = edge_pip(params, cfg)
    node_keeps = [
        jnp.any(edges[l - 1] > t, axis=0) for l in range(1, cfg.num_layers)
    ]
  else:
    raise ValueError(f"unknown {cfg.node_rule=}")
  return feature_keep, node_keeps
