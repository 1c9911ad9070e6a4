"""Closed-form variational core of the spike-and-slab BNN.

Reconstruction of Saha, Liu & Liang, "Efficient Model Compression for Bayesian
Neural Networks" (arXiv 2411.00273) on the per-weight spike-and-slab
variational BNN of Bai, Song & Cheng (arXiv 2011.07439); equation numbers refer
to ../shared/methods/spike_and_slab_bnn.md (the method brief, §2).

Parameters are plain dicts of arrays: params["layer_{l}"] holds, for layer l
with d_in = widths[l] and d_out = widths[l + 1],
  mu, rho: (d_in, d_out) slab mean and pre-softplus scale, s = softplus(rho);
  m, rho_b: (d_out,) bias mean and pre-softplus scale;
  theta: inclusion logits, phi = sigmoid(theta); (d_in, d_out) for
    kind "spike_slab", (1, d_out) for "node_spike_slab" (one gate per node,
    Jantre et al., arXiv 2108.11000), absent for "dense" (phi = 1);
and params["log_sigma_y"] is the regression noise log-scale.

B: batch, I: layer inputs, O: layer outputs, D: input features, S: samples,
C: classes.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlib_models.spike_slab.config import SpikeSlabConfig

Params = dict[str, Any]
Weights = list[tuple[jax.Array, jax.Array]]

_LOG_2PI = math.log(2.0 * math.pi)


def layer_name(layer: int) -> str:
  """Key of layer `layer` (0-based) in the parameter dict."""
  return f"layer_{layer}"


def _activation(activation: str | Callable[[jax.Array], jax.Array]):
  if callable(activation):
    return activation
  if activation == "relu":
    return jax.nn.relu
  if activation == "tanh":
    return jnp.tanh
  raise ValueError(f"unknown {activation=}")


def init(key: jax.Array, cfg: SpikeSlabConfig) -> Params:
  """Initial variational parameters (brief §2.7 defaults).

  mu is Glorot-uniform, rho and rho_b are cfg.init_rho, theta is
  cfg.init_theta (phi ~ 0.95: start dense, prune later), m is 0 and
  log_sigma_y is log(cfg.sigma_y). Every leaf is a strongly typed float32
  array so that a jitted step does not retrace after the first update.

  Args:
    key: PRNG key.
    cfg: model settings.

  Returns:
    The parameter dict described in the module docstring.
  """
  keys = jax.random.split(key, cfg.num_layers)
  params: Params = {}
  for l in range(cfg.num_layers):
    d_in, d_out = cfg.widths[l], cfg.widths[l + 1]
    limit = math.sqrt(6.0 / (d_in + d_out))
    layer = {
        "mu": jax.random.uniform(
            keys[l], (d_in, d_out), jnp.float32, -limit, limit
        ),
        "rho": jnp.full((d_in, d_out), cfg.init_rho, dtype=jnp.float32),
        "m": jnp.zeros((d_out,), dtype=jnp.float32),
        "rho_b": jnp.full((d_out,), cfg.init_rho, dtype=jnp.float32),
    }
    if cfg.kind == "spike_slab":
      layer["theta"] = jnp.full(
          (d_in, d_out), cfg.init_theta, dtype=jnp.float32
      )
    elif cfg.kind == "node_spike_slab":
      layer["theta"] = jnp.full((1, d_out), cfg.init_theta, dtype=jnp.float32)
    params[layer_name(l)] = layer
  params["log_sigma_y"] = jnp.full((), math.log(cfg.sigma_y), dtype=jnp.float32)
  return params


# ----------------------------------------------------------------------------
# KL divergences (brief §2.3).


def kl_bernoulli(theta: jax.Array, lam: jax.typing.ArrayLike) -> jax.Array:
  """Elementwise KL(Bernoulli(sigmoid(theta)) || Bernoulli(lam)).

  KL_B(phi || lam) = phi (log phi - log lam)
                     + (1 - phi) (log(1 - phi) - log(1 - lam)),
  with log phi and log(1 - phi) from log_sigmoid(+-theta) so that theta far
  from 0 stays exact (arXiv 2011.07439, Eq. of the ELBO; brief §2.3, §7.9).

  Args:
    theta: inclusion logits, any shape.
    lam: prior inclusion probability in (0, 1), broadcastable to theta.

  Returns:
    KL per element, same shape and dtype as theta.
  """
  phi = jax.nn.sigmoid(theta)
  one_minus_phi = jax.nn.sigmoid(-theta)
  log_lam = jnp.log(lam)
  log1m_lam = jnp.log1p(-jnp.asarray(lam, dtype=theta.dtype))
  return phi * (jax.nn.log_sigmoid(theta) - log_lam) + one_minus_phi * (
      jax.nn.log_sigmoid(-theta) - log1m_lam
  )


def kl_normal(
    mu: jax.Array, s: jax.Array, sigma0: jax.typing.ArrayLike
) -> jax.Array:
  """Elementwise KL(N(mu, s^2) || N(0, sigma0^2)) (brief §2.3).

  KL_N = log(sigma0 / s) + (s^2 + mu^2) / (2 sigma0^2) - 1/2.

  Args:
    mu: posterior means.
    s: posterior standard deviations (> 0), broadcastable to mu.
    sigma0: prior standard deviation.

  Returns:
    KL per element.
  """
  return (
      jnp.log(sigma0)
      - jnp.log(s)
      + (jnp.square(s) + jnp.square(mu)) / (2.0 * jnp.square(sigma0))
      - 0.5
  )


def kl_terms(params: Params, cfg: SpikeSlabConfig) -> dict[str, jax.Array]:
  """Closed-form KL(q || p) of all weights and biases (brief §2.3).

  KL = sum_j [KL_B(phi_j || lam_l) + phi_j KL_N(mu_j, s_j^2 || 0, sigma0^2)]
       + sum_biases KL_N(m, v^2 || 0, sigma_b^2),
  since the spike parts (delta_0 against delta_0) contribute nothing
  (arXiv 2011.07439). For kind "node_spike_slab" one gate phi_k of shape
  (1, d_out) weights the slab KL of node k's whole incoming column; for
  "dense" the slab weight is 1 and there is no Bernoulli term.

  Args:
    params: variational parameters.
    cfg: model settings (prior and kind).

  Returns:
    Dict with scalar sums "kl_bernoulli", "kl_slab" and "kl_bias".
  """
  dtype = params[layer_name(0)]["mu"].dtype
  kl_b = jnp.zeros((), dtype)
  kl_w = jnp.zeros((), dtype)
  kl_bias = jnp.zeros((), dtype)
  for l in range(cfg.num_layers):
    layer = params[layer_name(l)]
    kl_n_IO = kl_normal(layer["mu"], jax.nn.softplus(layer["rho"]), cfg.sigma0)
    if cfg.kind == "dense":
      kl_w = kl_w + jnp.sum(kl_n_IO)
    else:
      theta = layer["theta"]
      kl_w = kl_w + jnp.sum(jax.nn.sigmoid(theta) * kl_n_IO)
      kl_b = kl_b + jnp.sum(kl_bernoulli(theta, cfg.layer_inclusion(l)))
    kl_bias = kl_bias + jnp.sum(
        kl_normal(layer["m"], jax.nn.softplus(layer["rho_b"]), cfg.sigma_b)
    )
  return {"kl_bernoulli": kl_b, "kl_slab": kl_w, "kl_bias": kl_bias}


# ----------------------------------------------------------------------------
# Schedules.


def tau_at(
    cfg: SpikeSlabConfig,
    step: jax.typing.ArrayLike,
    total_steps: jax.typing.ArrayLike,
) -> jax.Array:
  """Concrete temperature at `step` (brief §2.7).

  Constant cfg.tau, or, if cfg.tau_start is set, linear from cfg.tau_start at
  step 0 to cfg.tau at step total_steps (and cfg.tau after). `step` and
  `total_steps` may be traced integers.

  Args:
    cfg: model settings.
    step: current step.
    total_steps: length of the run.

  Returns:
    float32 scalar temperature.
  """
  if cfg.tau_start is None:
    return jnp.asarray(cfg.tau, dtype=jnp.float32)
  frac = jnp.asarray(step, jnp.float32) / jnp.maximum(
      jnp.asarray(total_steps, jnp.float32), 1.0
  )
  frac = jnp.clip(frac, 0.0, 1.0)
  return jnp.asarray(cfg.tau_start + (cfg.tau - cfg.tau_start) * frac)


def kl_weight_at(
    cfg: SpikeSlabConfig,
    step: jax.typing.ArrayLike,
    total_steps: jax.typing.ArrayLike,
) -> jax.Array:
  """KL warm-up weight min(1, step / (kl_warmup_frac * total_steps)).

  1 when cfg.kl_warmup_frac == 0 (brief §2.3, pitfall 6).

  Args:
    cfg: model settings.
    step: current step (may be traced).
    total_steps: length of the run (may be traced).

  Returns:
    float32 scalar in [0, 1].
  """
  if cfg.kl_warmup_frac == 0.0:
    return jnp.ones((), jnp.float32)
  warm = cfg.kl_warmup_frac * jnp.asarray(total_steps, jnp.float32)
  ratio = jnp.asarray(step, jnp.float32) / jnp.maximum(warm, 1e-30)
  return jnp.where(warm > 0, jnp.clip(ratio, 0.0, 1.0), 1.0).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Sampling.


def _logistic_noise(key: jax.Array, shape, dtype) -> jax.Array:
  """log u - log(1 - u), u ~ U(0, 1): standard logistic noise."""
  u = jax.random.uniform(
      key, shape, dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0
  )
  return jnp.log(u) - jnp.log1p(-u)


def sample_relaxed(
    key: jax.Array, theta: jax.Array, tau: jax.typing.ArrayLike
) -> jax.Array:
  """Binary Concrete (relaxed Bernoulli) draw, brief §2.3.

  gamma_tilde = sigmoid((theta + log u - log(1 - u)) / tau), u ~ U(0, 1)
  (Maddison et al. 2017; Jang et al. 2017; used by arXiv 2011.07439).
  P(gamma_tilde > 1/2) = sigmoid(theta) for every tau.

  Args:
    key: PRNG key.
    theta: logits; the draw has theta's shape and dtype.
    tau: temperature (> 0).

  Returns:
    Relaxed inclusion values in (0, 1).
  """
  noise = _logistic_noise(key, theta.shape, theta.dtype)
  return jax.nn.sigmoid((theta + noise) / tau)


def _layer_keys(key: jax.Array, cfg: SpikeSlabConfig) -> list[jax.Array]:
  """Per layer (gamma, weight, bias) keys; depends on `key` only."""
  keys = jax.random.split(key, cfg.num_layers)
  return [jax.random.split(k, 3) for k in keys]


def _gate(layer, key, cfg, tau, hard):
  """Inclusion draw of one layer: relaxed, hard Bernoulli or 1 (dense)."""
  if cfg.kind == "dense":
    return None
  theta = layer["theta"]
  if hard:
    # Same logistic noise as the Concrete draw: its tau -> 0 limit, exactly
    # Bernoulli(sigmoid(theta)).
    noise = _logistic_noise(key, theta.shape, theta.dtype)
    return (theta + noise > 0).astype(theta.dtype)
  return sample_relaxed(key, theta, tau)


def sample_weights(
    params: Params,
    key: jax.Array,
    cfg: SpikeSlabConfig,
    *,
    tau: jax.typing.ArrayLike,
    hard: bool = False,
) -> Weights:
  """Effective weights of one posterior draw (brief §2.3, §2.6).

  w_tilde = gamma * (mu + s * eps), b = m + softplus(rho_b) * eps_b, where
  gamma is binary Concrete at temperature `tau` (training), a hard
  Bernoulli(phi) draw (`hard=True`, prediction) or 1 (kind "dense"). The
  noise depends only on `key` and the parameter shapes, never on a batch.

  Args:
    params: variational parameters.
    key: PRNG key.
    cfg: model settings.
    tau: Concrete temperature (ignored when hard or dense).
    hard: draw hard Bernoulli gates instead of relaxed ones.

  Returns:
    List of (w_IO, b_O) per layer.
  """
  weights = []
  for l, (k_g, k_w, k_b) in enumerate(_layer_keys(key, cfg)):
    layer = params[layer_name(l)]
    mu_IO = layer["mu"]
    eps_IO = jax.random.normal(k_w, mu_IO.shape, mu_IO.dtype)
    w_IO = mu_IO + jax.nn.softplus(layer["rho"]) * eps_IO
    gamma = _gate(layer, k_g, cfg, tau, hard)
    if gamma is not None:
      w_IO = gamma * w_IO
    m_O = layer["m"]
    eps_O = jax.random.normal(k_b, m_O.shape, m_O.dtype)
    b_O = m_O + jax.nn.softplus(layer["rho_b"]) * eps_O
    weights.append((w_IO, b_O))
  return weights


def forward(
    weights: Weights,
    x_BD: jax.Array,
    activation: str | Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Fully connected forward pass; activation on hidden layers only.

  Args:
    weights: list of (w_IO, b_O).
    x_BD: inputs.
    activation: "relu", "tanh" or a callable.

  Returns:
    out_BO of the last layer (pre-softmax logits or regression mean).
  """
  act = _activation(activation)
  h_BI = x_BD
  for l, (w_IO, b_O) in enumerate(weights):
    h_BI = h_BI @ w_IO + b_O[None, :]
    if l < len(weights) - 1:
      h_BI = act(h_BI)
  return h_BI


def mean_network(params: Params, cfg: SpikeSlabConfig) -> Weights:
  """Mean-network weights (phi * mu, m) of every layer (brief §2.5)."""
  weights = []
  for l in range(cfg.num_layers):
    layer = params[layer_name(l)]
    w_IO = layer["mu"]
    if cfg.kind != "dense":
      w_IO = jax.nn.sigmoid(layer["theta"]) * w_IO
    weights.append((w_IO, layer["m"]))
  return weights


def preactivation_moments(
    x_BI: jax.Array, layer: Mapping[str, jax.Array], kind: str
) -> tuple[jax.Array, jax.Array]:
  """Exact mean and variance of x @ (gamma * w) under q, hard gamma.

  Per-weight gates (brief §2.3, local reparameterisation of Hubin & Storvik,
  Mathematics 2024): M = x (phi mu), V = x^2 (phi (s^2 + mu^2) - phi^2 mu^2).
  Dense: phi = 1. Node gates (one gamma_k per column): M = phi (x mu) and
  V = phi (x^2 s^2) + phi (1 - phi) (x mu)^2. Biases are not included.

  Args:
    x_BI: layer inputs.
    layer: one layer's parameters.
    kind: cfg.kind.

  Returns:
    (mean_BO, var_BO).
  """
  mu_IO = layer["mu"]
  s2_IO = jnp.square(jax.nn.softplus(layer["rho"]))
  x2_BI = jnp.square(x_BI)
  if kind == "dense":
    return x_BI @ mu_IO, x2_BI @ s2_IO
  theta = layer["theta"]
  phi = jax.nn.sigmoid(theta)
  phi_1m_phi = phi * jax.nn.sigmoid(-theta)
  if kind == "spike_slab":
    var_IO = phi * s2_IO + phi_1m_phi * jnp.square(mu_IO)
    return x_BI @ (phi * mu_IO), x2_BI @ var_IO
  xmu_BO = x_BI @ mu_IO
  return phi * xmu_BO, phi * (x2_BI @ s2_IO) + phi_1m_phi * jnp.square(xmu_BO)


def forward_local_reparam(
    params: Params,
    key: jax.Array,
    x_BD: jax.Array,
    cfg: SpikeSlabConfig,
    *,
    tau: jax.typing.ArrayLike,
) -> jax.Array:
  """Forward pass sampling pre-activations (estimator "local_reparam").

  Kinds "spike_slab" and "dense": a = M + m + sqrt(V + v^2) * E,
  E ~ N(0, 1) of shape (B, d_out), with M, V from `preactivation_moments`
  and v = softplus(rho_b): a CLT approximation of the spike-and-slab
  pre-activation (Hubin & Storvik, Mathematics 2024, 12(6):788; brief §2.3)
  with no Concrete noise; gradients reach theta through phi. Kind
  "node_spike_slab": the gate gamma_k is one variable per node, so the sum is
  not near Gaussian; the gate is drawn as binary Concrete (key-only noise) and
  only the slab is reparameterised locally, which is exact given the gate:
  a = gamma (x mu) + m + sqrt(gamma^2 x^2 s^2 + v^2) * E.

  The noise E is per example: unlike the "concrete" estimator the draw
  depends on the batch, so splitting a batch changes it.

  Args:
    params: variational parameters.
    key: PRNG key.
    x_BD: inputs.
    cfg: model settings.
    tau: Concrete temperature (node kind only).

  Returns:
    out_BO.
  """
  act = _activation(cfg.activation)
  h_BI = x_BD
  for l, (k_g, k_e, _) in enumerate(_layer_keys(key, cfg)):
    layer = params[layer_name(l)]
    v2_O = jnp.square(jax.nn.softplus(layer["rho_b"]))[None, :]
    if cfg.kind == "node_spike_slab":
      gamma_1O = sample_relaxed(k_g, layer["theta"], tau)
      mean_BO = gamma_1O * (h_BI @ layer["mu"])
      var_BO = jnp.square(gamma_1O) * (
          jnp.square(h_BI) @ jnp.square(jax.nn.softplus(layer["rho"]))
      )
    else:
      mean_BO, var_BO = preactivation_moments(h_BI, layer, cfg.kind)
    eps_BO = jax.random.normal(k_e, mean_BO.shape, mean_BO.dtype)
    h_BI = mean_BO + layer["m"][None, :] + jnp.sqrt(var_BO + v2_O) * eps_BO
    if l < cfg.num_layers - 1:
      h_BI = act(h_BI)
  return h_BI


# ----------------------------------------------------------------------------
# Likelihood and loss.


def log_likelihood(
    out_BO: jax.Array,
    y_B: jax.Array,
    log_sigma_y: jax.Array,
    likelihood: str,
) -> jax.Array:
  """Per-example log-likelihood.

  Args:
    out_BO: network outputs; (B, 1) regression means or (B, C) logits.
    y_B: float targets (regression) or int labels (classification).
    log_sigma_y: regression noise log-scale (ignored for classification).
    likelihood: "regression" or "classification".

  Returns:
    (B,) log p(y | x, weights).
  """
  if likelihood == "regression":
    z_B = (y_B - out_BO[:, 0]) * jnp.exp(-log_sigma_y)
    return -0.5 * _LOG_2PI - log_sigma_y - 0.5 * jnp.square(z_B)
  if likelihood == "classification":
    logp_BC = jax.nn.log_softmax(out_BO, axis=-1)
    labels_B1 = y_B.astype(jnp.int32)[:, None]
    return jnp.take_along_axis(logp_BC, labels_B1, axis=-1)[:, 0]
  raise ValueError(f"unknown {likelihood=}")


def phi_stats(params: Params, cfg: SpikeSlabConfig) -> dict[str, jax.Array]:
  """Mean phi and share of phi > 1/2 per layer."""
  stats = {}
  for l in range(cfg.num_layers):
    if cfg.kind == "dense":
      mean = frac = jnp.ones((), jnp.float32)
    else:
      theta = params[layer_name(l)]["theta"]
      mean = jnp.mean(jax.nn.sigmoid(theta)).astype(jnp.float32)
      frac = jnp.mean((theta > 0).astype(jnp.float32))
    stats[f"phi/mean_layer_{l}"] = mean
    stats[f"phi/frac_gt_half_layer_{l}"] = frac
  return stats


def loss_fn(
    params: Params,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    cfg: SpikeSlabConfig,
    num_data: jax.typing.ArrayLike,
    step: jax.typing.ArrayLike,
    total_steps: jax.typing.ArrayLike,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative ELBO per datum, one Monte Carlo draw (brief §2.3).

  loss = mean_batch(-log p(y | x, w)) + beta_t * KL / num_data, with
  beta_t = `kl_weight_at` (KL warm-up) and KL from `kl_terms`; this is
  -ELBO / N with the minibatch likelihood scaled by N / B (arXiv 2011.07439;
  arXiv 2411.00273). Estimator "concrete": one weight draw from
  `sample_weights` whose noise depends only on `key` and the parameter shapes,
  so the same key gives the same draw on any split of the batch and the
  batch-mean loss is the mean of the shard losses. Estimator
  "local_reparam": `forward_local_reparam`, whose noise is per example.

  Args:
    params: variational parameters.
    batch: {"x": (B, p) float32, "y": (B,) float or int}.
    key: PRNG key for this step (e.g. fold_in(key, step)).
    cfg: model settings.
    num_data: training-set size N.
    step: current step (may be traced).
    total_steps: length of the run (may be traced).

  Returns:
    (loss, aux) where aux is a flat dict of float32 scalars: "train/loss",
    "train/nll", "train/kl" (total KL in nats, unweighted),
    "train/kl_bernoulli", "train/kl_slab", "train/kl_bias",
    "train/kl_weight", "train/tau", "train/sigma_y", and per layer
    "phi/mean_layer_{l}" and "phi/frac_gt_half_layer_{l}".
  """
  x_BD, y_B = batch["x"], batch["y"]
  tau = tau_at(cfg, step, total_steps)
  log_sigma_y = params["log_sigma_y"]
  if not cfg.learn_sigma_y:
    log_sigma_y = jax.lax.stop_gradient(log_sigma_y)
  if cfg.estimator == "concrete":
    out_BO = forward(
        sample_weights(params, key, cfg, tau=tau), x_BD, cfg.activation
    )
  elif cfg.estimator == "local_reparam":
    out_BO = forward_local_reparam(params, key, x_BD, cfg, tau=tau)
  else:
    raise ValueError(f"unknown {cfg.estimator=}")
  nll = -jnp.mean(log_likelihood(out_BO, y_B, log_sigma_y, cfg.likelihood))
  kls = kl_terms(params, cfg)
  kl = kls["kl_bernoulli"] + kls["kl_slab"] + kls["kl_bias"]
  kl_weight = kl_weight_at(cfg, step, total_steps)
  loss = nll + kl_weight * kl / jnp.asarray(num_data, nll.dtype)
  aux = {
      "train/loss": loss,
      "train/nll": nll,
      "train/kl": kl,
      "train/kl_bernoulli": kls["kl_bernoulli"],
      "train/kl_slab": kls["kl_slab"],
      "train/kl_bias": kls["kl_bias"],
      "train/kl_weight": kl_weight,
      "train/tau": tau,
      "train/sigma_y": jnp.exp(params["log_sigma_y"]),
      **phi_stats(params, cfg),
  }
  aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
  return loss, aux


# ----------------------------------------------------------------------------
# Prediction (brief §2.6).


def predict(
    params: Params,
    key: jax.Array,
    x_BD: jax.Array,
    cfg: SpikeSlabConfig,
    num_samples: int | None = None,
) -> dict[str, jax.Array]:
  """Posterior predictive from S draws with hard Bernoulli gates.

  The Concrete relaxation is a training device only (brief §2.6, §7.7).

  Args:
    params: variational parameters.
    key: PRNG key.
    x_BD: inputs.
    cfg: model settings.
    num_samples: S (static); default cfg.num_predictive_samples.

  Returns:
    Regression: {"mean": (B,), "var": (B,)} with var = variance of the S
    means + sigma_y^2. Classification: {"probs": (B, C)}, the average of the
    S softmax outputs.
  """
  num_samples = num_samples or cfg.num_predictive_samples
  keys = jax.random.split(key, num_samples)

  def one(k):
    weights = sample_weights(params, k, cfg, tau=cfg.tau, hard=True)
    return forward(weights, x_BD, cfg.activation)

  out_SBO = jax.vmap(one)(keys)
  if cfg.likelihood == "regression":
    means_SB = out_SBO[..., 0]
    sigma2 = jnp.exp(2.0 * params["log_sigma_y"])
    return {"mean": jnp.mean(means_SB, 0), "var": jnp.var(means_SB, 0) + sigma2}
  return {"probs": jnp.mean(jax.nn.softmax(out_SBO, axis=-1), 0)}


def predict_mean_network(
    params: Params, x_BD: jax.Array, cfg: SpikeSlabConfig
) -> dict[str, jax.Array]:
  """Single pass of the mean network (phi * mu, m), brief §2.6.

  Returns:
    Regression: {"mean": (B,), "var": (B,) = sigma_y^2}. Classification:
    {"probs": (B, C)}.
  """
  out_BO = forward(mean_network(params, cfg), x_BD, cfg.activation)
  if cfg.likelihood == "regression":
    mean_B = out_BO[:, 0]
    sigma2 = jnp.exp(2.0 * params["log_sigma_y"])
    return {"mean": mean_B, "var": jnp.full_like(mean_B, sigma2)}
  return {"probs": jax.nn.softmax(out_BO, axis=-1)}


# ----------------------------------------------------------------------------
# Metrics.


def rmse(mean_B: jax.Array, y_B: jax.Array) -> jax.Array:
  """Root mean squared error."""
  return jnp.sqrt(jnp.mean(jnp.square(mean_B - y_B)))


def gaussian_nll(mean_B: jax.Array, var_B: jax.Array, y_B: jax.Array):
  """Mean Gaussian negative log predictive density."""
  return jnp.mean(
      0.5 * (_LOG_2PI + jnp.log(var_B) + jnp.square(y_B - mean_B) / var_B)
  )


def categorical_nll(probs_BC: jax.Array, y_B: jax.Array) -> jax.Array:
  """Mean -log probs[y] (probabilities clipped at the float tiny)."""
  p_B = jnp.take_along_axis(probs_BC, y_B.astype(jnp.int32)[:, None], -1)
  return -jnp.mean(jnp.log(jnp.maximum(p_B, jnp.finfo(p_B.dtype).tiny)))


def accuracy(probs_BC: jax.Array, y_B: jax.Array) -> jax.Array:
  """Share of examples whose arg-max class equals the label."""
  return jnp.mean((jnp.argmax(probs_BC, -1) == y_B).astype(jnp.float32))


def ece(probs_BC: jax.Array, y_B: jax.Array, bins: int = 15) -> jax.Array:
  """Expected calibration error of the top-class confidence.

  Equal-width bins [k/bins, (k+1)/bins) (confidence 1 falls in the last):
  ECE = sum_k |sum_{i in k} (correct_i - conf_i)| / B.

  Args:
    probs_BC: predicted class probabilities.
    y_B: int labels.
    bins: number of bins.

  Returns:
    Scalar ECE.
  """
  conf_B = jnp.max(probs_BC, -1)
  correct_B = (jnp.argmax(probs_BC, -1) == y_B).astype(conf_B.dtype)
  idx_B = jnp.clip(jnp.floor(conf_B * bins).astype(jnp.int32), 0, bins - 1)
  gap_K = jnp.zeros((bins,), conf_B.dtype).at[idx_B].add(correct_B - conf_B)
  return jnp.sum(jnp.abs(gap_K)) / y_B.shape[0]
