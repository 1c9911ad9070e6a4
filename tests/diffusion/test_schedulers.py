"""DDIM / Euler / LCM samplers vs diffusers 0.39.0 (PyTorch), plus invariants.

Step tolerance: |ours - diffusers| <= 1e-5 * max(1, |x_t|max, |out|max) per
step, in float32. The scale factor matters only at zero terminal SNR, where
Euler starts at σ ≈ 4096 and x - (x - x̂₀) cancels: one float32 ulp of x is
then 2.4e-4 absolute (the schedule tables themselves agree to 1 ulp;
diffusers computes √ with torch.pow). Timesteps must be equal (Karras'
fractional ones to 1e-4, about one float32 ulp at 999).

Each chain runs a full schedule with random model outputs; both samplers get
the same inputs at every step (diffusers' trajectory), so an error cannot
hide behind a later step. Planted-bug checks done while writing (each failed
here): DDIM t' = t - 1 instead of t - T//N; v-prediction x̂₀ with + σ v̂;
dropping the Euler input scaling; LCM c_out without the timestep scaling;
zero-SNR without restoring ᾱ_1; float32 cumprod accumulation (ᾱ drifts
1e-6 relative; torch accumulates in float64).
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxlib_models.diffusion import schedulers as S

pytestmark = [
    pytest.mark.usefixtures("fast_compile"),
    # diffusers 0.39.0 itself calls np.array(torch tensor, copy=False).
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't"
                               " accept a copy keyword:DeprecationWarning"),
]

# SD 1.5 scheduler_config.json values (the base of our defaults).
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SHAPE = (2, 4, 8, 8)


def _oracles():
  return pytest.importorskip("torch"), pytest.importorskip("diffusers")


def _assert_step_close(got, want, *inputs):
  got, want = np.asarray(got), np.asarray(want)
  scale = max([1.0, float(np.abs(want).max())]
              + [float(np.abs(np.asarray(x)).max()) for x in inputs])
  diff = float(np.abs(got - want).max())
  assert diff <= 1e-5 * scale, (diff, scale)


def _randn(rng):
  return rng.randn(*SHAPE).astype(np.float32)


CASES = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
         timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True),  # leading: never reaches t = 999
    dict(timestep_spacing="linspace", prediction_type="sample"),
    dict(timestep_spacing="trailing"),
]


@pytest.mark.oracle
@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_matches_diffusers(kw, steps):
  torch, diffusers = _oracles()
  ref = diffusers.DDIMScheduler(**{**SD, **kw})
  ref.set_timesteps(steps)
  cfg = S.DDIMConfig(**kw)
  sched = S.ddim_set_timesteps(cfg, steps)
  np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(),
                             rtol=1e-6, atol=1e-7)
  step = jax.jit(functools.partial(S.ddim_step, cfg))
  rng = np.random.RandomState(0)
  x = _randn(rng)
  for t in ref.timesteps:
    m = _randn(rng)
    want = ref.step(torch.tensor(m), t, torch.tensor(x))
    got, x0 = step(sched, jnp.asarray(m), jnp.asarray(int(t)), jnp.asarray(x))
    _assert_step_close(got, want.prev_sample, x)
    _assert_step_close(x0, want.pred_original_sample, x)
    x = want.prev_sample.numpy()


@pytest.mark.oracle
def test_ddim_eta_and_clipping_with_diffusers_class_defaults():
  """diffusers' own defaults (linear betas, clip_sample=True, alpha 1) read
  through `from_diffusers_config`; eta = 0.7 with explicit noise."""
  torch, diffusers = _oracles()
  ref = diffusers.DDIMScheduler()
  ref.set_timesteps(10)
  cfg = S.from_diffusers_config(S.DDIMConfig, dict(ref.config))
  assert cfg.clip_sample and cfg.beta_schedule == "linear"
  sched = S.ddim_set_timesteps(cfg, 10)
  rng = np.random.RandomState(1)
  x = _randn(rng)
  for t in ref.timesteps:
    m, z = _randn(rng), _randn(rng)
    want = ref.step(torch.tensor(m), t, torch.tensor(x), eta=0.7,
                    variance_noise=torch.tensor(z))
    got, _ = S.ddim_step(cfg, sched, jnp.asarray(m), int(t), jnp.asarray(x),
                         eta=0.7, noise=jnp.asarray(z))
    _assert_step_close(got, want.prev_sample, x)
    x = want.prev_sample.numpy()


EULER_CASES = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
         timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading"),
    dict(use_karras_sigmas=True),
    dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"),
]


@pytest.mark.oracle
@pytest.mark.parametrize("kw", EULER_CASES)
@pytest.mark.parametrize("steps", [30, 7])
def test_euler_matches_diffusers(kw, steps):
  torch, diffusers = _oracles()
  sd = {k: v for k, v in SD.items()
        if k not in ("clip_sample", "set_alpha_to_one")}
  ref = diffusers.EulerDiscreteScheduler(**{**sd, **kw})
  ref.set_timesteps(steps)
  cfg = S.EulerConfig(**kw)
  sched = S.euler_set_timesteps(cfg, steps)
  if kw.get("use_karras_sigmas"):  # fractional: σ -> t in float64, then f32
    np.testing.assert_allclose(sched.timesteps, ref.timesteps.numpy(),
                               rtol=0, atol=1e-4)
  else:
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(sched.init_noise_sigma,
                             float(ref.init_noise_sigma), rtol=3e-7)
  step = jax.jit(functools.partial(S.euler_step, cfg))
  rng = np.random.RandomState(2)
  x = _randn(rng) * float(ref.init_noise_sigma)
  for i, t in enumerate(ref.timesteps):
    m = _randn(rng)
    _assert_step_close(S.euler_scale_model_input(sched, jnp.asarray(x), i),
                       ref.scale_model_input(torch.tensor(x), t), x)
    want = ref.step(torch.tensor(m), t, torch.tensor(x))
    got, x0 = step(sched, jnp.asarray(m), jnp.asarray(i), jnp.asarray(x))
    _assert_step_close(got, want.prev_sample, x)
    _assert_step_close(x0, want.pred_original_sample, x)
    x = want.prev_sample.numpy()


LCM_CASES = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
]


@pytest.mark.oracle
@pytest.mark.parametrize("kw", LCM_CASES)
@pytest.mark.parametrize("steps,strength", [(4, 1.0), (4, 0.4), (3, 0.5),
                                            (1, 1.0), (8, 1.0)])
def test_lcm_matches_diffusers(kw, steps, strength):
  torch, diffusers = _oracles()
  ref = diffusers.LCMScheduler(**{**SD, **kw})
  ref.set_timesteps(steps, strength=strength)
  cfg = S.LCMConfig(**kw, set_alpha_to_one=False)
  sched = S.lcm_set_timesteps(cfg, steps, strength=strength)
  np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
  step = jax.jit(functools.partial(S.lcm_step, cfg))
  rng = np.random.RandomState(3)
  x = _randn(rng)
  for i, t in enumerate(ref.timesteps):
    m = _randn(rng)
    # diffusers draws the re-noising noise from the generator: same seed.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    want = ref.step(torch.tensor(m), t, torch.tensor(x),
                    generator=torch.Generator().manual_seed(i))
    got, denoised = step(sched, jnp.asarray(m), jnp.asarray(i),
                         jnp.asarray(x), jnp.asarray(noise.numpy()))
    _assert_step_close(denoised, want.denoised, x)
    _assert_step_close(got, want.prev_sample, x)
    x = want.prev_sample.numpy()


def test_lcm_strength_04_four_steps_is_streamv2v_schedule():
  """Known answer (StreamV2V defaults): [399, 299, 199, 99], c_out ≈ 1."""
  cfg = S.LCMConfig()
  want = [399, 299, 199, 99]
  assert S.lcm_timesteps(cfg, 4, 0.4).tolist() == want
  assert S.stream_t_index_list(4, 0.4) == [30, 35, 40, 45]
  sched = S.lcm_set_timesteps(cfg, t_index_list=[30, 35, 40, 45])
  assert np.asarray(sched.timesteps).tolist() == want
  full = S.lcm_origin_timesteps(cfg)
  assert full[0] == 999 and full[-1] == 19 and len(full) == 50
  c_skip, c_out = S.lcm_scalings(cfg, jnp.asarray(want))
  # c_skip = 0.25 / ((10 t)^2 + 0.25): 1.6e-8 at t=399, 2.6e-7 at t=99.
  np.testing.assert_allclose(c_skip, 0.25 / ((10.0 * np.array(want)) ** 2
                                              + 0.25), rtol=1e-6)
  assert 1.5e-8 < float(c_skip[0]) < 1.6e-8
  assert 2.5e-7 < float(c_skip[-1]) < 2.6e-7
  np.testing.assert_allclose(c_out, 1.0, atol=2e-7)
  # diffusers' strided rule and StreamV2V's differ when N does not divide
  # int(50 s): 10 kept timesteps, 4 steps.
  assert S.lcm_timesteps(cfg, 4, 0.2).tolist() == [199, 159, 99, 59]
  assert S.stream_t_index_list(4, 0.2) == [40, 42, 44, 46]


@pytest.mark.oracle
def test_add_noise_velocity_and_zero_snr_betas_match_diffusers():
  torch, d = _oracles()
  rescale_zero_terminal_snr = (
      d.schedulers.scheduling_ddim.rescale_zero_terminal_snr)

  cfg = S.DDIMConfig()
  betas = S.make_betas(cfg)
  want = rescale_zero_terminal_snr(torch.tensor(betas)).numpy()
  got = S.rescale_betas_zero_snr(betas)
  # β = 1 - ᾱ_t/ᾱ_{t-1} cancels in float32 (~1e-7 absolute per ulp of the
  # ratio); the products the samplers use agree to 1e-6 relative.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert got[-1] == want[-1] == 1.0
  np.testing.assert_allclose(np.cumprod(1 - got.astype(np.float64)),
                             np.cumprod(1 - want.astype(np.float64)),
                             rtol=1e-6, atol=1e-9)
  ref = d.DDIMScheduler(**SD)
  rng = np.random.RandomState(4)
  x0, eps = _randn(rng), _randn(rng)
  t = np.array([999, 17])
  ac = jnp.asarray(S.make_alphas_cumprod(cfg))
  _assert_step_close(S.add_noise(ac, x0, eps, t),
                     ref.add_noise(torch.tensor(x0), torch.tensor(eps),
                                   torch.tensor(t)), x0)
  _assert_step_close(S.get_velocity(ac, x0, eps, t),
                     ref.get_velocity(torch.tensor(x0), torch.tensor(eps),
                                      torch.tensor(t)), x0)


def test_zero_snr_invariants():
  """ᾱ_T = 0 exactly, ᾱ_1 unchanged, a = √ᾱ an affine map of the original."""
  plain = S.make_alphas_cumprod(S.DDIMConfig())
  zsnr = S.make_alphas_cumprod(S.DDIMConfig(rescale_betas_zero_snr=True))
  assert zsnr[-1] == 0.0 and plain[-1] > 1e-3
  np.testing.assert_allclose(zsnr[0], plain[0], rtol=1e-6)
  a, b = np.sqrt(plain.astype(np.float64)), np.sqrt(zsnr.astype(np.float64))
  want = (a - a[-1]) * a[0] / (a[0] - a[-1])
  np.testing.assert_allclose(b, want, atol=2e-6)
  assert np.all(np.diff(zsnr) < 0)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_prediction_conversions_invert_each_other(t):
  """x_t from (x₀, ε); v target; every parameterisation recovers x₀ and ε
  (per-row timesteps, closed form)."""
  ac = jnp.asarray(S.make_alphas_cumprod(S.DDIMConfig()))
  rng = np.random.RandomState(t)
  x0, eps = jnp.asarray(_randn(rng)), jnp.asarray(_randn(rng))
  ts = jnp.asarray([t, max(t - 300, 0)])
  xt = S.add_noise(ac, x0, eps, ts)
  v = S.get_velocity(ac, x0, eps, ts)
  a_t = ac[ts]
  for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
    got_x0, got_eps = S.predict_x0_eps(kind, out, xt, a_t)
    tol = 2e-4 if kind == "epsilon" and t == 999 else 2e-5  # 1/a_t ≈ 15
    np.testing.assert_allclose(got_x0, x0, atol=tol)
    if not (kind == "sample" and t == 0):  # ε from x₀ divides by σ_0 ≈ 0.03
      np.testing.assert_allclose(got_eps, eps, atol=tol)


def test_jitted_scan_over_a_schedule_equals_python_loop():
  """Static shapes: the whole LCM chain runs inside one jit via lax.scan."""
  cfg = S.LCMConfig(prediction_type="v_prediction")
  sched = S.lcm_set_timesteps(cfg, 4, strength=0.4)
  rng = np.random.RandomState(5)
  x = jnp.asarray(_randn(rng))
  outs = jnp.asarray(np.stack([_randn(rng) for _ in range(4)]))
  noises = jnp.asarray(np.stack([_randn(rng) for _ in range(4)]))

  def body(x, inp):
    i, m, z = inp
    x, _ = S.lcm_step(cfg, sched, m, i, x, z)
    return x, None

  @jax.jit
  def chain(sched, x, outs, noises):
    del sched
    return jax.lax.scan(body, x, (jnp.arange(4), outs, noises))[0]

  want = x
  for i in range(4):
    want, _ = S.lcm_step(cfg, sched, outs[i], i, want, noises[i])
  np.testing.assert_allclose(chain(sched, x, outs, noises), want, atol=1e-6)


def test_per_row_timesteps_equal_separate_calls():
  """A (B,) timestep vector (stream batch) equals B scalar calls."""
  cfg = S.DDIMConfig(prediction_type="v_prediction")
  sched = S.ddim_set_timesteps(cfg, 50)
  rng = np.random.RandomState(6)
  x, m = jnp.asarray(_randn(rng)), jnp.asarray(_randn(rng))
  ts = jnp.asarray([981, 21])
  both, _ = S.ddim_step(cfg, sched, m, ts, x)
  for b in range(2):
    one, _ = S.ddim_step(cfg, sched, m[b:b + 1], ts[b], x[b:b + 1])
    np.testing.assert_allclose(both[b:b + 1], one, atol=1e-6)
  lcm = S.LCMConfig()
  den = S.lcm_denoise(lcm, sched.alphas_cumprod, m, ts, x)
  for b in range(2):
    one = S.lcm_denoise(lcm, sched.alphas_cumprod, m[b:b + 1], ts[b],
                        x[b:b + 1])
    np.testing.assert_allclose(den[b:b + 1], one, atol=1e-6)


def test_bad_settings_raise_clear_errors():
  with pytest.raises(ValueError, match="prediction_type='flow'"):
    S.DDIMConfig(prediction_type="flow")
  with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
    S.EulerConfig(timestep_spacing="uniform")
  with pytest.raises(ValueError, match="beta_schedule"):
    S.LCMConfig(beta_schedule="sigmoid")
  with pytest.raises(ValueError, match=r"num_inference_steps=1001"):
    S.ddim_set_timesteps(S.DDIMConfig(), 1001)
  with pytest.raises(ValueError, match=r"num_inference_steps=0"):
    S.euler_set_timesteps(S.EulerConfig(), 0)
  for strength in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
      S.lcm_set_timesteps(S.LCMConfig(), 4, strength=strength)
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
      S.stream_t_index_list(4, strength)
  with pytest.raises(ValueError, match="exceeds original_inference_steps"):
    S.lcm_set_timesteps(S.LCMConfig(), 60)
  with pytest.raises(ValueError, match="keeps 5 timesteps"):
    S.lcm_set_timesteps(S.LCMConfig(), 6, strength=0.1)
  with pytest.raises(ValueError, match="epsilon prediction is undefined"):
    S.ddim_set_timesteps(S.DDIMConfig(rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing"), 10)
  with pytest.raises(ValueError, match="needs `noise`"):
    sched = S.ddim_set_timesteps(S.DDIMConfig(), 10)
    S.ddim_step(S.DDIMConfig(), sched, jnp.zeros(SHAPE), 901,
                jnp.zeros(SHAPE), eta=1.0)
  with pytest.raises(ValueError, match="thresholding=True"):
    S.from_diffusers_config(S.DDIMConfig, {"thresholding": True})
  with pytest.raises(ValueError, match="exactly one"):
    S.lcm_set_timesteps(S.LCMConfig(), 4, t_index_list=[30])
  with pytest.raises(ValueError, match="increasing"):
    S.lcm_set_timesteps(S.LCMConfig(), t_index_list=[35, 30])
