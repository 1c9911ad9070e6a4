"""DDIM, Euler and LCM samplers as pure functions over frozen schedule tables.

Notation (video-editing brief §2.1): ᾱ_t = Π_{s<=t}(1 - β_s), a_t = √ᾱ_t,
σ_t = √(1 - ᾱ_t). A prediction is turned into (x̂₀, ε̂) by

  epsilon:       x̂₀ = (x_t - σ_t ε̂) / a_t
  v_prediction:  x̂₀ = a_t x_t - σ_t v̂,  ε̂ = σ_t x_t + a_t v̂
                 (v = a_t ε - σ_t x₀)
  sample:        x̂₀ = model output,    ε̂ = (x_t - a_t x̂₀) / σ_t

Samplers (numerics follow diffusers 0.39.0's PyTorch schedulers, which the
tests use as the oracle; no code is taken from it):

- DDIM (Song et al., arXiv 2010.02502, Eq. 12): x_{t'} = a_{t'} x̂₀ +
  √(1 - ᾱ_{t'} - s²) ε̂ + s z with s = η·√((1-ᾱ_{t'})/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_{t'}));
  t' = t - T // N for every spacing, as diffusers does.
- Euler (Karras et al., arXiv 2206.00364, Alg. 1 without churn) in the
  variance-exploding parameterisation σ = √((1-ᾱ)/ᾱ); the model sees
  x / √(σ² + 1).
- LCM (Luo et al., arXiv 2310.04378): boundary scalings with σ_d = 0.5,
  c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / √((s t)² + σ_d²), s = 10;
  the denoised x = c_out x̂₀ + c_skip x_t is re-noised to the next timestep.
  SDEdit strength keeps the int(50·strength) lowest of the 50 original
  timesteps (999, 979, …, 19): 4 steps at strength 0.4 give [399, 299, 199,
  99], as StreamV2V (arXiv 2405.15757) uses.
- Zero terminal SNR (Lin et al., arXiv 2305.08891, Alg. 1):
  a ← (a - a_T)·a_1/(a_1 - a_T) so ᾱ_T = 0; needs v- or sample-prediction at
  t = T (ε̂ says nothing about x₀ there, so that pairing is refused).

Everything a sampler needs is computed once on the host (`*_set_timesteps`)
into a pytree of arrays with the step count static, so `*_step` functions jit
with a traced timestep or step index. A timestep may also be a (B,) vector:
one timestep per batch row (StreamV2V's stream batch).

Defaults of the configs: diffusers' class defaults overridden by SD 1.5's
`scheduler_config.json` (scaled_linear 0.00085..0.012, steps_offset 1,
set_alpha_to_one False, clip_sample False).
"""

import dataclasses
import itertools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
LCM_SIGMA_DATA = 0.5


# --------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
  """The training noise schedule shared by every sampler."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"  # linear | scaled_linear | cosine.
  trained_betas: tuple[float, ...] | None = None  # Overrides the above.
  prediction_type: str = "epsilon"  # epsilon | v_prediction | sample.
  rescale_betas_zero_snr: bool = False  # arXiv 2305.08891: ᾱ_T = 0.

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={self.prediction_type!r}: supported"
                       f" are {PREDICTION_TYPES}")
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule={self.beta_schedule!r}: supported are"
                       f" {BETA_SCHEDULES}")
    if self.num_train_timesteps < 2:
      raise ValueError(f"{self.num_train_timesteps=} must be >= 2")
    if self.trained_betas is not None:
      object.__setattr__(self, "trained_betas",
                         tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(
            f"{len(self.trained_betas)} trained_betas for"
            f" num_train_timesteps={self.num_train_timesteps}")
    elif not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(f"need 0 < beta_start={self.beta_start} <= beta_end="
                       f"{self.beta_end} < 1")


@dataclasses.dataclass(frozen=True)
class DDIMConfig(NoiseScheduleConfig):
  """DDIM sampler (deterministic at eta = 0)."""

  timestep_spacing: str = "leading"  # leading | trailing | linspace.
  steps_offset: int = 1  # Added to "leading" timesteps (SD: 1).
  set_alpha_to_one: bool = False  # ᾱ after the last step: 1 or ᾱ_0.
  clip_sample: bool = False  # Clamp x̂₀ to ±clip_sample_range.
  clip_sample_range: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _check_spacing(self.timestep_spacing)


@dataclasses.dataclass(frozen=True)
class EulerConfig(NoiseScheduleConfig):
  """Euler sampler (diffusers' EulerDiscreteScheduler, s_churn = 0)."""

  timestep_spacing: str = "linspace"  # diffusers' default for Euler.
  steps_offset: int = 1
  interpolation_type: str = "linear"  # σ(t) on fractional t: linear only.
  use_karras_sigmas: bool = False  # ρ = 7 spacing of σ (arXiv 2206.00364).
  final_sigmas_type: str = "zero"  # σ after the last step: zero | sigma_min.

  def __post_init__(self):
    super().__post_init__()
    _check_spacing(self.timestep_spacing)
    if self.interpolation_type != "linear":
      raise ValueError(f"interpolation_type={self.interpolation_type!r}:"
                       " only 'linear' is implemented")
    if self.final_sigmas_type not in ("zero", "sigma_min"):
      raise ValueError(f"final_sigmas_type={self.final_sigmas_type!r}:"
                       " use 'zero' or 'sigma_min'")


@dataclasses.dataclass(frozen=True)
class LCMConfig(NoiseScheduleConfig):
  """Latent-consistency multistep sampler."""

  original_inference_steps: int = 50  # Distillation schedule length.
  timestep_scaling: float = 10.0  # s in c_skip / c_out.
  set_alpha_to_one: bool = True
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
      raise ValueError(
          f"original_inference_steps={self.original_inference_steps} must lie"
          f" in [1, num_train_timesteps={self.num_train_timesteps}]")


def _check_spacing(spacing: str) -> None:
  if spacing not in SPACINGS:
    raise ValueError(f"timestep_spacing={spacing!r}: supported are {SPACINGS}")


# diffusers' constructor defaults, for configs read from scheduler_config.json.
_DIFFUSERS_DEFAULTS = {
    DDIMConfig: dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     timestep_spacing="leading"),
    EulerConfig: dict(beta_start=0.0001, beta_end=0.02,
                      beta_schedule="linear", steps_offset=0,
                      timestep_spacing="linspace"),
    LCMConfig: dict(beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", set_alpha_to_one=True),
}
# Keys that change numerics and are not implemented: (key, harmless value).
_UNSUPPORTED = (("thresholding", False), ("use_exponential_sigmas", False),
                ("use_beta_sigmas", False), ("timestep_type", "discrete"),
                ("sigma_min", None), ("sigma_max", None))


def from_diffusers_config(cls, d: dict):
  """A config of type `cls` from a diffusers `scheduler_config.json` dict.

  Missing keys take diffusers' constructor defaults for that scheduler (not
  ours); keys of features not implemented here raise if set.
  """
  for key, ok in _UNSUPPORTED:
    if d.get(key, ok) != ok:
      raise ValueError(f"scheduler config {key}={d[key]!r} is not supported")
  kw = dict(_DIFFUSERS_DEFAULTS[cls])
  names = {f.name for f in dataclasses.fields(cls)}
  kw.update({k: v for k, v in d.items() if k in names and v is not None})
  if kw.get("trained_betas") is not None:
    kw["trained_betas"] = tuple(kw["trained_betas"])
  return cls(**kw)


# --------------------------------------------------------------------------
# Tables (host, float32 like the PyTorch reference).


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (arXiv 2102.09672, Eq. 17) cosine schedule."""
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta)
                   for i in range(n)], np.float32)


def rescale_betas_zero_snr(betas: ArrayLike) -> np.ndarray:
  """Rescales betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1).

  a = √ᾱ is shifted so a_T = 0 and scaled so a_1 is unchanged; then
  ᾱ = a², β_t = 1 - ᾱ_t / ᾱ_{t-1} (β_1 = 1 - ᾱ_1).
  """
  betas = np.asarray(betas, np.float32)
  a = np.sqrt(_cumprod(1.0 - betas))
  a0, a_last = a[0].copy(), a[-1].copy()
  a = (a - a_last) * (a0 / (a0 - a_last))
  abar = a * a
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
  # float64 accumulation rounded to float32: torch.cumprod on CPU.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def make_betas(cfg: NoiseScheduleConfig) -> np.ndarray:
  """β_1..β_T as float32 (scaled_linear: linspace(√β_start, √β_end)²)."""
  n = cfg.num_train_timesteps
  if cfg.trained_betas is not None:
    betas = np.asarray(cfg.trained_betas, np.float32)
  elif cfg.beta_schedule == "linear":
    betas = np.linspace(cfg.beta_start, cfg.beta_end, n).astype(np.float32)
  elif cfg.beta_schedule == "scaled_linear":
    root = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n)
    betas = np.square(root.astype(np.float32))
  else:
    betas = _cosine_betas(n)
  if cfg.rescale_betas_zero_snr:
    betas = rescale_betas_zero_snr(betas)
  return betas


def make_alphas_cumprod(cfg: NoiseScheduleConfig) -> np.ndarray:
  """ᾱ_t for t = 0..T-1 (float32)."""
  return _cumprod(1.0 - make_betas(cfg))


def _check_steps(cfg: NoiseScheduleConfig, n: int) -> None:
  if not 1 <= n <= cfg.num_train_timesteps:
    raise ValueError(
        f"num_inference_steps={n} must lie in [1, num_train_timesteps="
        f"{cfg.num_train_timesteps}]")


def _spaced(cfg, n: int) -> np.ndarray:
  """Inference timesteps (float64, descending) of leading/trailing/linspace."""
  t_train = cfg.num_train_timesteps
  if cfg.timestep_spacing == "linspace":
    return np.linspace(0, t_train - 1, n)[::-1].round()
  if cfg.timestep_spacing == "leading":
    ratio = t_train // n
    return (np.arange(n) * ratio).round()[::-1] + cfg.steps_offset
  ratio = t_train / n
  return np.round(np.arange(t_train, 0, -ratio)) - 1


def _check_eps_defined(cfg: NoiseScheduleConfig, ac: np.ndarray,
                       timesteps: np.ndarray) -> None:
  if cfg.prediction_type != "epsilon":
    return
  bad = [int(t) for t in timesteps if ac[int(t)] <= 0.0]
  if bad:
    raise ValueError(
        f"epsilon prediction is undefined at timestep(s) {bad}, where"
        " ᾱ_t = 0 (zero terminal SNR); use prediction_type='v_prediction',"
        " or a spacing that avoids t = T-1")


# --------------------------------------------------------------------------
# Shared pure functions.


def _rows(coef: Array, like: Array) -> Array:
  """() or (B,) coefficient -> broadcastable against `like` (B, ...)."""
  coef = jnp.asarray(coef, jnp.float32)
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def _take(table: Array, idx) -> Array:
  return jnp.take(table, jnp.asarray(idx, jnp.int32), mode="clip")


def predict_x0_eps(prediction_type: str, model_output: Array, sample: Array,
                   alpha_prod_t: Array) -> tuple[Array, Array]:
  """(x̂₀, ε̂) from a model output at ᾱ_t (module docstring formulas)."""
  a = _rows(jnp.sqrt(alpha_prod_t), sample)
  s = _rows(jnp.sqrt(1.0 - alpha_prod_t), sample)
  if prediction_type == "epsilon":
    return (sample - s * model_output) / a, model_output
  if prediction_type == "v_prediction":
    return a * sample - s * model_output, a * model_output + s * sample
  if prediction_type == "sample":
    return model_output, (sample - a * model_output) / s
  raise ValueError(f"prediction_type={prediction_type!r}: supported are"
                   f" {PREDICTION_TYPES}")


def add_noise(alphas_cumprod: Array, x0: Array, noise: Array,
              timesteps: ArrayLike) -> Array:
  """x_t = a_t x₀ + σ_t ε (timesteps: () or (B,) ints)."""
  ac = _take(alphas_cumprod, timesteps)
  return (_rows(jnp.sqrt(ac), x0) * x0
          + _rows(jnp.sqrt(1.0 - ac), x0) * noise)


def get_velocity(alphas_cumprod: Array, x0: Array, noise: Array,
                 timesteps: ArrayLike) -> Array:
  """v = a_t ε - σ_t x₀, the v-prediction target (arXiv 2202.00512)."""
  ac = _take(alphas_cumprod, timesteps)
  return (_rows(jnp.sqrt(ac), x0) * noise
          - _rows(jnp.sqrt(1.0 - ac), x0) * x0)


def _clip(x0: Array, enabled: bool, limit: float) -> Array:
  return jnp.clip(x0, -limit, limit) if enabled else x0


# --------------------------------------------------------------------------
# DDIM.


@flax.struct.dataclass
class DDIMSchedule:
  alphas_cumprod: Array  # (T,) float32
  final_alpha_cumprod: Array  # () ᾱ used after the last step.
  timesteps: Array  # (N,) int32, descending.
  num_inference_steps: int = flax.struct.field(pytree_node=False)
  init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)


def ddim_timesteps(cfg: DDIMConfig, num_inference_steps: int) -> np.ndarray:
  """The N inference timesteps (int64, descending) for cfg's spacing."""
  _check_steps(cfg, num_inference_steps)
  return _spaced(cfg, num_inference_steps).astype(np.int64)


def ddim_set_timesteps(cfg: DDIMConfig, num_inference_steps: int
                       ) -> DDIMSchedule:
  """Frozen DDIM tables for N steps.

  Raises:
    ValueError: N outside [1, T]; epsilon prediction where ᾱ_t = 0.
  """
  ts = ddim_timesteps(cfg, num_inference_steps)
  ac = make_alphas_cumprod(cfg)
  _check_eps_defined(cfg, ac, ts)
  final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
  return DDIMSchedule(jnp.asarray(ac), jnp.asarray(final, jnp.float32),
                      jnp.asarray(ts, jnp.int32), num_inference_steps)


def ddim_step(
    cfg: DDIMConfig,
    sched: DDIMSchedule,
    model_output: Array,
    timestep: ArrayLike,
    sample: Array,
    *,
    eta: float = 0.0,
    noise: Array | None = None,
) -> tuple[Array, Array]:
  """One DDIM update x_t -> x_{t - T//N}.

  Args:
    cfg: sampler config (static).
    sched: from `ddim_set_timesteps`.
    model_output: network output (ε̂, v̂ or x̂₀ per cfg.prediction_type).
    timestep: current t, () or (B,) int (traceable).
    sample: x_t.
    eta: DDIM η (0: deterministic; 1: DDPM-like), a Python float.
    noise: z for eta > 0, shaped like sample.

  Returns:
    (x_{t'}, x̂₀).
  """
  if eta < 0:
    raise ValueError(f"{eta=} must be >= 0")
  if eta > 0 and noise is None:
    raise ValueError("eta > 0 needs `noise` (pure function: no RNG inside)")
  t = jnp.asarray(timestep, jnp.int32)
  prev = t - cfg.num_train_timesteps // sched.num_inference_steps
  a_t = _take(sched.alphas_cumprod, t)
  a_prev = jnp.where(prev >= 0, _take(sched.alphas_cumprod, prev),
                     sched.final_alpha_cumprod)
  x0, eps = predict_x0_eps(cfg.prediction_type, model_output, sample, a_t)
  x0 = _clip(x0, cfg.clip_sample, cfg.clip_sample_range)
  var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(var)
  out = (_rows(jnp.sqrt(a_prev), sample) * x0
         + _rows(jnp.sqrt(1.0 - a_prev - std * std), sample) * eps)
  if eta > 0:
    out = out + _rows(std, sample) * noise
  return out.astype(sample.dtype), x0


# --------------------------------------------------------------------------
# Euler.


@flax.struct.dataclass
class EulerSchedule:
  sigmas: Array  # (N+1,) float32, descending, last = 0 or σ_min.
  timesteps: Array  # (N,) float32 (fractional with linspace/karras).
  alphas_cumprod: Array  # (T,) float32
  init_noise_sigma: Array  # () initial latent scale.
  num_inference_steps: int = flax.struct.field(pytree_node=False)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional timestep of σ by linear interpolation in log σ."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(
      max=log_sigmas.shape[0] - 2)
  w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
  w = np.clip(w, 0, 1)
  return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def euler_set_timesteps(cfg: EulerConfig, num_inference_steps: int
                        ) -> EulerSchedule:
  """σ and fractional timesteps for N Euler steps (float32 tables)."""
  n = num_inference_steps
  _check_steps(cfg, n)
  ac = make_alphas_cumprod(cfg)
  if cfg.rescale_betas_zero_snr:
    ac[-1] = 2.0 ** -24  # diffusers: keeps σ_max finite (≈ 4096)
  sig_train = np.sqrt((1 - ac) / ac).astype(np.float32)
  ts = _spaced(cfg, n).astype(np.float32)
  if cfg.timestep_spacing == "linspace":  # not rounded for Euler
    ts = np.linspace(0, cfg.num_train_timesteps - 1, n,
                     dtype=np.float32)[::-1].copy()
  sigmas = np.interp(ts, np.arange(len(sig_train)), sig_train)
  if cfg.use_karras_sigmas:
    rho = 7.0
    lo, hi = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
    sigmas = (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho
    ts = _sigma_to_t(sigmas, np.log(sig_train))
  last = 0.0 if cfg.final_sigmas_type == "zero" else float(
      np.sqrt((1 - ac[0]) / ac[0]))
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  smax = sigmas.max()
  init = smax if cfg.timestep_spacing in ("linspace", "trailing") else (
      np.sqrt(smax * smax + 1))
  return EulerSchedule(jnp.asarray(sigmas), jnp.asarray(ts, jnp.float32),
                       jnp.asarray(ac), jnp.asarray(init, jnp.float32), n)


def euler_scale_model_input(sched: EulerSchedule, sample: Array,
                            step_index: ArrayLike) -> Array:
  """x / √(σ² + 1): what the network sees at step `step_index`."""
  sigma = _take(sched.sigmas, step_index)
  return (sample / _rows(jnp.sqrt(sigma * sigma + 1), sample)).astype(
      sample.dtype)


def euler_add_noise(sched: EulerSchedule, x0: Array, noise: Array,
                    step_index: ArrayLike) -> Array:
  """x = x₀ + σ ε at step `step_index` (img2img start)."""
  return x0 + _rows(_take(sched.sigmas, step_index), x0) * noise


def euler_step(
    cfg: EulerConfig,
    sched: EulerSchedule,
    model_output: Array,
    step_index: ArrayLike,
    sample: Array,
) -> tuple[Array, Array]:
  """One Euler update from σ_i to σ_{i+1} (no churn).

  Args:
    cfg: sampler config (static).
    sched: from `euler_set_timesteps`.
    model_output: network output on `euler_scale_model_input(sample)`.
    step_index: i, () or (B,) int (traceable); timestep = sched.timesteps[i].
    sample: x at σ_i (unscaled).

  Returns:
    (x at σ_{i+1}, x̂₀).
  """
  i = jnp.asarray(step_index, jnp.int32)
  sigma = _rows(_take(sched.sigmas, i), sample)
  sigma_next = _rows(_take(sched.sigmas, i + 1), sample)
  x = sample.astype(jnp.float32)
  if cfg.prediction_type == "epsilon":
    x0 = x - sigma * model_output
  elif cfg.prediction_type == "v_prediction":
    x0 = (model_output * (-sigma / jnp.sqrt(sigma * sigma + 1))
          + x / (sigma * sigma + 1))
  else:
    x0 = model_output
  derivative = (x - x0) / sigma
  out = x + derivative * (sigma_next - sigma)
  return out.astype(model_output.dtype), x0


# --------------------------------------------------------------------------
# LCM.


@flax.struct.dataclass
class LCMSchedule:
  alphas_cumprod: Array  # (T,) float32
  final_alpha_cumprod: Array  # ()
  timesteps: Array  # (N,) int32, descending.
  num_inference_steps: int = flax.struct.field(pytree_node=False)
  init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)


def lcm_origin_timesteps(cfg: LCMConfig, strength: float = 1.0
                         ) -> np.ndarray:
  """The distillation timesteps kept by `strength`, descending.

  k = T // original_steps; kept: k·j - 1 for j = int(original·strength)..1
  (999, 979, …, 19 at strength 1 for SD's 1000/50).
  """
  _check_strength(strength)
  k = cfg.num_train_timesteps // cfg.original_inference_steps
  m = int(cfg.original_inference_steps * strength)
  return (np.arange(1, m + 1) * k - 1)[::-1].astype(np.int64)


def _check_strength(strength: float) -> None:
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must lie in (0, 1]")


def lcm_timesteps(cfg: LCMConfig, num_inference_steps: int,
                  strength: float = 1.0) -> np.ndarray:
  """diffusers' LCM rule: N evenly strided picks of the kept timesteps.

  Index floor(i·M/N) of the M = int(original·strength) kept timesteps, so 4
  steps at strength 0.4 give [399, 299, 199, 99].

  Raises:
    ValueError: strength outside (0, 1]; N < 1, N > T, N > original steps, or
      N > M (fewer kept timesteps than steps).
  """
  n = num_inference_steps
  _check_steps(cfg, n)
  origin = lcm_origin_timesteps(cfg, strength)
  if n > cfg.original_inference_steps:
    raise ValueError(
        f"num_inference_steps={n} exceeds original_inference_steps="
        f"{cfg.original_inference_steps}")
  if len(origin) < n:
    raise ValueError(
        f"original_inference_steps x strength = {cfg.original_inference_steps}"
        f" x {strength} keeps {len(origin)} timesteps, fewer than"
        f" num_inference_steps={n}; raise strength or lower the steps")
  idx = np.floor(np.linspace(0, len(origin), n, endpoint=False))
  return origin[idx.astype(np.int64)]


def stream_t_index_list(num_inference_steps: int, strength: float,
                        original_inference_steps: int = 50) -> list[int]:
  """StreamV2V's indices into the full LCM schedule (brief §2.3).

  int(S·(1 - strength)) + i·(int(S·strength) // N) for i < N, S = original
  steps; with N = 4, strength 0.4: [30, 35, 40, 45] -> t = [399, 299, 199,
  99]. Equals `lcm_timesteps` whenever N divides int(S·strength).
  """
  _check_strength(strength)
  s, n = original_inference_steps, num_inference_steps
  stride = int(s * strength) // n
  if n < 1 or stride < 1:
    raise ValueError(f"{n} steps do not fit int({s} x {strength}) ="
                     f" {int(s * strength)} kept timesteps")
  return [int(s * (1 - strength)) + i * stride for i in range(n)]


def lcm_set_timesteps(
    cfg: LCMConfig,
    num_inference_steps: int | None = None,
    *,
    strength: float = 1.0,
    t_index_list: list[int] | None = None,
) -> LCMSchedule:
  """Frozen LCM tables.

  Either `num_inference_steps` (+ `strength`: diffusers' img2img rule), or
  `t_index_list`: indices into the full original schedule (999, 979, …),
  as StreamDiffusion / StreamV2V select their steps.
  """
  if (num_inference_steps is None) == (t_index_list is None):
    raise ValueError("pass exactly one of num_inference_steps, t_index_list")
  if t_index_list is not None:
    full = lcm_origin_timesteps(cfg, 1.0)
    bad = [i for i in t_index_list if not 0 <= i < len(full)]
    if bad or not t_index_list:
      raise ValueError(f"t_index_list {t_index_list} must be non-empty with"
                       f" entries in [0, {len(full)})")
    if any(b <= a for a, b in itertools.pairwise(t_index_list)):
      raise ValueError(f"t_index_list {t_index_list} must be increasing")
    ts = full[np.asarray(t_index_list)]
  else:
    ts = lcm_timesteps(cfg, num_inference_steps, strength)
  ac = make_alphas_cumprod(cfg)
  _check_eps_defined(cfg, ac, ts)
  final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
  return LCMSchedule(jnp.asarray(ac), jnp.asarray(final, jnp.float32),
                     jnp.asarray(ts, jnp.int32), len(ts))


def lcm_scalings(cfg: LCMConfig, timestep: ArrayLike) -> tuple[Array, Array]:
  """(c_skip, c_out) of the consistency boundary condition at t."""
  st = jnp.asarray(timestep, jnp.float32) * cfg.timestep_scaling
  sd2 = LCM_SIGMA_DATA ** 2
  return sd2 / (st * st + sd2), st / jnp.sqrt(st * st + sd2)


def lcm_denoise(cfg: LCMConfig, alphas_cumprod: Array, model_output: Array,
                timestep: ArrayLike, sample: Array) -> Array:
  """c_out·x̂₀ + c_skip·x_t at t (() or one timestep per batch row)."""
  t = jnp.asarray(timestep, jnp.int32)
  x0, _ = predict_x0_eps(cfg.prediction_type, model_output, sample,
                         _take(alphas_cumprod, t))
  x0 = _clip(x0, cfg.clip_sample, cfg.clip_sample_range)
  c_skip, c_out = lcm_scalings(cfg, t)
  return _rows(c_out, sample) * x0 + _rows(c_skip, sample) * sample


def lcm_step(
    cfg: LCMConfig,
    sched: LCMSchedule,
    model_output: Array,
    step_index: ArrayLike,
    sample: Array,
    noise: Array | None,
) -> tuple[Array, Array]:
  """One LCM multistep update.

  Args:
    cfg: sampler config (static).
    sched: from `lcm_set_timesteps`.
    model_output: network output at t = sched.timesteps[step_index].
    step_index: i, () int (traceable).
    sample: x_t.
    noise: ε for re-noising to timesteps[i + 1]; unused at the last step
      (may be None only when N = 1).

  Returns:
    (x at the next timestep, or the denoised sample at the last step;
     the denoised sample).
  """
  n = sched.num_inference_steps
  if noise is None and n > 1:
    raise ValueError("lcm_step needs `noise` unless there is a single step")
  i = jnp.asarray(step_index, jnp.int32)
  t = _take(sched.timesteps, i)
  denoised = lcm_denoise(cfg, sched.alphas_cumprod, model_output, t, sample)
  if n == 1:
    return denoised, denoised
  t_next = _take(sched.timesteps, jnp.minimum(i + 1, n - 1))
  renoised = add_noise(sched.alphas_cumprod, denoised, noise, t_next)
  return jnp.where(i >= n - 1, denoised, renoised), denoised
