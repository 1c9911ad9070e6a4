"""NumPyro model and custom guide of the spike-and-slab BNN (brief §2.8).

Reconstruction of Saha, Liu & Liang (arXiv 2411.00273) on the per-weight
spike-and-slab variational BNN of Bai, Song & Cheng (arXiv 2011.07439). This is
the library's NumPyro face of the method; `core` is the plain-JAX fast path and
the numerical reference, and the two share one parameter pytree
(`to_numpyro_params` / `from_numpyro_params`).

Sites of layer l (d_in = widths[l], d_out = widths[l + 1]):
  g_{l}: relaxed inclusion, stored in LOGIT space: the value x is
    Logistic(theta / tau, 1 / tau) and the gate is sigmoid(x), i.e. a binary
    Concrete (relaxed Bernoulli) draw; (d_in, d_out), or (1, d_out) for
    kind "node_spike_slab", absent for "dense".
  w_{l}: slab weights, (d_in, d_out); the layer uses sigmoid(g) * w.
  b_{l}: biases, (d_out,).
Guide parameters: theta_{l}, mu_{l}, rho_{l}, m_{l}, rho_b_{l} and, in the
model, log_sigma_y (regression).

Why logit space: numpyro's RelaxedBernoulliLogits clips sigmoid(x) to
1 - 1.2e-7 (x ~ 15.9; 0.8 % of draws at theta = 3, tau = 0.5); the guide's
log_prob uses the exact x (intermediates) but the model's inverts the clipped
value, which biased the Monte Carlo KL by +0.008 nats per gate (measured:
1e6 float32 draws, lambda = 0.002, 4 standard errors). A Logistic site keeps x
itself, so every density is exact, and KL(Concrete_q || Concrete_p) equals
KL(Logistic_q || Logistic_p) because the sigmoid is a bijection.

Inclusion KL (`inclusion_kl`):
  "closed_form" (default): the guide's `InclusionPosterior` and the model's
    `InclusionPrior` have a registered KL (numpyro.distributions.kl) equal to
    the Bernoulli KL_B(sigmoid(theta) || lambda) of brief §2.3: the
    relaxation is a training device for the Bernoulli gate, so
    `TraceMeanField_ELBO` reproduces core.kl_terms exactly.
  "monte_carlo": plain numpyro `Logistic` prior and guide with no registered
    KL, so `TraceMeanField_ELBO` uses the one-draw estimate log q(x) - log
    p(x), unbiased for the Concrete-vs-Concrete KL (which is not KL_B).
The slab always uses the registered KL of `SlabPosterior`:
sigmoid(theta) * KL_N, since q(w | gamma = 0) = delta_0 = p(w | gamma = 0).
"""

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.distributions import kl as numpyro_kl
from numpyro.infer import SVI, TraceMeanField_ELBO

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import data as data_lib
from jaxlib_models.spike_slab.config import SpikeSlabConfig

InclusionKL = Literal["closed_form", "monte_carlo"]
Params = dict[str, Any]

_FIELDS = ("theta", "mu", "rho", "m", "rho_b")
_INCLUSION_KLS = ("closed_form", "monte_carlo")


# ----------------------------------------------------------------------------
# Distributions.


def _logit(probs: jax.typing.ArrayLike) -> jax.Array:
  """log p - log(1 - p)."""
  probs = jnp.asarray(probs, jnp.float32)
  return jnp.log(probs) - jnp.log1p(-probs)


class InclusionPrior(dist.Logistic):
  """Prior of a relaxed inclusion site, in logit space (brief §2.3, §2.8).

  The value x ~ Logistic(logit(probs) / tau, 1 / tau) and sigmoid(x) is a
  binary Concrete draw with P(sigmoid(x) > 1/2) = probs. Its KL against
  `InclusionPosterior` is registered as the Bernoulli KL.

  Args:
    probs: Prior inclusion probability lambda; its shape is the batch shape.
    temperature: Concrete temperature tau > 0 (scalar).
  """

  pytree_data_fields = ("probs", "temperature")

  def __init__(self, probs, temperature, *, validate_args=None):
    self.probs = jnp.asarray(probs, jnp.float32)
    self.temperature = jnp.asarray(temperature, jnp.float32)
    super().__init__(
        _logit(self.probs) / self.temperature,
        jnp.broadcast_to(1.0 / self.temperature, self.probs.shape),
        validate_args=validate_args,
    )


class InclusionPosterior(dist.Logistic):
  """Guide of a relaxed inclusion site, in logit space (brief §2.2, §2.8).

  The value x = (theta + L) / tau with L standard logistic noise (the
  reparameterised binary Concrete of core.sample_relaxed before its
  sigmoid); log_prob is the Logistic density of x, exact for any theta.

  Args:
    logits: Inclusion logits theta, phi = sigmoid(theta).
    temperature: Concrete temperature tau > 0 (scalar).
  """

  pytree_data_fields = ("logits", "temperature")

  def __init__(self, logits, temperature, *, validate_args=None):
    self.logits = jnp.asarray(logits)
    self.temperature = jnp.asarray(temperature, self.logits.dtype)
    super().__init__(
        self.logits / self.temperature,
        jnp.broadcast_to(1.0 / self.temperature, self.logits.shape),
        validate_args=validate_args,
    )


class SlabPosterior(dist.Normal):
  """Guide of a slab weight site: N(loc, scale^2) given inclusion.

  Samples like a Normal. Its registered KL against a Normal prior is
  sigmoid(inclusion_logits) * KL_N (brief §2.3): q(w | gamma = 0) = delta_0
  = p(w | gamma = 0) pays nothing. `inclusion_logits=None` (kind "dense")
  gives the plain KL_N. Inclusion logits broadcast, so a (1, d_out) node gate
  weights a whole column.

  Args:
    loc: Slab mean mu.
    scale: Slab standard deviation s = softplus(rho).
    inclusion_logits: theta, or None.
  """

  pytree_data_fields = ("inclusion_logits",)

  def __init__(self, loc, scale, inclusion_logits=None, *, validate_args=None):
    self.inclusion_logits = inclusion_logits
    super().__init__(loc, scale, validate_args=validate_args)


@numpyro_kl.kl_divergence.register(InclusionPosterior, InclusionPrior)
def _kl_inclusion(q: InclusionPosterior, p: InclusionPrior) -> jax.Array:
  """Bernoulli KL_B(sigmoid(theta) || lambda), core.kl_bernoulli."""
  return core.kl_bernoulli(q.logits, p.probs)


@numpyro_kl.kl_divergence.register(SlabPosterior, dist.Normal)
def _kl_slab(q: SlabPosterior, p: dist.Normal) -> jax.Array:
  """phi * KL(N(mu, s^2) || N(m0, sigma0^2)), phi = 1 without logits."""
  kl_n = (
      jnp.log(p.scale)
      - jnp.log(q.scale)
      + (jnp.square(q.scale) + jnp.square(q.loc - p.loc))
      / (2.0 * jnp.square(p.scale))
      - 0.5
  )
  if q.inclusion_logits is None:
    return kl_n
  return jax.nn.sigmoid(q.inclusion_logits) * kl_n


def _inclusion_prior(lam, tau, shape, inclusion_kl) -> dist.Distribution:
  """Model distribution of g_{l} (event shape `shape`)."""
  probs = jnp.full(shape, lam, jnp.float32)
  if inclusion_kl == "closed_form":
    d = InclusionPrior(probs, tau)
  else:
    d = dist.Logistic(_logit(probs) / tau, jnp.full(shape, 1.0) / tau)
  return d.to_event(len(shape))


def _inclusion_posterior(theta, tau, inclusion_kl) -> dist.Distribution:
  """Guide distribution of g_{l}."""
  if inclusion_kl == "closed_form":
    d = InclusionPosterior(theta, tau)
  else:
    d = dist.Logistic(theta / tau, jnp.ones_like(theta) / tau)
  return d.to_event(theta.ndim)


# ----------------------------------------------------------------------------
# Model and guide.


def _gate_shape(cfg: SpikeSlabConfig, layer: int) -> tuple[int, int]:
  """Shape of theta_{l} / g_{l}."""
  d_out = cfg.widths[layer + 1]
  if cfg.kind == "node_spike_slab":
    return (1, d_out)
  return (cfg.widths[layer], d_out)


def _check_shape(name: str, value: jax.Array, shape: tuple[int, ...]):
  """Raises a ValueError when a site or parameter has the wrong shape."""
  if tuple(jnp.shape(value)) != tuple(shape):
    raise ValueError(
        f"site {name!r} has shape {tuple(jnp.shape(value))}, expected "
        f"{tuple(shape)}; substituted or initial values must match "
        "cfg.widths"
    )


def _check_data(cfg: SpikeSlabConfig, x, y) -> None:
  """Validates x (B, widths[0]) and y (B,) with messages that say the fix."""
  p = cfg.widths[0]
  shape = tuple(jnp.shape(x))
  if len(shape) != 2 or shape[1] != p:
    raise ValueError(
        f"x must have shape (batch, {p}) to match cfg.widths[0]={p}, got "
        f"{shape}; flatten inputs to 2-D or fix cfg.widths"
    )
  if y is None:
    return
  if tuple(jnp.shape(y)) != (shape[0],):
    raise ValueError(
        f"y must have shape ({shape[0]},) (one target or integer label per "
        f"row of x), got {tuple(jnp.shape(y))}"
    )
  if cfg.likelihood == "classification" and not jnp.issubdtype(
      jnp.result_type(y), jnp.integer
  ):
    raise ValueError(
        f"classification labels must be integers, got {jnp.result_type(y)}"
    )


def _scaled(kl_weight):
  """handlers.scale(kl_weight) for latent sites, or a no-op when None."""
  if kl_weight is None:
    return handlers.scale(scale=1.0)
  return handlers.scale(scale=kl_weight)


def _param_init(cfg: SpikeSlabConfig, layer: int, field: str) -> Callable:
  """Lazy numpyro.param initialiser taking core.init's value."""

  def init_fn(key):
    return core.init(key, cfg)[core.layer_name(layer)][field]

  return init_fn


def make_model(
    cfg: SpikeSlabConfig, *, inclusion_kl: InclusionKL = "closed_form"
) -> Callable[..., None]:
  """NumPyro model of the spike-and-slab BNN (brief §2.1, §2.8).

  Per layer: g ~ relaxed Bernoulli(lambda_l) in logit space (module
  docstring), w ~ N(0, sigma0^2), b ~ N(0, sigma_b^2); the layer computes
  h @ (sigmoid(g) * w) + b. Data: y ~ N(f(x), sigma_y^2) with log_sigma_y a
  numpyro.param (gradient stopped unless cfg.learn_sigma_y), or
  Categorical(logits=f(x)), under numpyro.plate("data", num_data,
  subsample_size=B) so the log-likelihood is scaled by N / B. The batch is
  sliced by the caller; the plate's indices are fixed to `subsample`
  (default arange(B)) so that no index permutation is drawn.

  Args:
    cfg: Model settings; cfg.estimator is ignored (the model is the
      "concrete" estimator).
    inclusion_kl: "closed_form" or "monte_carlo" (module docstring).

  Returns:
    model(x, y=None, num_data=None, subsample=None, *, temperature=None,
    kl_weight=None): x (B, widths[0]); y (B,) or None to sample; num_data the
    training-set size N (a Python int, default B); temperature tau (default
    cfg.tau); kl_weight, if given, scales the latent sites through
    numpyro.handlers.scale (KL warm-up; pass the same to the guide).
  """
  if inclusion_kl not in _INCLUSION_KLS:
    raise ValueError(f"{inclusion_kl=} must be one of {_INCLUSION_KLS}")
  act = {"relu": jax.nn.relu, "tanh": jnp.tanh}[cfg.activation]

  def model(
      x, y=None, num_data=None, subsample=None, *, temperature=None,
      kl_weight=None,
  ):
    _check_data(cfg, x, y)
    batch = x.shape[0]
    num_data = batch if num_data is None else operator.index(num_data)
    if num_data < batch:
      raise ValueError(f"{num_data=} is smaller than the batch ({batch})")
    tau = cfg.tau if temperature is None else temperature
    h = x
    for l in range(cfg.num_layers):
      d_in, d_out = cfg.widths[l], cfg.widths[l + 1]
      with _scaled(kl_weight):
        gate = None
        if cfg.kind != "dense":
          shape = _gate_shape(cfg, l)
          g = numpyro.sample(
              f"g_{l}",
              _inclusion_prior(cfg.layer_inclusion(l), tau, shape,
                               inclusion_kl),
          )
          _check_shape(f"g_{l}", g, shape)
          gate = jax.nn.sigmoid(g)
        w = numpyro.sample(
            f"w_{l}",
            dist.Normal(jnp.zeros((d_in, d_out)), cfg.sigma0).to_event(2),
        )
        _check_shape(f"w_{l}", w, (d_in, d_out))
        b = numpyro.sample(
            f"b_{l}", dist.Normal(jnp.zeros((d_out,)), cfg.sigma_b).to_event(1)
        )
        _check_shape(f"b_{l}", b, (d_out,))
      if gate is not None:
        w = gate * w
      h = h @ w + b[None, :]
      if l < cfg.num_layers - 1:
        h = act(h)
    if cfg.likelihood == "regression":
      log_sigma_y = numpyro.param(
          "log_sigma_y", jnp.full((), math.log(cfg.sigma_y), jnp.float32)
      )
      if not cfg.learn_sigma_y:
        log_sigma_y = jax.lax.stop_gradient(log_sigma_y)
      lik = dist.Normal(h[:, 0], jnp.exp(log_sigma_y))
    else:
      lik = dist.Categorical(logits=h)
    indices = jnp.arange(batch) if subsample is None else subsample
    with handlers.substitute(data={"data": indices}):
      plate = numpyro.plate("data", num_data, subsample_size=batch)
    with plate:
      numpyro.sample("y", lik, obs=y)

  return model


def make_guide(
    cfg: SpikeSlabConfig, *, inclusion_kl: InclusionKL = "closed_form"
) -> Callable[..., None]:
  """Custom mean-field guide (brief §2.2, §2.8).

  Per layer: g ~ InclusionPosterior(theta_{l}, tau) (logit space), w ~
  SlabPosterior(mu_{l}, softplus(rho_{l}), theta_{l}), b ~ N(m_{l},
  softplus(rho_b_{l})^2). Parameters initialise like core.init. PIPs stay
  parameters (phi = sigmoid(theta)), unlike an AutoNormal (brief §7.11).

  Args:
    cfg: Model settings.
    inclusion_kl: "closed_form" or "monte_carlo"; must match the model.

  Returns:
    guide with the model's signature.
  """
  if inclusion_kl not in _INCLUSION_KLS:
    raise ValueError(f"{inclusion_kl=} must be one of {_INCLUSION_KLS}")

  def guide(
      x, y=None, num_data=None, subsample=None, *, temperature=None,
      kl_weight=None,
  ):
    del y, num_data, subsample  # The guide does not depend on the data.
    _check_data(cfg, x, None)
    tau = cfg.tau if temperature is None else temperature
    for l in range(cfg.num_layers):
      d_in, d_out = cfg.widths[l], cfg.widths[l + 1]
      par = lambda f, shape: _checked_param(cfg, l, f, shape)  # noqa: E731
      with _scaled(kl_weight):
        theta = None
        if cfg.kind != "dense":
          theta = par("theta", _gate_shape(cfg, l))
          numpyro.sample(
              f"g_{l}", _inclusion_posterior(theta, tau, inclusion_kl)
          )
        mu = par("mu", (d_in, d_out))
        s = jax.nn.softplus(par("rho", (d_in, d_out)))
        numpyro.sample(f"w_{l}", SlabPosterior(mu, s, theta).to_event(2))
        m = par("m", (d_out,))
        v = jax.nn.softplus(par("rho_b", (d_out,)))
        numpyro.sample(f"b_{l}", dist.Normal(m, v).to_event(1))

  return guide


def _checked_param(cfg, layer, field, shape):
  """numpyro.param f"{field}_{layer}" with a shape check."""
  name = f"{field}_{layer}"
  value = numpyro.param(name, _param_init(cfg, layer, field))
  _check_shape(name, value, shape)
  return value


@functools.lru_cache(maxsize=64)
def _model_and_guide(cfg: SpikeSlabConfig, inclusion_kl: str):
  """Cached (model, guide) pair so repeated traces reuse the closures."""
  return (
      make_model(cfg, inclusion_kl=inclusion_kl),
      make_guide(cfg, inclusion_kl=inclusion_kl),
  )


# ----------------------------------------------------------------------------
# Parameter conversion.


def to_numpyro_params(params: Params) -> dict[str, jax.Array]:
  """core's nested params -> flat numpyro.param names.

  params["layer_{l}"][field] -> f"{field}_{l}" for field in theta, mu, rho,
  m, rho_b; params["log_sigma_y"] -> "log_sigma_y". Arrays are not copied.

  Args:
    params: core parameter pytree.

  Returns:
    Flat dict name -> array.
  """
  flat = {}
  num_layers = sum(1 for k in params if k.startswith("layer_"))
  for l in range(num_layers):
    layer = params[core.layer_name(l)]
    for field in _FIELDS:
      if field in layer:
        flat[f"{field}_{l}"] = layer[field]
  if "log_sigma_y" in params:
    flat["log_sigma_y"] = params["log_sigma_y"]
  return flat


def from_numpyro_params(
    flat: dict[str, jax.Array], cfg: SpikeSlabConfig
) -> Params:
  """Inverse of `to_numpyro_params` for a config.

  A missing "log_sigma_y" (classification SVI does not create it) becomes
  log(cfg.sigma_y), as in core.init.

  Args:
    flat: numpyro parameter dict (e.g. svi.get_params(state)).
    cfg: Model settings (which layers and whether theta exists).

  Returns:
    core parameter pytree.

  Raises:
    KeyError: naming the missing parameters.
  """
  fields = _FIELDS if cfg.kind != "dense" else _FIELDS[1:]
  want = [f"{f}_{l}" for l in range(cfg.num_layers) for f in fields]
  missing = [n for n in want if n not in flat]
  if missing:
    raise KeyError(
        f"numpyro params lack {missing} for {cfg.kind=} with "
        f"{cfg.num_layers} layers; got {sorted(flat)}"
    )
  params: Params = {
      core.layer_name(l): {f: flat[f"{f}_{l}"] for f in fields}
      for l in range(cfg.num_layers)
  }
  if "log_sigma_y" in flat:
    params["log_sigma_y"] = flat["log_sigma_y"]
  else:
    params["log_sigma_y"] = jnp.full(
        (), math.log(cfg.sigma_y), dtype=jnp.float32
    )
  return params


# ----------------------------------------------------------------------------
# Loss with the core's contract.


def elbo_terms(
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    cfg: SpikeSlabConfig,
    num_data: int,
    temperature: jax.typing.ArrayLike | None = None,
    inclusion_kl: InclusionKL = "closed_form",
) -> dict[str, jax.Array]:
  """Per-site negative ELBO terms from TraceMeanField_ELBO(sum_sites=False).

  Args:
    params: core parameter pytree.
    batch: {"x": (B, p), "y": (B,)}.
    key: PRNG key of the draw.
    cfg: Model settings.
    num_data: Training-set size N (Python int).
    temperature: Concrete temperature (default cfg.tau).
    inclusion_kl: "closed_form" or "monte_carlo".

  Returns:
    {"y": -(N / B) sum log p(y | x, w), "g_{l}" / "w_{l}" / "b_{l}": KL
    (closed form or one-draw estimate)}, unweighted.
  """
  model, guide = _model_and_guide(cfg, inclusion_kl)
  elbo = TraceMeanField_ELBO(sum_sites=False)
  return elbo.loss(
      key,
      to_numpyro_params(params),
      model,
      guide,
      batch["x"],
      batch["y"],
      num_data=operator.index(num_data),
      temperature=temperature,
  )


def numpyro_loss_fn(
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    cfg: SpikeSlabConfig,
    num_data: int,
    step: jax.typing.ArrayLike,
    total_steps: jax.typing.ArrayLike,
    inclusion_kl: InclusionKL = "closed_form",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative ELBO per datum through NumPyro, with core.loss_fn's contract.

  loss = mean_batch(-log p(y | x, w)) + beta_t * KL / N, where the terms come
  from `TraceMeanField_ELBO(sum_sites=False).loss` (the plate scales the
  likelihood by N / B) and the KL warm-up beta_t = core.kl_weight_at is
  applied by recombining the per-site terms (exact at beta_t = 0, where
  numpyro.handlers.scale would refuse a zero scale). Temperature follows
  core.tau_at. With inclusion_kl="closed_form" the KL is core.kl_terms
  exactly; the likelihood draw differs from core's (different noise), equal
  in expectation.

  Args:
    params: core parameter pytree.
    batch: {"x": (B, p) float32, "y": (B,)}.
    key: PRNG key of this step.
    cfg: Model settings; cfg.estimator must be "concrete".
    num_data: Training-set size N (Python int: it sizes the plate).
    step: Current step (may be traced).
    total_steps: Length of the run (may be traced).
    inclusion_kl: "closed_form" or "monte_carlo".

  Returns:
    (loss, aux): aux has core.loss_fn's keys ("train/loss", "train/nll",
    "train/kl", "train/kl_bernoulli", "train/kl_slab", "train/kl_bias",
    "train/kl_weight", "train/tau", "train/sigma_y", "phi/...") plus
    "train/elbo_loss" = -ELBO / N with the full KL (beta = 1).
  """
  if cfg.estimator != "concrete":
    raise ValueError(
        f"the NumPyro model implements estimator 'concrete' only, got "
        f"{cfg.estimator!r}; use core.loss_fn for 'local_reparam'"
    )
  num_data = operator.index(num_data)
  tau = core.tau_at(cfg, step, total_steps)
  kl_weight = core.kl_weight_at(cfg, step, total_steps)
  terms = elbo_terms(
      params, batch, key, cfg=cfg, num_data=num_data, temperature=tau,
      inclusion_kl=inclusion_kl,
  )
  zero = jnp.zeros((), jnp.float32)
  group = lambda prefix: sum(  # noqa: E731
      (v for k, v in terms.items() if k.startswith(prefix)), zero
  )
  kl_b, kl_w, kl_bias = group("g_"), group("w_"), group("b_")
  kl = kl_b + kl_w + kl_bias
  nll = terms["y"] / num_data
  loss = nll + kl_weight * kl / num_data
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  aux = {
      "train/loss": f32(loss),
      "train/elbo_loss": f32(nll + kl / num_data),
      "train/nll": f32(nll),
      "train/kl": f32(kl),
      "train/kl_bernoulli": f32(kl_b),
      "train/kl_slab": f32(kl_w),
      "train/kl_bias": f32(kl_bias),
      "train/kl_weight": f32(kl_weight),
      "train/tau": f32(tau),
      "train/sigma_y": f32(jnp.exp(params["log_sigma_y"])),
      **core.phi_stats(params, cfg),
  }
  return loss, aux


# ----------------------------------------------------------------------------
# Plain NumPyro SVI loop.


def run_svi(
    cfg: SpikeSlabConfig,
    dataset_x: np.ndarray,
    dataset_y: np.ndarray,
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    inclusion_kl: InclusionKL = "closed_form",
    return_losses: bool = False,
) -> Params | tuple[Params, np.ndarray]:
  """Trains with numpyro.infer.SVI, TraceMeanField_ELBO and optax.adam.

  Initial parameters are core.init's; minibatches come from data.batches
  (seed `seed`); the KL warm-up (core.kl_weight_at) scales the latent sites
  with numpyro.handlers.scale and the temperature follows core.tau_at. One
  jitted svi.update per step; losses are fetched once at the end.

  Args:
    cfg: Model settings.
    dataset_x: (N, p) training inputs.
    dataset_y: (N,) training targets.
    num_steps: Number of SVI steps.
    batch_size: Minibatch size B.
    lr: Adam learning rate.
    seed: Seed of the initial parameters, the draws and the batches.
    inclusion_kl: "closed_form" or "monte_carlo".
    return_losses: Also return the (num_steps,) per-datum training losses
      (-ELBO / N with the warm-up weight).

  Returns:
    core parameter pytree, or (params, losses) if return_losses.
  """
  data_lib.validate(
      dataset_x, dataset_y, task=cfg.likelihood, num_features=cfg.widths[0],
      num_classes=cfg.widths[-1] if cfg.likelihood == "classification"
      else None, name="run_svi",
  )
  num_data = len(dataset_x)
  model, guide = _model_and_guide(cfg, inclusion_kl)
  svi = SVI(model, guide, optax.adam(lr), TraceMeanField_ELBO())
  init_key, svi_key = jax.random.split(jax.random.PRNGKey(seed))
  batches = data_lib.batches(dataset_x, dataset_y, batch_size, seed)
  first = next(batches)
  state = svi.init(
      svi_key, first["x"], first["y"], num_data=num_data,
      init_params=to_numpyro_params(core.init(init_key, cfg)),
  )

  @jax.jit
  def update(state, x, y, step):
    tau = core.tau_at(cfg, step, num_steps)
    weight = core.kl_weight_at(cfg, step, num_steps)
    state, loss = svi.update(
        state, x, y, num_data=num_data, temperature=tau, kl_weight=weight
    )
    return state, loss / num_data

  losses = []
  batch = first
  for step in range(num_steps):
    if step:
      batch = next(batches)
    state, loss = update(state, batch["x"], batch["y"], jnp.int32(step))
    losses.append(loss)
  params = from_numpyro_params(svi.get_params(state), cfg)
  if return_losses:
    return params, np.asarray(jax.device_get(jnp.stack(losses)))
  return params
