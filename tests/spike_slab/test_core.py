"""Tests of the closed-form variational core (brief §8 items 1, 2, 5-7, 9, 12).

Oracles are float64 NumPy/SciPy re-derivations, Gauss-Hermite quadrature and
Monte Carlo; Monte Carlo checks use 4 standard errors with fixed seeds.
"""

import dataclasses
import functools

import chex
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import flatten_util
import numpy as np
import optax
import pytest
from scipy import special, stats

from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def _logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p) - np.log1p(-p)


def _set_layer(params, l, **values):
  """Copy of params with layer l's leaves replaced by float32 arrays."""
  params = jax.tree.map(lambda a: a, params)
  layer = dict(params[core.layer_name(l)])
  for k, v in values.items():
    layer[k] = jnp.asarray(
        np.broadcast_to(v, layer[k].shape), dtype=jnp.float32
    )
  params[core.layer_name(l)] = layer
  return params


def _random_params(cfg, seed, theta_scale=1.5, rho=(-2.0, -0.5)):
  """Params with random theta, mu, rho, m, rho_b (float32)."""
  rng = np.random.default_rng(seed)
  params = core.init(jax.random.key(seed), cfg)
  for l in range(cfg.num_layers):
    layer = params[core.layer_name(l)]
    new = {
        "mu": rng.normal(0.0, 1.0, layer["mu"].shape),
        "rho": rng.uniform(*rho, layer["rho"].shape),
        "m": rng.normal(0.0, 0.5, layer["m"].shape),
        "rho_b": rng.uniform(*rho, layer["m"].shape),
    }
    if "theta" in layer:
      new["theta"] = rng.normal(0.0, theta_scale, layer["theta"].shape)
    params = _set_layer(params, l, **new)
  return params


def _np(params):
  """float64 NumPy copy of a parameter tree."""
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _softplus(x):
  return np.logaddexp(x, 0.0)


pytestmark = pytest.mark.usefixtures("fast_compile")


# Jitted entry points: one compilation each instead of op-by-op dispatch.
_loss = jax.jit(core.loss_fn, static_argnames=("cfg",))
_grad = jax.jit(jax.grad(core.loss_fn, has_aux=True), static_argnames=("cfg",))
_predict = jax.jit(core.predict, static_argnames=("cfg", "num_samples"))


# ----------------------------------------------------------------------------
# 1. KL divergences.


class KLTest(chex.TestCase):

  def test_kl_bernoulli_matches_float64_two_term_sum(self):
    """Brief §8.1: KL_B against the two-term sum in float64 on a grid.

    Planted bug: log(1 - sigmoid(theta)) in place of log_sigmoid(-theta)
    gives NaN at theta = 40 (asserted finite below); dropping the (1 - phi)
    term breaks the float64 comparison.
    """
    grid = np.array([1e-6, 0.01, 0.5, 0.99])
    phi, lam = (a.ravel() for a in np.meshgrid(grid, grid))
    expected = phi * (np.log(phi) - np.log(lam)) + (1 - phi) * (
        np.log1p(-phi) - np.log1p(-lam)
    )
    with jax.enable_x64(True):
      got = core.kl_bernoulli(jnp.asarray(_logit(phi)), jnp.asarray(lam))
      np.testing.assert_allclose(
          np.asarray(got), expected, rtol=1e-10, atol=1e-15
      )
    got32 = core.kl_bernoulli(
        jnp.asarray(_logit(phi), jnp.float32), jnp.asarray(lam, jnp.float32)
    )
    np.testing.assert_allclose(
        np.asarray(got32), expected, rtol=2e-4, atol=1e-6
    )
    # Saturated logits stay finite and exact (pitfall 9).
    extreme = core.kl_bernoulli(jnp.array([40.0, -40.0]), 0.1)
    np.testing.assert_allclose(
        np.asarray(extreme), [-np.log(0.1), -np.log(0.9)], rtol=1e-6
    )

  def test_kl_normal_matches_gauss_hermite(self):
    """Brief §8.1: KL_N against 40-node Gauss-Hermite quadrature (1e-8).

    Planted bug: (s^2 + mu^2) / sigma0^2 without the factor 1/2 fails.
    """
    nodes, wts = np.polynomial.hermite.hermgauss(40)
    cases = [
        (0.0, 1.0, 1.0),
        (0.7, 0.3, 1.0),
        (-2.0, 1e-3, 0.5),
        (3.0, 2.0, 1.5),
    ]
    with jax.enable_x64(True):
      for mu, s, sigma0 in cases:
        w = mu + np.sqrt(2.0) * s * nodes
        log_ratio = stats.norm.logpdf(w, mu, s) - stats.norm.logpdf(
            w, 0.0, sigma0
        )
        expected = np.sum(wts * log_ratio) / np.sqrt(np.pi)
        got = float(core.kl_normal(jnp.float64(mu), jnp.float64(s), sigma0))
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)

  @parameterized.parameters("spike_slab", "node_spike_slab")
  def test_joint_kl_matches_monte_carlo(self, kind):
    """Brief §8.1: sum of kl_terms against 1e6 draws of log q - log p.

    log q(w, g) - log p(w, g) = g log(phi / lam)
    + (1 - g) log((1 - phi) / (1 - lam)) + g log(N(w; mu, s) / N(w; 0, s0));
    the g = 0 draws contribute only the Bernoulli log-ratio. Node kind: one
    gate per output column. Biases add log N(b; m, v) / N(b; 0, sigma_b).
    Planted bug: dropping the phi weight on the slab KL (plain sum of KL_N)
    fails by tens of standard errors.
    """
    cfg = SpikeSlabConfig(
        widths=(3, 2),
        kind=kind,
        pi0=0.3,
        likelihood="classification",
        sigma0=1.3,
        sigma_b=0.8,
    )
    params = _random_params(cfg, seed=1)
    kls = core.kl_terms(params, cfg)
    got = float(kls["kl_bernoulli"] + kls["kl_slab"] + kls["kl_bias"])

    p = _np(params)["layer_0"]
    lam = cfg.layer_inclusion(0)
    phi = special.expit(p["theta"])
    s, v = _softplus(p["rho"]), _softplus(p["rho_b"])
    n = 1_000_000
    rng = np.random.default_rng(0)
    g = rng.random((n,) + phi.shape) < phi
    w = p["mu"] + s * rng.standard_normal((n,) + s.shape)
    slab = stats.norm.logpdf(w, p["mu"], s) - stats.norm.logpdf(
        w, 0.0, cfg.sigma0
    )
    bern = np.where(g, np.log(phi / lam), np.log((1 - phi) / (1 - lam)))
    gw = np.broadcast_to(g, w.shape)
    total = bern.reshape(n, -1).sum(1) + np.where(gw, slab, 0.0).reshape(
        n, -1
    ).sum(1)
    b = p["m"] + v * rng.standard_normal((n,) + v.shape)
    total += (
        stats.norm.logpdf(b, p["m"], v) - stats.norm.logpdf(b, 0.0, cfg.sigma_b)
    ).sum(1)
    se = total.std() / np.sqrt(n)
    assert abs(got - total.mean()) < 4 * se, (got, total.mean(), se)

  def test_dense_kind_has_no_bernoulli_term(self):
    """Dense kind: KL = sum KL_N of all weights (weight 1), no Bernoulli KL.

    Planted bug: weighting the dense slab KL by sigmoid(init_theta) fails.
    """
    cfg = SpikeSlabConfig(widths=(3, 4, 1), kind="dense")
    params = _random_params(cfg, seed=2)
    kls = core.kl_terms(params, cfg)
    p = _np(params)
    expected = 0.0
    for l in range(2):
      s = _softplus(p[f"layer_{l}"]["rho"])
      mu = p[f"layer_{l}"]["mu"]
      expected += np.sum(np.log(1.0 / s) + (s**2 + mu**2) / 2 - 0.5)
    assert float(kls["kl_bernoulli"]) == 0.0
    np.testing.assert_allclose(float(kls["kl_slab"]), expected, rtol=1e-5)


# ----------------------------------------------------------------------------
# 2. Binary Concrete.


class ConcreteTest(chex.TestCase):

  @parameterized.parameters(0.1, 0.5, 2.0)
  def test_probability_above_half_is_phi(self, tau):
    """Brief §8.2: P(gamma_tilde > 1/2) = phi for every tau (1e5 draws, 4 sd).

    Planted bug: Gumbel noise -log(-log u) instead of logistic noise
    log u - log(1 - u) shifts the probability and fails.
    """
    theta = jnp.array([-1.5, 0.2, 2.0], jnp.float32)
    n = 100_000
    g = core.sample_relaxed(
        jax.random.key(0), jnp.broadcast_to(theta, (n, 3)), tau
    )
    frac = np.mean(np.asarray(g) > 0.5, axis=0)
    phi = special.expit(np.asarray(theta, np.float64))
    sd = np.sqrt(phi * (1 - phi) / n)
    np.testing.assert_array_less(np.abs(frac - phi), 4 * sd)

  def test_low_temperature_mean_is_phi(self):
    """Brief §8.2: E[gamma_tilde] within 0.01 of phi at tau = 0.01.

    Planted bug: dividing by (1 + tau) instead of tau keeps draws soft and
    fails.
    """
    theta = jnp.array([-1.5, 0.2, 2.0], jnp.float32)
    n = 100_000
    g = core.sample_relaxed(
        jax.random.key(1), jnp.broadcast_to(theta, (n, 3)), 0.01
    )
    phi = special.expit(np.asarray(theta, np.float64))
    np.testing.assert_array_less(np.abs(np.mean(np.asarray(g), 0) - phi), 0.01)

  def test_hard_gates_are_bernoulli_phi(self):
    """sample_weights(hard=True) draws exact 0/1 gates with P(1) = phi.

    2e4 draws, 4 sd. Planted bug: hard=True falling back to the relaxed draw
    makes some weights neither 0 nor w and fails the exactness check.
    """
    cfg = SpikeSlabConfig(widths=(2, 2), likelihood="classification")
    params = _set_layer(
        core.init(jax.random.key(0), cfg),
        0,
        mu=1.0,
        rho=-30.0,
        theta=[[-1.0, 0.0], [1.5, 3.0]],
    )
    keys = jax.random.split(jax.random.key(3), 20_000)
    w = jax.jit(
        jax.vmap(
            lambda k: core.sample_weights(params, k, cfg, tau=0.5, hard=True)[
                0
            ][0]
        )
    )(keys)
    w = np.asarray(w)
    assert np.all((w == 0.0) | (w == 1.0))
    phi = special.expit([[-1.0, 0.0], [1.5, 3.0]])
    sd = np.sqrt(phi * (1 - phi) / w.shape[0])
    np.testing.assert_array_less(np.abs(w.mean(0) - phi), 4 * sd)


# ----------------------------------------------------------------------------
# 5. Local reparameterisation.


def _mc_preactivations(x, p, kind, n, seed):
  """n draws of x @ (g * w) in float64 with hard gates."""
  rng = np.random.default_rng(seed)
  mu, s = p["mu"], _softplus(p["rho"])
  w = mu + s * rng.standard_normal((n,) + mu.shape)
  if kind != "dense":
    phi = special.expit(p["theta"])
    g = rng.random((n,) + phi.shape) < phi
    w = w * g
  return np.einsum("bi,nio->nbo", x, w)


class LocalReparamTest(chex.TestCase):

  @parameterized.parameters("spike_slab", "node_spike_slab", "dense")
  def test_moments_match_monte_carlo(self, kind):
    """Brief §8.5: M, V equal the MC mean and variance of x (g * w), 1e5 draws.

    Planted bug: V = x^2 (phi (s^2 + mu^2)) without the -phi^2 mu^2 term
    fails (spike_slab); the per-weight formula applied to node gates fails
    (node_spike_slab).
    """
    cfg = SpikeSlabConfig(widths=(4, 2), kind=kind, likelihood="classification")
    params = _random_params(cfg, seed=3)
    x = np.random.default_rng(4).normal(size=(3, 4))
    mean, var = core.preactivation_moments(
        jnp.asarray(x, jnp.float32), params["layer_0"], kind
    )
    a = _mc_preactivations(x, _np(params)["layer_0"], kind, 100_000, seed=5)
    n = a.shape[0]
    mc_mean, mc_var = a.mean(0), a.var(0)
    m4 = np.mean((a - mc_mean) ** 4, 0)
    np.testing.assert_array_less(
        np.abs(np.asarray(mean) - mc_mean), 4 * np.sqrt(mc_var / n) + 1e-6
    )
    np.testing.assert_array_less(
        np.abs(np.asarray(var) - mc_var),
        4 * np.sqrt((m4 - mc_var**2) / n) + 1e-6,
    )

  @parameterized.parameters("spike_slab", "node_spike_slab")
  def test_sampled_preactivations_have_the_moments(self, kind):
    """forward_local_reparam draws have mean M + m and variance V + v^2.

    One linear layer, 2e4 keys, 4 sd. For the node kind the gate is Concrete
    at tau = 0.02, close to the hard gate. Planted bug: leaving out the bias
    variance v^2 fails.
    """
    cfg = SpikeSlabConfig(
        widths=(4, 2),
        kind=kind,
        estimator="local_reparam",
        likelihood="classification",
    )
    params = _random_params(cfg, seed=6, rho=(-1.0, -0.5))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 4)), jnp.float32)
    keys = jax.random.split(jax.random.key(8), 20_000)
    a = jax.jit(
        jax.vmap(
            lambda k: core.forward_local_reparam(params, k, x, cfg, tau=0.02)
        )
    )(keys)
    a = np.asarray(a, np.float64)
    mean, var = core.preactivation_moments(x, params["layer_0"], kind)
    p = _np(params)["layer_0"]
    mean = np.asarray(mean) + p["m"]
    var = np.asarray(var) + _softplus(p["rho_b"]) ** 2
    n = a.shape[0]
    m4 = np.mean((a - a.mean(0)) ** 4, 0)
    np.testing.assert_array_less(
        np.abs(a.mean(0) - mean), 4 * np.sqrt(var / n) + 1e-3
    )
    np.testing.assert_array_less(
        np.abs(a.var(0) - var), 4 * np.sqrt((m4 - var**2) / n) + 1e-3
    )


# ----------------------------------------------------------------------------
# 6. Likelihood term and predictive.


def _linear_setup(seed=9):
  cfg = SpikeSlabConfig(widths=(3, 1), learn_sigma_y=False)
  params = _random_params(cfg, seed=seed, rho=(-1.0, -0.5))
  params = _set_layer(
      params, 0, theta=[[-0.5], [0.4], [1.0]], mu=[[1.5], [-2.0], [1.0]]
  )
  x = np.array([0.8, -1.1, 0.6])
  y = 0.3
  p = _np(params)["layer_0"]
  phi = special.expit(p["theta"][:, 0])
  mu, s2 = p["mu"][:, 0], _softplus(p["rho"][:, 0]) ** 2
  mean = x @ (phi * mu) + p["m"][0]
  var = (
      x**2 @ (phi * (s2 + mu**2) - phi**2 * mu**2)
      + _softplus(p["rho_b"][0]) ** 2
  )
  return cfg, params, x, y, mean, var


@functools.partial(jax.jit, static_argnames=("cfg", "n", "hard"))
def _outputs(params, cfg, xb, n, tau, hard, seed):
  """n draws of the network output at xb (1, d)."""
  keys = jax.random.split(jax.random.key(seed), n)

  def one(k):
    w = core.sample_weights(params, k, cfg, tau=tau, hard=hard)
    return core.forward(w, xb, cfg.activation)[0, 0]

  return jax.vmap(one)(keys)


def _squared_errors(params, cfg, x, y, n, *, tau, hard, seed):
  xb = jnp.asarray(x[None, :], jnp.float32)
  f = np.asarray(_outputs(params, cfg, xb, n, tau, hard, seed), np.float64)
  return (y - f) ** 2


class LikelihoodTest(chex.TestCase):

  def test_log_likelihood_matches_scipy(self):
    """Gaussian and categorical log-likelihoods against SciPy/NumPy.

    Planted bug: omitting -log sigma_y from the Gaussian fails.
    """
    rng = np.random.default_rng(0)
    out = rng.normal(size=(5, 1))
    y = rng.normal(size=5)
    got = core.log_likelihood(
        jnp.asarray(out, jnp.float32),
        jnp.asarray(y, jnp.float32),
        jnp.float32(np.log(0.7)),
        "regression",
    )
    np.testing.assert_allclose(
        np.asarray(got), stats.norm.logpdf(y, out[:, 0], 0.7), rtol=1e-5
    )
    logits = rng.normal(size=(5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    got = core.log_likelihood(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(labels),
        jnp.float32(0.0),
        "classification",
    )
    expected = special.log_softmax(logits, 1)[np.arange(5), labels]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)

  def test_expected_squared_error_is_unbiased_with_hard_gates(self):
    """Brief §8.6: E_q[(y - x w - b)^2] = (y - x phi mu - m)^2 + Var (1e5).

    Planted bug: sampling the relaxed gate (tau = 0.5) when hard=True biases
    the estimate and fails.
    """
    cfg, params, x, y, mean, var = _linear_setup()
    se2 = _squared_errors(
        params, cfg, x, y, 100_000, tau=0.5, hard=True, seed=10
    )
    expected = (y - mean) ** 2 + var
    assert abs(se2.mean() - expected) < 4 * se2.std() / np.sqrt(se2.size), (
        se2.mean(),
        expected,
    )

  def test_concrete_bias_shrinks_as_tau_decreases(self):
    """Brief §8.6: |E_concrete[(y - f)^2] - exact| falls as tau: 2, 0.5, 0.1.

    Each step down must exceed 4 combined standard errors; 1e5 draws each.
    Planted bug: sample_relaxed ignoring tau (always tau = 0.5) makes the
    biases equal and fails.
    """
    cfg, params, x, y, mean, var = _linear_setup()
    exact = (y - mean) ** 2 + var
    biases, ses = [], []
    for i, tau in enumerate([2.0, 0.5, 0.1]):
      se2 = _squared_errors(
          params, cfg, x, y, 100_000, tau=tau, hard=False, seed=20 + i
      )
      biases.append(abs(se2.mean() - exact))
      ses.append(se2.std() / np.sqrt(se2.size))
    for i in range(2):
      margin = 4 * np.hypot(ses[i], ses[i + 1])
      assert biases[i] - biases[i + 1] > margin, (biases, ses)

  def test_regression_predictive_moments(self):
    """predict: mean -> x phi mu + m, var -> Var + sigma_y^2 (hard draws).

    One linear layer, S = 20000, 4 sd. Planted bug: predict with relaxed
    gates (hard=False) underestimates the variance and fails.
    """
    cfg, params, x, _, mean, var = _linear_setup()
    s = 20_000
    pred = _predict(
        params, jax.random.key(11), jnp.asarray(x[None, :], jnp.float32), cfg, s
    )
    sigma2 = cfg.sigma_y**2
    assert abs(float(pred["mean"][0]) - mean) < 4 * np.sqrt(var / s)
    # Var of a sample variance of a non-Gaussian: bound by 4 sd with a
    # kurtosis allowance of 6 (the mixture is mildly heavy tailed).
    assert abs(float(pred["var"][0]) - sigma2 - var) < 4 * var * np.sqrt(
        6.0 / s
    )

  def test_predict_is_mean_network_when_posterior_is_a_point(self):
    """theta = 40 and s ~ 1e-13: predict equals predict_mean_network.

    Planted bug: softmax of averaged logits would still pass here; this test
    only pins shapes, normalisation and the hard-gate path (smoke test).
    """
    cfg = SpikeSlabConfig(widths=(3, 4, 3), likelihood="classification")
    params = core.init(jax.random.key(0), cfg)
    for l in range(2):
      params = _set_layer(params, l, theta=40.0, rho=-30.0, rho_b=-30.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    probs = _predict(params, jax.random.key(1), x, cfg, 4)["probs"]
    ref = core.predict_mean_network(params, x, cfg)["probs"]
    chex.assert_shape(probs, (5, 3))
    np.testing.assert_allclose(np.asarray(probs), np.asarray(ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------
# Loss contract, schedules, kinds.


class LossTest(chex.TestCase):

  def test_schedules(self):
    """KL warm-up and tau annealing values, also with traced steps.

    Planted bug: warm-up over total_steps instead of 10 % fails.
    """
    cfg = SpikeSlabConfig(
        widths=(2, 1), kl_warmup_frac=0.1, tau=0.5, tau_start=1.0
    )
    kw = jax.jit(lambda s: core.kl_weight_at(cfg, s, 100))
    np.testing.assert_allclose(
        [float(kw(s)) for s in (0, 5, 10, 50)], [0.0, 0.5, 1.0, 1.0]
    )
    nowarm = dataclasses.replace(cfg, kl_warmup_frac=0.0)
    assert float(core.kl_weight_at(nowarm, 0, 100)) == 1.0
    tau = jax.jit(lambda s, t: core.tau_at(cfg, s, t))
    np.testing.assert_allclose(
        [float(tau(s, 100)) for s in (0, 50, 100, 200)],
        [1.0, 0.75, 0.5, 0.5],
        rtol=1e-6,
    )
    assert (
        float(core.tau_at(dataclasses.replace(cfg, tau_start=None), 3, 10))
        == 0.5
    )

  def test_loss_matches_numpy_oracle_for_point_weights(self):
    """loss = mean NLL + beta KL / N against a NumPy re-derivation.

    theta = 40 and s ~ 1e-13 make the sampled net the mean net, so the NLL
    is a NumPy Gaussian NLL; the KL is recomputed in NumPy from §2.3; beta
    = 0.3 (step 3 of a 10 % warm-up over 100 steps). Planted bugs: summing
    instead of averaging the batch NLL, or forgetting / num_data, fail.
    """
    cfg = SpikeSlabConfig(
        widths=(3, 4, 1),
        activation="tanh",
        sigma_y=0.6,
        pi0=0.2,
        sigma0=1.5,
        sigma_b=0.7,
    )
    params = core.init(jax.random.key(0), cfg)
    for l in range(2):
      params = _set_layer(
          params, l, theta=40.0, rho=-30.0, rho_b=-30.0, m=0.1 * (l + 1)
      )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=6)
    loss, aux = _loss(
        params,
        {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
        jax.random.key(1),
        cfg=cfg,
        num_data=50,
        step=3,
        total_steps=100,
    )
    p = _np(params)
    h = np.tanh(x @ p["layer_0"]["mu"] + p["layer_0"]["m"])
    f = (h @ p["layer_1"]["mu"] + p["layer_1"]["m"])[:, 0]
    nll = np.mean(-stats.norm.logpdf(y, f, 0.6))
    kl = 0.0
    for l in range(2):
      q = p[f"layer_{l}"]
      lam = 1 - (1 - 0.2) ** (1 / cfg.widths[l])
      # phi = 1 in float64 up to 4e-18: KL_B = -log(lam).
      kl += q["theta"].size * -np.log(lam)
      s, v = _softplus(q["rho"]), _softplus(q["rho_b"])
      kl += np.sum(np.log(1.5 / s) + (s**2 + q["mu"] ** 2) / 4.5 - 0.5)
      kl += np.sum(np.log(0.7 / v) + (v**2 + q["m"] ** 2) / 0.98 - 0.5)
    np.testing.assert_allclose(float(aux["train/nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(aux["train/kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), nll + 0.3 * kl / 50, rtol=1e-5)

  @parameterized.parameters("spike_slab", "node_spike_slab", "dense")
  def test_same_key_same_draw_on_any_batch_split(self, kind):
    """Contract: loss(full batch) = mean of the losses of two equal halves.

    The weight noise depends on the key only, so the halves see the same
    draw. Planted bug: sampling noise with a key folded with the batch size
    fails.
    """
    cfg = SpikeSlabConfig(widths=(3, 5, 1), kind=kind)
    params = _random_params(cfg, seed=12)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=8), jnp.float32)
    kw = dict(cfg=cfg, num_data=100, step=50, total_steps=100)
    key = jax.random.key(2)
    full, _ = _loss(params, {"x": x, "y": y}, key, **kw)
    a, _ = _loss(params, {"x": x[:4], "y": y[:4]}, key, **kw)
    b, _ = _loss(params, {"x": x[4:], "y": y[4:]}, key, **kw)
    np.testing.assert_allclose(
        float(full), (float(a) + float(b)) / 2, rtol=1e-6
    )

  @parameterized.parameters(
      ("spike_slab", "local_reparam", "classification"),
      ("node_spike_slab", "concrete", "regression"),
      ("node_spike_slab", "local_reparam", "classification"),
      ("dense", "concrete", "classification"),
  )
  def test_kinds_init_loss_predict(self, kind, estimator, likelihood):
    """Smoke test: every kind/estimator initialises, has finite loss/grads.

    Also pins the parameter layout (theta (d_in, d_out), (1, d_out) or
    absent) and the aux keys.
    """
    out = 1 if likelihood == "regression" else 3
    cfg = SpikeSlabConfig(
        widths=(4, 5, out),
        kind=kind,
        estimator=estimator,
        likelihood=likelihood,
    )
    params = core.init(jax.random.key(0), cfg)
    for l in range(2):
      layer = params[core.layer_name(l)]
      d_in, d_out = cfg.widths[l], cfg.widths[l + 1]
      chex.assert_shape(layer["mu"], (d_in, d_out))
      want = {"spike_slab": (d_in, d_out), "node_spike_slab": (1, d_out)}
      if kind in want:
        chex.assert_shape(layer["theta"], want[kind])
      else:
        assert "theta" not in layer
    x = jnp.ones((6, 4), jnp.float32)
    y = (
        jnp.zeros((6,), jnp.float32)
        if likelihood == "regression"
        else jnp.arange(6) % 3
    )
    grads, aux = _grad(
        params,
        {"x": x, "y": y},
        jax.random.key(1),
        cfg=cfg,
        num_data=60,
        step=0,
        total_steps=10,
    )
    chex.assert_tree_all_finite(grads)
    keys = {
        "train/nll",
        "train/kl",
        "train/kl_weight",
        "train/tau",
        "train/sigma_y",
        "phi/mean_layer_0",
        "phi/frac_gt_half_layer_1",
    }
    assert keys <= set(aux)
    for v in aux.values():
      assert v.dtype == jnp.float32 and v.shape == ()
    pred = _predict(params, jax.random.key(2), x, cfg, 3)
    if likelihood == "regression":
      chex.assert_shape([pred["mean"], pred["var"]], (6,))
    else:
      chex.assert_shape(pred["probs"], (6, 3))
    if kind == "dense":
      assert float(aux["train/kl_bernoulli"]) == 0.0

  def test_fixed_sigma_y_gets_no_gradient(self):
    """learn_sigma_y=False: zero gradient on log_sigma_y; True: non-zero.

    Planted bug: dropping the stop_gradient fails.
    """
    rng = np.random.default_rng(3)
    batch = {
        "x": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
        "y": jnp.asarray(3 + rng.normal(size=5), jnp.float32),
    }
    for learn in (False, True):
      cfg = SpikeSlabConfig(widths=(2, 3, 1), learn_sigma_y=learn)
      params = core.init(jax.random.key(0), cfg)
      g, _ = _grad(
          params,
          batch,
          jax.random.key(1),
          cfg=cfg,
          num_data=5,
          step=1,
          total_steps=2,
      )
      assert (float(g["log_sigma_y"]) != 0.0) == learn


# ----------------------------------------------------------------------------
# 7. Gradient check.


@pytest.mark.parametrize("estimator", ["concrete", "local_reparam"])
def test_gradient_matches_central_differences(estimator):
  """Brief §8.7: jax.grad of the loss, fixed key, vs central differences.

  float64, tanh net, every coordinate; h = 1e-6; tolerance 1e-6 relative
  (plus 1e-9 of the gradient norm for near-zero entries). Planted bug:
  stop_gradient on phi in the slab-KL weight fails.
  """
  with jax.enable_x64(True):
    cfg = SpikeSlabConfig(
        widths=(3, 4, 1),
        activation="tanh",
        estimator=estimator,
        kl_warmup_frac=0.0,
    )
    params = _random_params(cfg, seed=13, theta_scale=1.0)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    flat, unravel = flatten_util.ravel_pytree(params)
    rng = np.random.default_rng(2)
    batch = {
        "x": jnp.asarray(rng.normal(size=(5, 3))),
        "y": jnp.asarray(rng.normal(size=5)),
    }

    @jax.jit
    def f(v):
      return core.loss_fn(
          unravel(v),
          batch,
          jax.random.key(3),
          cfg=cfg,
          num_data=40,
          step=1,
          total_steps=2,
      )[0]

    assert f(flat).dtype == jnp.float64
    grad = np.asarray(jax.grad(f)(flat))
    h = 1e-6
    eye = np.eye(flat.size) * h
    fd = (
        np.asarray(jax.vmap(f)(flat[None, :] + eye))
        - np.asarray(jax.vmap(f)(flat[None, :] - eye))
    ) / (2 * h)
    np.testing.assert_allclose(
        grad, fd, rtol=1e-6, atol=1e-9 * np.linalg.norm(fd)
    )


# ----------------------------------------------------------------------------
# 9. Compile count.


def test_jitted_step_compiles_once():
  """Brief §8.9: loss_fn + optax adam step traces exactly once over 5 steps.

  Counts traces with a Python side effect in the traced function. Planted
  bug: a weak-typed log_sigma_y (jnp.asarray(math.log(sigma_y))) in init
  retraces after the first update and fails.
  """
  cfg = SpikeSlabConfig(widths=(3, 4, 1), tau_start=1.0)
  params = core.init(jax.random.key(0), cfg)
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  traces = []
  rng = np.random.default_rng(0)
  batch = {
      "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=8), jnp.float32),
  }

  @jax.jit
  def step_fn(params, opt_state, batch, key, step):
    traces.append(1)
    grads, aux = jax.grad(core.loss_fn, has_aux=True)(
        params,
        batch,
        jax.random.fold_in(key, step),
        cfg=cfg,
        num_data=80,
        step=step,
        total_steps=5,
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  key = jax.random.key(1)
  for step in range(5):
    params, opt_state, aux = step_fn(
        params, opt_state, batch, key, jnp.asarray(step, jnp.int32)
    )
  jax.block_until_ready(aux)
  assert len(traces) == 1, f"traced {len(traces)} times"


# ----------------------------------------------------------------------------
# 12. Golden single step.

# Recorded on a 2-core x86 CPU, jax 0.10.2, float32, with this module's
# jax_disable_most_optimizations fixture (fused XLA moves them by ~2e-7).
_GOLDEN = {
    "loss0": 1.9845681190490723,
    "grad_norm0": 0.4782603681087494,
    "loss1": 2.1537294387817383,
    "grad_norm1": 0.48511216044425964,
}


def test_golden_single_step():
  """Brief §8.12: widths (10, 8, 8, 1), key 0, fixed batch; pinned to 1e-6.

  Loss and gradient global norm at step 5 of 100 (KL weight 0.5), then again
  after one adam(1e-3) update at step 6. Any change to parameterisation,
  defaults, key handling or noise order moves these numbers.
  """
  cfg = SpikeSlabConfig(widths=(10, 8, 8, 1))
  key = jax.random.key(0)
  init_key, step_key = jax.random.split(key)
  params = core.init(init_key, cfg)
  rng = np.random.default_rng(0)
  batch = {
      "x": jnp.asarray(rng.normal(size=(16, 10)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=16), jnp.float32),
  }
  opt = optax.adam(1e-3)

  @jax.jit
  def step_fn(params, opt_state, step):
    grads, aux = jax.grad(core.loss_fn, has_aux=True)(
        params,
        batch,
        jax.random.fold_in(step_key, step),
        cfg=cfg,
        num_data=1000,
        step=step,
        total_steps=100,
    )
    updates, opt_state = opt.update(grads, opt_state, params)
    return (
        optax.apply_updates(params, updates),
        opt_state,
        aux["train/loss"],
        optax.tree.norm(grads),
    )

  opt_state = opt.init(params)
  got = {}
  for i, step in enumerate((5, 6)):
    params, opt_state, loss, grad_norm = step_fn(params, opt_state, step)
    got[f"loss{i}"], got[f"grad_norm{i}"] = float(loss), float(grad_norm)
  if any(v is None for v in _GOLDEN.values()):
    pytest.fail(f"golden values not set: {got!r}")
  for name, want in _GOLDEN.items():
    np.testing.assert_allclose(
        got[name],
        want,
        rtol=1e-6,
        err_msg=(
            f"{name} moved; if this change is intended "
            "(parameterisation, defaults, seed), update the reference "
            "values"
        ),
    )


# ----------------------------------------------------------------------------
# Metrics.


def test_metrics_against_hand_computation():
  """rmse, NLLs, accuracy and ECE on a hand-worked example.

  Top-class confidences 0.92 (correct), 0.83 (wrong), 0.64, 0.57, 0.71
  (correct), away from bin edges. 10 bins, one example each:
  (0.08 + 0.83 + 0.36 + 0.43 + 0.29) / 5 = 0.398. 3 bins: [2/3, 1) holds
  0.92, 0.83, 0.71: |2 - 2.46|; [1/3, 2/3) holds 0.64, 0.57: |2 - 1.21|;
  (0.46 + 0.79) / 5 = 0.25. Planted bug: averaging |acc - conf| over bins
  instead of weighting by counts gives 0.2747 with 3 bins and fails.
  """
  mean, y = jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 3.0, 2.0])
  np.testing.assert_allclose(
      float(core.rmse(mean, y)), np.sqrt(5 / 3), rtol=1e-6
  )
  var = jnp.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(
      float(core.gaussian_nll(mean, var, y)),
      -np.mean(stats.norm.logpdf(y, mean, np.sqrt(var))),
      rtol=1e-6,
  )
  probs = jnp.array(
      [[0.92, 0.08], [0.17, 0.83], [0.64, 0.36], [0.43, 0.57], [0.71, 0.29]]
  )
  labels = jnp.array([0, 0, 0, 1, 0])
  np.testing.assert_allclose(float(core.accuracy(probs, labels)), 0.8)
  np.testing.assert_allclose(
      float(core.categorical_nll(probs, labels)),
      -np.mean(np.log([0.92, 0.17, 0.64, 0.57, 0.71])),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      float(core.ece(probs, labels, bins=10)), 0.398, rtol=1e-5
  )
  np.testing.assert_allclose(
      float(core.ece(probs, labels, bins=3)), 0.25, rtol=1e-5
  )
