"""Node pruning and feature selection from inclusion probabilities.

Brief §2.5 (../shared/methods/spike_and_slab_bnn.md), reconstructing the
compression step of arXiv 2411.00273 on the spike-and-slab BNN of Bai et al.
(arXiv 2011.07439): drop input features and hidden nodes whose PIP is at most
t, really removing rows and columns, and fold the constant output a(b_k) of a
removed node with dead inputs into the next layer's bias (pitfall 2).

I: layer inputs, O: layer outputs, D: input features, K: nodes of a layer.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import pips
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def _np_activation(activation: str):
  if activation == "relu":
    return lambda a: np.maximum(a, 0)
  if activation == "tanh":
    return np.tanh
  raise ValueError(f"unknown {activation=}")


def flops_dense(widths: Sequence[int]) -> int:
  """Multiply-adds of one forward pass per example: sum_l d_l * d_{l+1}."""
  return int(sum(a * b for a, b in zip(widths[:-1], widths[1:])))


@dataclasses.dataclass
class PrunedNet:
  """A pruned fully connected network on smaller matrices.

  Attributes:
    weights: list of (w_IO, b_O), numpy or jax arrays, already reduced.
    kept_features: int indices of the original inputs that remain.
    kept_nodes: int indices of the kept nodes, one array per hidden layer.
    activation: "relu" or "tanh" (hidden layers only).
  """

  weights: list[tuple[np.ndarray, np.ndarray]]
  kept_features: np.ndarray
  kept_nodes: list[np.ndarray]
  activation: str

  def forward_selected(self, x_BI: jax.typing.ArrayLike) -> jax.Array:
    """Forward pass on inputs that hold only the kept features."""
    return core.forward(self.weights, jnp.asarray(x_BI), self.activation)

  def forward(self, x_BD: jax.typing.ArrayLike) -> jax.Array:
    """Forward pass on inputs with all original p features."""
    x_BD = jnp.asarray(x_BD)
    return self.forward_selected(x_BD[:, jnp.asarray(self.kept_features)])

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(int(w.shape[0]) for w, _ in self.weights) + (
        int(self.weights[-1][0].shape[1]),
    )

  def flops(self) -> int:
    """Multiply-adds of one forward pass per example."""
    return flops_dense(self.widths)

  @property
  def num_params(self) -> int:
    return int(sum(np.size(w) + np.size(b) for w, b in self.weights))


def prune_network(
    weights: Sequence[tuple[jax.typing.ArrayLike, jax.typing.ArrayLike]],
    feature_keep: jax.typing.ArrayLike,
    node_keeps: Sequence[jax.typing.ArrayLike],
    activation: str,
    *,
    fold: bool = True,
) -> PrunedNet:
  """Remove features and hidden nodes from a deterministic network.

  Layers are processed from the input up. Rows of W_0 of dropped features are
  deleted. In hidden layer l a dropped node k whose incoming weights from the
  *remaining* inputs (after the earlier deletions) are all exactly zero emits
  the constant a(b_k), with b_k already holding any constant folded into it;
  with `fold` its contribution a(b_k) * W_{l+1}[k, :] is added to b_{l+1}
  before column k of W_l, b_k and row k of W_{l+1} are deleted (brief §2.5,
  step 2). A dropped node with live incoming weights is just deleted (its
  output is not constant, so nothing exact can be folded).

  Hence the pruned network computes the original one with the dropped
  features set to 0 and the outgoing rows of dropped non-constant nodes set
  to 0; it equals the original exactly when the dropped features have zero
  outgoing weights and every dropped node has zero incoming or zero outgoing
  weights.

  Args:
    weights: list of (w_IO, b_O) of the full network.
    feature_keep: (p,) bool.
    node_keeps: one (d_l,) bool per hidden layer.
    activation: hidden activation.
    fold: fold constant outputs of dropped nodes (off only to show that
      folding matters).

  Returns:
    The PrunedNet on numpy arrays (dtype of the input weights).
  """
  if len(node_keeps) != len(weights) - 1:
    raise ValueError(f"{len(node_keeps)=} != {len(weights) - 1} hidden layers")
  act = _np_activation(activation)
  ws = [np.asarray(w) for w, _ in weights]
  bs = [np.array(b, copy=True) for _, b in weights]
  kept_features = np.flatnonzero(np.asarray(feature_keep))
  w_in_IK = ws[0][kept_features, :]
  out = []
  kept_nodes = []
  for l, keep in enumerate(node_keeps):
    keep = np.asarray(keep, dtype=bool)
    b_K = bs[l]
    constant_K = ~keep & np.all(w_in_IK == 0, axis=0)
    if fold and np.any(constant_K):
      value_C = act(b_K[constant_K])
      bs[l + 1] = bs[l + 1] + value_C @ ws[l + 1][constant_K, :]
    kept = np.flatnonzero(keep)
    out.append((w_in_IK[:, kept], b_K[kept]))
    kept_nodes.append(kept)
    w_in_IK = ws[l + 1][kept, :]
  out.append((w_in_IK, bs[-1]))
  return PrunedNet(out, kept_features, kept_nodes, activation)


def prune(
    params: core.Params,
    cfg: SpikeSlabConfig,
    threshold: float | None = None,
    *,
    fold: bool = True,
) -> PrunedNet:
  """Prune the mean network (phi * mu, m) by PIP threshold (brief §2.5).

  Masks come from `pips.keep_masks`. The mean-network rows of dropped features
  and incoming columns of dropped nodes are zeroed first, so every dropped
  node is treated as emitting its constant a(m_k), which is folded into the
  next bias.

  Args:
    params: variational parameters.
    cfg: model settings.
    threshold: PIP threshold t; default cfg.threshold.
    fold: see `prune_network`.

  Returns:
    The PrunedNet.
  """
  feature_keep, node_keeps = pips.keep_masks(params, cfg, threshold)
  feature_keep = np.asarray(feature_keep)
  node_keeps = [np.asarray(k) for k in node_keeps]
  weights = [
      (np.array(w, copy=True), np.asarray(b))
      for w, b in core.mean_network(params, cfg)
  ]
  weights[0][0][~feature_keep, :] = 0
  for l, keep in enumerate(node_keeps):
    weights[l][0][:, ~keep] = 0
  return prune_network(
      weights, feature_keep, node_keeps, cfg.activation, fold=fold
  )


def prune_params(
    params: core.Params,
    cfg: SpikeSlabConfig,
    feature_keep: jax.typing.ArrayLike,
    node_keeps: Sequence[jax.typing.ArrayLike],
) -> tuple[core.Params, SpikeSlabConfig]:
  """Variational parameters restricted to kept features and nodes.

  Every dropped hidden node k is treated as emitting its mean-network constant
  a(m_k): a(m_k) * (phi * mu)[k, :] of the next layer is added to that layer's
  bias mean m before row k goes (layer by layer from the input, so folded
  constants propagate), matching `prune` on the mean network. The result can
  be fine-tuned with `core.loss_fn` and sampled with `core.predict` under the
  returned config, cfg with the new widths. Under cfg.pi0 the prior inclusion
  lambda_l is recomputed from the new fan-in (cfg.layer_inclusion); a fixed
  cfg.prior_inclusion is kept.

  Args:
    params: variational parameters.
    cfg: model settings.
    feature_keep: (p,) bool.
    node_keeps: one (d_l,) bool per hidden layer.

  Returns:
    (small_params, small_cfg).

  Raises:
    ValueError: if no feature or no node of some hidden layer is kept.
  """
  act = _np_activation(cfg.activation)
  keeps = [np.asarray(feature_keep, dtype=bool)]
  keeps += [np.asarray(k, dtype=bool) for k in node_keeps]
  if len(keeps) != cfg.num_layers:
    raise ValueError(f"need {cfg.num_layers - 1} node masks")
  if any(not k.any() for k in keeps):
    raise ValueError("every layer must keep at least one unit")
  layers = [
      {k: np.asarray(v) for k, v in params[core.layer_name(l)].items()}
      for l in range(cfg.num_layers)
  ]
  small: core.Params = {}
  for l, layer in enumerate(layers):
    rows = np.flatnonzero(keeps[l])
    cols = (
        np.flatnonzero(keeps[l + 1])
        if l + 1 < cfg.num_layers
        else np.arange(cfg.widths[-1])
    )
    if l + 1 < cfg.num_layers:
      dropped = ~keeps[l + 1]
      if np.any(dropped):
        nxt = layers[l + 1]
        w_next_IO = nxt["mu"]
        if cfg.kind != "dense":
          w_next_IO = np.asarray(jax.nn.sigmoid(nxt["theta"])) * w_next_IO
        value_C = act(layer["m"][dropped])
        nxt["m"] = nxt["m"] + (value_C @ w_next_IO[dropped, :]).astype(
            nxt["m"].dtype
        )
    new = {
        "mu": layer["mu"][np.ix_(rows, cols)],
        "rho": layer["rho"][np.ix_(rows, cols)],
        "m": layer["m"][cols],
        "rho_b": layer["rho_b"][cols],
    }
    if cfg.kind == "spike_slab":
      new["theta"] = layer["theta"][np.ix_(rows, cols)]
    elif cfg.kind == "node_spike_slab":
      new["theta"] = layer["theta"][:, cols]
    small[core.layer_name(l)] = {k: jnp.asarray(v) for k, v in new.items()}
  small["log_sigma_y"] = jnp.asarray(params["log_sigma_y"])
  widths = tuple(int(k.sum()) for k in keeps) + (cfg.widths[-1],)
  return small, dataclasses.replace(cfg, widths=widths)


def magnitude_keep(
    weights: Sequence[tuple[jax.typing.ArrayLike, jax.typing.ArrayLike]],
    node_counts: Sequence[int],
) -> list[np.ndarray]:
  """Baseline magnitude pruning of hidden nodes.

  In hidden layer l, node k scores ||W_{l-1}[:, k]||_2 * ||W_l[k, :]||_2
  (incoming column norm times outgoing row norm: a node matters only if it
  both receives and sends signal), and the node_counts[l] highest scores are
  kept (ties to the lower index).

  Args:
    weights: list of (w_IO, b_O), e.g. the mean network.
    node_counts: nodes to keep per hidden layer.

  Returns:
    One (d_l,) bool mask per hidden layer.
  """
  if len(node_counts) != len(weights) - 1:
    raise ValueError(f"{len(node_counts)=} != {len(weights) - 1}")
  masks = []
  for l, count in enumerate(node_counts):
    w_in_IK = np.asarray(weights[l][0], dtype=np.float64)
    w_out_KO = np.asarray(weights[l + 1][0], dtype=np.float64)
    score_K = np.linalg.norm(w_in_IK, axis=0) * np.linalg.norm(w_out_KO, axis=1)
    if not 0 <= count <= score_K.size:
      raise ValueError(f"cannot keep {count} of {score_K.size} nodes")
    order = np.argsort(-score_K, kind="stable")
    mask = np.zeros(score_K.shape, dtype=bool)
    mask[order[:count]] = True
    masks.append(mask)
  return masks
