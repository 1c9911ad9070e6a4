"""Settings of the spike-and-slab BNN (arXiv 2411.00273, reconstruction).

Every field the paper leaves unknown is a field here with the library's
default; see docs in README.md and ../shared/methods/spike_and_slab_bnn.md.
"""

import dataclasses
from typing import Literal

Kind = Literal["spike_slab", "node_spike_slab", "dense"]


@dataclasses.dataclass(frozen=True)
class SpikeSlabConfig:
  """Model, prior, variational and pruning settings.

  `widths` lists every layer width, inputs first and outputs last, e.g.
  (p, 50, 50, 1) for regression or (64, 100, 100, 10) for 10 classes.
  """

  widths: tuple[int, ...] = (20, 50, 50, 1)
  activation: Literal["relu", "tanh"] = "relu"
  likelihood: Literal["regression", "classification"] = "regression"
  # Which prior: per-weight spike-and-slab (the method), node-level
  # spike-and-slab (Jantre et al., arXiv 2108.11000), or a dense Gaussian BNN.
  kind: Kind = "spike_slab"
  # Prior inclusion: lambda_l = 1 - (1 - pi0)^(1 / fan_in) so that a node has
  # any incoming edge with prior probability pi0 whatever its width.
  pi0: float = 0.1
  # If set, one lambda for every layer (overrides pi0).
  prior_inclusion: float | None = None
  sigma0: float = 1.0  # Slab standard deviation.
  sigma_b: float = 1.0  # Bias prior standard deviation.
  learn_sigma_y: bool = True  # Regression noise: learned point estimate.
  sigma_y: float = 1.0  # Initial (or fixed) regression noise scale.
  tau: float = 0.5  # Concrete temperature.
  tau_start: float | None = None  # If set, anneal tau_start -> tau.
  estimator: Literal["concrete", "local_reparam"] = "concrete"
  kl_warmup_frac: float = 0.1  # KL weight ramps 0 -> 1 over this share.
  init_theta: float = 3.0  # phi = sigmoid(3) ~ 0.95: start dense, prune.
  init_rho: float = -6.0  # s = softplus(-6) ~ 2.5e-3.
  # Node PIP definition for hidden nodes, and the alternative keep rule.
  node_pip: Literal["in", "out", "in_and_out"] = "in_and_out"
  node_rule: Literal["pip", "mpm_edges"] = "pip"
  threshold: float = 0.5  # Median probability model.
  num_predictive_samples: int = 30
  # Node kind only: Jantre et al. gate hidden nodes; our layout also gives
  # the output units a gate, so its prior inclusion is ~1 (effectively none).
  output_inclusion: float = 0.9999

  def __post_init__(self):
    if len(self.widths) < 2 or min(self.widths) < 1:
      raise ValueError(f"{self.widths=} needs >= 2 positive widths")
    if not 0.0 < self.pi0 < 1.0:
      raise ValueError(f"{self.pi0=} must lie in (0, 1)")
    if self.prior_inclusion is not None and not (
        0.0 < self.prior_inclusion < 1.0
    ):
      raise ValueError(f"{self.prior_inclusion=} must lie in (0, 1)")
    if self.sigma0 <= 0 or self.sigma_b <= 0 or self.sigma_y <= 0:
      raise ValueError("sigma0, sigma_b and sigma_y must be > 0")
    if self.tau <= 0 or (self.tau_start is not None and self.tau_start <= 0):
      raise ValueError(f"{self.tau=} and {self.tau_start=} must be > 0")
    if not 0.0 <= self.kl_warmup_frac <= 1.0:
      raise ValueError(f"{self.kl_warmup_frac=} must lie in [0, 1]")
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"{self.threshold=} must lie in (0, 1)")
    if self.likelihood == "regression" and self.widths[-1] != 1:
      raise ValueError(f"regression needs one output, got {self.widths=}")
    if self.likelihood == "classification" and self.widths[-1] < 2:
      raise ValueError(f"classification needs >= 2 outputs: {self.widths=}")

  @property
  def num_layers(self) -> int:
    return len(self.widths) - 1

  def layer_inclusion(self, layer: int) -> float:
    """Prior inclusion probability lambda_l of layer `layer` (0-based)."""
    if self.prior_inclusion is not None and not (
        self.kind == "node_spike_slab" and layer == self.num_layers - 1
    ):
      return self.prior_inclusion
    if self.kind == "node_spike_slab":
      # One gate per node: lambda is directly the node's prior inclusion.
      if layer == self.num_layers - 1:
        return self.output_inclusion
      return self.pi0
    fan_in = self.widths[layer]
    return 1.0 - (1.0 - self.pi0) ** (1.0 / fan_in)
