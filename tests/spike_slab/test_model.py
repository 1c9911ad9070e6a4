"""Tests of spike_slab.model: NumPyro model and guide vs the core (brief §8.8).

Oracles are independent: float64 NumPy/SciPy formulas and quadrature, and the
plain-JAX core (a different implementation with different noise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from numpyro import handlers
from numpyro.distributions import Normal
from numpyro.distributions import kl as numpyro_kl
from numpyro.infer import SVI, TraceMeanField_ELBO
import optax
from scipy import integrate, special

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import data
from jaxlib_models.spike_slab import model as M
from jaxlib_models.spike_slab.config import SpikeSlabConfig

NUM_DRAWS = 10_000


pytestmark = pytest.mark.usefixtures("fast_compile")


def _kl_b_np(theta, lam):
  """Float64 Bernoulli KL, the two-term sum of brief §2.3."""
  theta = np.asarray(theta, np.float64)
  lam = np.asarray(lam, np.float64)
  log_phi, log_1m_phi = -np.logaddexp(0, -theta), -np.logaddexp(0, theta)
  return np.exp(log_phi) * (log_phi - np.log(lam)) + np.exp(log_1m_phi) * (
      log_1m_phi - np.log1p(-lam)
  )


def _kl_n_np(mu, s, sigma0):
  mu, s = np.asarray(mu, np.float64), np.asarray(s, np.float64)
  return np.log(sigma0 / s) + (s**2 + mu**2) / (2 * sigma0**2) - 0.5


def _kl_logistic_np(a, b):
  """KL(Logistic(a, 1) || Logistic(b, 1)) by quadrature in float64.

  Equals KL(Concrete(a, tau) || Concrete(b, tau)) for every tau (the binary
  Concrete is sigmoid of Logistic(a / tau, 1 / tau), an affine image of
  Logistic(a, 1)).
  """

  def log_pdf(x, c):
    z = x - c
    return -z - 2 * np.logaddexp(0.0, -z)

  def integrand(u):  # x = F_a^{-1}(u), so the integral is over u in (0, 1).
    x = a + np.log(u) - np.log1p(-u)
    return log_pdf(x, a) - log_pdf(x, b)

  val, _ = integrate.quad(integrand, 0.0, 1.0, limit=200, epsabs=1e-11)
  return val


def _random_params(cfg, seed, rho=-1.0):
  """core params with spread-out theta/mu and sizeable posterior noise."""
  params = core.init(jax.random.PRNGKey(seed), cfg)
  rng = np.random.default_rng(seed)
  out = {"log_sigma_y": jnp.float32(np.log(0.7))}
  for l in range(cfg.num_layers):
    layer = dict(params[core.layer_name(l)])
    for k, v in layer.items():
      if k == "theta":
        layer[k] = jnp.asarray(rng.normal(0, 2, v.shape), jnp.float32)
      elif k in ("mu", "m"):
        layer[k] = jnp.asarray(rng.normal(0, 1, v.shape), jnp.float32)
      else:
        layer[k] = jnp.full(v.shape, rho, jnp.float32)
    out[core.layer_name(l)] = layer
  return out


def _batch(cfg, seed, size=32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, cfg.widths[0])).astype(np.float32)
  if cfg.likelihood == "regression":
    y = rng.normal(size=size).astype(np.float32)
  else:
    y = rng.integers(0, cfg.widths[-1], size).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _keys(n, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), n)


def _close_within_4_sigma(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  diff = a.mean() - b.mean()
  assert abs(diff) < 4 * se, f"{a.mean()=} {b.mean()=} {diff=} {se=}"


# ----------------------------------------------------------------------------
# Registered KLs.


def test_inclusion_kl_is_bernoulli_kl():
  """Registered KL(InclusionPosterior || InclusionPrior) == float64 KL_B.

  Planted bug caught: swapping phi and lambda, or computing log(sigmoid)
  naively (inf at theta = -40); tolerance is float32 rounding.
  """
  phis = np.array([1e-6, 0.01, 0.5, 0.99])
  lams = np.array([1e-6, 0.01, 0.5, 0.99])
  theta = np.concatenate([special.logit(phis), [-40.0, 40.0]])
  theta_ij, lam_ij = np.meshgrid(theta.astype(np.float32), lams, indexing="ij")
  for tau in (0.1, 0.5, 2.0):
    q = M.InclusionPosterior(jnp.asarray(theta_ij), tau)
    p = M.InclusionPrior(jnp.asarray(lam_ij, jnp.float32), tau)
    got = numpyro_kl.kl_divergence(q, p)
    want = _kl_b_np(theta_ij, lam_ij)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # Through the Independent wrapper the site uses: summed exactly.
    got_sum = numpyro_kl.kl_divergence(q.to_event(2), p.to_event(2))
    np.testing.assert_allclose(got_sum, want.sum(), rtol=2e-5)


@pytest.mark.parametrize("with_gate", [True, False])
def test_slab_kl_is_phi_times_normal_kl(with_gate):
  """Registered KL(SlabPosterior || Normal) == phi * KL_N (float64 oracle).

  Planted bug caught: dropping the phi factor (the gamma = 0 spike would pay
  the slab KL), or a node gate (1, d_out) not broadcasting over its column.
  """
  rng = np.random.default_rng(0)
  mu = rng.normal(size=(4, 3)).astype(np.float32)
  s = np.exp(rng.normal(-1, 1, size=(4, 3))).astype(np.float32)
  theta = rng.normal(0, 3, size=(1, 3)).astype(np.float32)  # Node gate.
  sigma0 = 1.5
  q = M.SlabPosterior(mu, s, theta if with_gate else None).to_event(2)
  p = Normal(jnp.zeros((4, 3)), sigma0).to_event(2)
  phi = special.expit(theta.astype(np.float64)) if with_gate else 1.0
  want = np.sum(phi * _kl_n_np(mu, s, sigma0))
  np.testing.assert_allclose(numpyro_kl.kl_divergence(q, p), want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["spike_slab", "node_spike_slab", "dense"])
def test_trace_mean_field_uses_closed_form_kl(kind):
  """TraceMeanField_ELBO's latent terms == float64 sums of brief §2.3.

  The terms must not depend on the key (an unregistered pair would give a
  Monte Carlo estimate) and must equal core.kl_terms. Planted bug caught:
  a guide site whose class has no registered KL (e.g. plain Logistic or
  Normal): the KL then varies with the key and misses the phi factor.
  """
  cfg = SpikeSlabConfig(widths=(3, 5, 2, 1), kind=kind, sigma0=1.3,
                        sigma_b=0.8)
  params = _random_params(cfg, 1)
  batch = _batch(cfg, 2, size=8)
  terms_fn = jax.jit(
      lambda k: M.elbo_terms(params, batch, k, cfg=cfg, num_data=40)
  )
  terms = [terms_fn(k) for k in _keys(2)]
  kl_b = kl_w = kl_bias = 0.0
  for l in range(cfg.num_layers):
    layer = params[core.layer_name(l)]
    s = np.log1p(np.exp(np.asarray(layer["rho"], np.float64)))
    v = np.log1p(np.exp(np.asarray(layer["rho_b"], np.float64)))
    kl_n = _kl_n_np(layer["mu"], s, cfg.sigma0)
    bias = np.sum(_kl_n_np(layer["m"], v, cfg.sigma_b))
    if kind == "dense":
      slab, incl = np.sum(kl_n), 0.0
      assert f"g_{l}" not in terms[0]
    else:
      theta = np.asarray(layer["theta"], np.float64)
      slab = np.sum(special.expit(theta) * kl_n)
      incl = np.sum(_kl_b_np(theta, cfg.layer_inclusion(l)))
      for t in terms:
        # 1e-4: float32 KL against float64 when lambda ~ 1 (node kind's
        # output layer, lambda = 0.9999) loses ~4 digits to cancellation.
        np.testing.assert_allclose(t[f"g_{l}"], incl, rtol=1e-4)
    for t in terms:
      np.testing.assert_allclose(t[f"w_{l}"], slab, rtol=1e-5)
      np.testing.assert_allclose(t[f"b_{l}"], bias, rtol=1e-5)
    kl_b, kl_w, kl_bias = kl_b + incl, kl_w + slab, kl_bias + bias
  core_kl = core.kl_terms(params, cfg)
  np.testing.assert_allclose(core_kl["kl_bernoulli"], kl_b, rtol=1e-5)
  np.testing.assert_allclose(core_kl["kl_slab"], kl_w, rtol=1e-5)
  _, aux = jax.jit(
      lambda k: M.numpyro_loss_fn(
          params, batch, k, cfg=cfg, num_data=40, step=5, total_steps=10
      )
  )(_keys(1)[0])
  np.testing.assert_allclose(
      aux["train/kl"], kl_b + kl_w + kl_bias, rtol=1e-5
  )


# ----------------------------------------------------------------------------
# Parity with the core.


@pytest.mark.parametrize(
    "widths, likelihood, kind",
    [
        ((4, 6, 1), "regression", "spike_slab"),
        ((4, 6, 3), "classification", "spike_slab"),
        ((4, 6, 1), "regression", "node_spike_slab"),
    ],
)
def test_expected_log_likelihood_matches_core(widths, likelihood, kind):
  """E_q[mean log p(y|x,w)]: NumPyro guide vs core, 4 sigma over 1e4 draws.

  num_data = 10 B, so a missing N/B plate scale shows as a factor 10.
  Planted bugs caught: gating with the logit g instead of sigmoid(g)
  (difference ~50 sigma), temperature 1/tau instead of tau, and no plate
  scaling.
  """
  cfg = SpikeSlabConfig(widths=widths, likelihood=likelihood, kind=kind)
  params = _random_params(cfg, 3)
  batch = _batch(cfg, 4)
  kw = dict(cfg=cfg, num_data=320, step=0, total_steps=100)

  def numpyro_nll(key):
    return M.numpyro_loss_fn(params, batch, key, **kw)[1]["train/nll"]

  def core_nll(key):
    return core.loss_fn(params, batch, key, **kw)[1]["train/nll"]

  a = jax.jit(jax.vmap(numpyro_nll))(_keys(NUM_DRAWS, 0))
  b = jax.jit(jax.vmap(core_nll))(_keys(NUM_DRAWS, 1))
  _close_within_4_sigma(a, b)
  # At step 0 the warm-up weight is 0: the loss is the likelihood term only.
  loss, aux = jax.jit(
      lambda k: M.numpyro_loss_fn(params, batch, k, **kw)
  )(_keys(1)[0])
  assert float(aux["train/kl_weight"]) == 0.0
  np.testing.assert_allclose(loss, aux["train/nll"], rtol=1e-6)


def test_monte_carlo_gap_is_concrete_minus_bernoulli_kl():
  """ELBO gap (monte_carlo - closed_form) == sum(KL_Concrete - KL_B), 4 sigma.

  KL_Concrete comes from SciPy quadrature in float64. Planted bugs caught:
  prior and guide at different temperatures in monte_carlo mode, or a
  registered (closed-form) KL leaking into monte_carlo mode (gap 0).
  """
  cfg = SpikeSlabConfig(widths=(3, 4, 1), kl_warmup_frac=0.0)
  params = _random_params(cfg, 5)
  batch = _batch(cfg, 6)
  expected = 0.0
  for l in range(cfg.num_layers):
    theta = np.asarray(params[core.layer_name(l)]["theta"], np.float64)
    lam = cfg.layer_inclusion(l)
    kl_c = sum(_kl_logistic_np(t, special.logit(lam)) for t in theta.ravel())
    expected += kl_c - np.sum(_kl_b_np(theta, lam))
  kw = dict(cfg=cfg, num_data=64, step=3, total_steps=10)

  def gap(key):
    mc = M.numpyro_loss_fn(params, batch, key, inclusion_kl="monte_carlo",
                           **kw)[0]
    cf = M.numpyro_loss_fn(params, batch, key, **kw)[0]
    return (mc - cf) * kw["num_data"]

  gaps = np.asarray(jax.jit(jax.vmap(gap))(_keys(NUM_DRAWS, 2)), np.float64)
  se = gaps.std(ddof=1) / np.sqrt(len(gaps))
  assert abs(expected) > 10 * se  # The two KLs really differ here.
  assert abs(gaps.mean() - expected) < 4 * se, (gaps.mean(), expected, se)


def test_numpyro_loss_jits_with_traced_step_and_shards():
  """Traced step/total_steps; sharded batch == unsharded (8 CPU devices).

  Smoke-plus-invariant test: the guide's draws depend on the key only, so
  sharding the batch over the data axis must not change the loss.
  """
  cfg = SpikeSlabConfig(widths=(5, 8, 1), tau_start=1.0)
  params = core.init(jax.random.PRNGKey(0), cfg)
  batch = _batch(cfg, 1, size=16)
  key = jax.random.PRNGKey(3)

  @jax.jit
  def loss_and_grad(params, batch, step):
    fn = lambda p: M.numpyro_loss_fn(  # noqa: E731
        p, batch, key, cfg=cfg, num_data=160, step=step, total_steps=100
    )
    return jax.value_and_grad(fn, has_aux=True)(params)

  (loss, aux), grads = loss_and_grad(params, batch, jnp.int32(5))
  assert float(aux["train/kl_weight"]) == pytest.approx(0.5)
  assert float(aux["train/tau"]) == pytest.approx(0.975)
  for leaf in jax.tree.leaves(grads["layer_0"]):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  mesh = mesh_lib.make_mesh({"data": -1})
  sharded = jax.device_put(
      batch, NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  )
  (loss_s, _), grads_s = loss_and_grad(params, sharded, jnp.int32(5))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      grads_s, grads,
  )


# ----------------------------------------------------------------------------
# Parameters, SVI, errors.


@pytest.mark.parametrize(
    "kind, likelihood",
    [("spike_slab", "regression"), ("node_spike_slab", "classification"),
     ("dense", "regression")],
)
def test_param_round_trip_and_svi_names(kind, likelihood):
  """to/from are exact inverses and name exactly what SVI creates.

  Planted bug caught: a guide param named differently from the converter
  (e.g. "rhob_0"), which SVI would silently initialise from scratch.
  """
  widths = (3, 4, 2) if likelihood == "classification" else (3, 4, 1)
  cfg = SpikeSlabConfig(widths=widths, kind=kind, likelihood=likelihood)
  params = _random_params(cfg, 7)
  flat = M.to_numpyro_params(params)
  back = M.from_numpyro_params(flat, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  model, guide = M.make_model(cfg), M.make_guide(cfg)
  svi = SVI(model, guide, optax.adam(1e-3), TraceMeanField_ELBO())
  batch = _batch(cfg, 0, size=4)
  state = svi.init(jax.random.PRNGKey(0), batch["x"], batch["y"],
                   num_data=12, init_params=flat)
  got = svi.get_params(state)
  want = dict(flat)
  if likelihood == "classification":
    want.pop("log_sigma_y")  # Only the regression model declares it.
  assert sorted(got) == sorted(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # Defaults (no init_params) follow core.init's shapes and constants.
  state = svi.init(jax.random.PRNGKey(1), batch["x"], batch["y"])
  fresh = M.from_numpyro_params(svi.get_params(state), cfg)
  ref = core.init(jax.random.PRNGKey(1), cfg)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, ref)
  if kind != "dense":
    np.testing.assert_array_equal(fresh["layer_0"]["theta"], cfg.init_theta)


def test_run_svi_lowers_loss():
  """200 NumPyro SVI steps on a tiny regression lower the loss.

  Planted bug caught: a sign error in the loss or an SVI loop that does not
  carry its state (the loss would stay flat or rise).
  """
  ds = data.variable_selection(0, p=10, n_train=512, n_val=0, n_test=256)
  cfg = SpikeSlabConfig(widths=(10, 16, 1), kl_warmup_frac=0.0)
  params, losses = M.run_svi(
      cfg, ds.x_train, ds.y_train, num_steps=200, batch_size=64, lr=1e-2,
      seed=0, return_losses=True,
  )
  assert losses.shape == (200,) and np.all(np.isfinite(losses))
  assert losses[-20:].mean() < 0.6 * losses[:20].mean()
  init = core.init(jax.random.PRNGKey(0), cfg)
  x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  rmse = lambda p: core.rmse(  # noqa: E731
      core.predict_mean_network(p, x, cfg)["mean"], y
  )
  assert float(rmse(params)) < 0.7 * float(rmse(init))


class TestErrors:

  cfg = SpikeSlabConfig(widths=(5, 4, 1))

  def _run(self, x, y=None, cfg=None):
    model = M.make_model(cfg or self.cfg)
    with handlers.seed(rng_seed=0):
      model(x, y)

  def test_wrong_feature_count(self):
    """Planted bug caught: no input check (a matmul error deep in a trace)."""
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 5\).*"
                       r"cfg.widths\[0\]=5, got \(8, 4\)"):
      self._run(jnp.ones((8, 4)))

  def test_x_not_2d(self):
    with pytest.raises(ValueError, match=r"got \(5,\); flatten"):
      self._run(jnp.ones((5,)))

  def test_y_shape(self):
    with pytest.raises(ValueError, match=r"y must have shape \(8,\).*"
                       r"got \(8, 1\)"):
      self._run(jnp.ones((8, 5)), jnp.ones((8, 1)))

  def test_float_labels(self):
    cfg = SpikeSlabConfig(widths=(5, 4, 3), likelihood="classification")
    with pytest.raises(ValueError, match="labels must be integers"):
      self._run(jnp.ones((8, 5)), jnp.zeros((8,)), cfg)

  def test_substituted_site_shape(self):
    model = M.make_model(self.cfg)
    with pytest.raises(ValueError, match=r"site 'w_0' has shape \(4, 5\)"):
      with handlers.seed(rng_seed=0):
        with handlers.substitute(data={"w_0": jnp.ones((4, 5))}):
          model(jnp.ones((8, 5)))

  def test_local_reparam_refused(self):
    cfg = SpikeSlabConfig(widths=(5, 4, 1), estimator="local_reparam")
    params = core.init(jax.random.PRNGKey(0), cfg)
    with pytest.raises(ValueError, match="'concrete' only"):
      M.numpyro_loss_fn(params, _batch(cfg, 0, 4), jax.random.PRNGKey(0),
                        cfg=cfg, num_data=4, step=0, total_steps=1)

  def test_missing_params(self):
    with pytest.raises(KeyError, match="theta_1"):
      flat = M.to_numpyro_params(core.init(jax.random.PRNGKey(0), self.cfg))
      del flat["theta_1"]
      M.from_numpyro_params(flat, self.cfg)
