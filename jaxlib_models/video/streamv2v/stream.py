"""Stream-batch LCM img2img with a feature bank (StreamV2V, arXiv 2405.15757).

The denoiser sees S slots at once (S = denoising steps, 4 by default): slot b
holds a latent at timestep t_b, coming from input frame n - b. One call
(`step`):

1. noise the new frame's latent z to t_0 with the fixed noise eps_0 and put it
   in slot 0; slots 1..S-1 hold what the previous call left for them;
2. run the denoiser once on all S slots with their own timesteps (the
   self-attention layers read the bank and capture their own k/v/o);
3. apply the LCM boundary formula per slot; slot S-1's result is the finished
   latent of frame n - (S - 1) (an (S-1)-frame latency);
4. re-noise slots 0..S-2 to the next slot's timestep with the fixed noises
   eps_1..eps_{S-1} (drawn once) and shift them by one slot;
5. every `interval` calls, update the bank (`bank.update_bank`).

All shapes are static: one compilation for the seeding call and one for the
rest, whatever the video length. Priming (a choice the paper leaves open):
the first call fills every slot with the first frame noised to that slot's
timestep, so the stream starts full and the first S-1 outputs are frame 0
(the pipeline may still drop them as warm-up).

Choices the paper leaves open (brief §3) and our defaults: bank stores the
pre-fusion O (`BankConfig.store_fused`); the bank is seeded with the first
frame itself (tiled), which equals plain attention exactly; the merge split is
seeded; CFG is off (guidance 1.0, StreamV2V's default) and other values are
refused rather than silently ignored.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.diffusion import schedulers
from jaxlib_models.diffusion.attention import SelfAttnHooks
from jaxlib_models.video.streamv2v import bank as bank_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BankConfig:
  """Feature-bank settings (brief §2.3; defaults are the reference's)."""

  enabled: bool = True  # Extended self-attention over the bank.
  interval: int = 4  # UNet calls between two bank updates (cache_interval).
  fuse: bool = True  # Feature fusion in `fuse_paths`.
  fuse_paths: tuple[str, ...] = ("mid_block", "up_blocks_1")
  fuse_threshold: float = 0.98  # Cosine needed to take the bank feature.
  fuse_strength: float = 0.8  # Weight of the matched bank feature.
  merge: bool = True  # Dynamic merging (DyMe); False: FIFO of raw frames.
  max_frames: int = 1  # Bank size in frames per layer and slot.
  store_fused: bool = False  # Store O after fusion instead of before.

  def __post_init__(self):
    if self.interval < 1:
      raise ValueError(f"interval={self.interval} must be >= 1")
    if self.max_frames < 1:
      raise ValueError(f"max_frames={self.max_frames} must be >= 1")
    if not 0.0 <= self.fuse_strength <= 1.0:
      raise ValueError(f"fuse_strength={self.fuse_strength} must lie in"
                       " [0, 1]")

  def hooks(self) -> SelfAttnHooks:
    """Self-attention hooks of the banked denoiser."""
    if not self.enabled:
      return SelfAttnHooks()
    return SelfAttnHooks(
        extra=True, include_self=True, capture=True,
        capture_fused=self.store_fused,
        fuse_paths=self.fuse_paths if self.fuse else (),
        fuse_threshold=self.fuse_threshold, fuse_strength=self.fuse_strength)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """Stream-batch sampling (brief §2.3 defaults)."""

  num_inference_steps: int = 4  # S, the stream-batch slots.
  strength: float = 0.4  # SDEdit strength: t = [399, 299, 199, 99].
  seed: int = 2  # Fixed noises and the merge split.
  guidance_scale: float = 1.0  # CFG off (only 1.0 is supported).
  bank: BankConfig = BankConfig()
  scheduler: schedulers.LCMConfig = schedulers.LCMConfig()

  def __post_init__(self):
    if self.num_inference_steps < 1:
      raise ValueError(f"num_inference_steps={self.num_inference_steps}"
                       " must be >= 1")
    if self.guidance_scale != 1.0:
      raise ValueError(
          f"guidance_scale={self.guidance_scale}: the stream batch runs"
          " without classifier-free guidance (StreamV2V's default 1.0);"
          " fuse a stronger prompt or LoRA instead")
    self.timesteps()  # validates strength against the schedule

  def timesteps(self) -> np.ndarray:
    """The S slot timesteps, descending ([399, 299, 199, 99])."""
    idx = schedulers.stream_t_index_list(
        self.num_inference_steps, self.strength,
        self.scheduler.original_inference_steps)
    full = schedulers.lcm_origin_timesteps(self.scheduler, 1.0)
    return full[np.asarray(idx)]

  @property
  def latency(self) -> int:
    """Frames between an input and its output."""
    return self.num_inference_steps - 1


@flax.struct.dataclass
class StreamState:
  """Everything that changes between calls (a pytree)."""

  pending: Array | None  # (S-1, h, w, c) inputs of slots 1..S-1; None
  # before the first call (which primes them).
  noise: Array  # (S, h, w, c) fixed noises eps_0..eps_{S-1}.
  bank: Any  # Per-layer {k, v, o} or None before the first call.
  frame_id: Array  # () int32, UNet calls so far.
  key: Array  # PRNG key of the merge splits.


def init_state(cfg: StreamConfig, latent_shape: tuple[int, int, int],
               dtype=jnp.float32) -> StreamState:
  """Fresh state: empty slots, fixed noises from `cfg.seed`, no bank."""
  s = cfg.num_inference_steps
  key = jax.random.key(cfg.seed)
  k_noise, k_merge = jax.random.split(key)
  noise = jax.random.normal(k_noise, (s,) + tuple(latent_shape), jnp.float32)
  return StreamState(
      pending=None, noise=noise.astype(dtype), bank=None,
      frame_id=jnp.zeros((), jnp.int32), key=k_merge)


# denoise(params, x (S,h,w,c), t (S,), ctx (S,L,D), bank or None)
#   -> (model_output (S,h,w,c), captured k/v/o tree or None)
Denoiser = Callable[[Any, Array, Array, Array, Any], tuple[Array, Any]]


def make_step(denoise: Denoiser, cfg: StreamConfig, *,
              encode: Callable[[Any, Array], Array] | None = None,
              decode: Callable[[Any, Array], Array] | None = None):
  """The jitted stream step `(params, state, frame, ctx) -> (out, state)`.

  Args:
    denoise: see `Denoiser`; with `cfg.bank.enabled` it must return the
      captured k/v/o of every self-attention layer.
    cfg: stream settings.
    encode: optional `(params, frame) -> (1, h, w, c)` latent, fused into
      the same jitted call (e.g. TAESD); None: the input is the latent.
    decode: optional `(params, latent) -> output` (e.g. TAESD's decoder).

  Returns:
    step(params, state, frame, ctx (1,L,D)) returning the output of the
    frame `cfg.latency` calls earlier and the new state. The first call
    primes the slots and seeds the bank (its own compilation).
  """
  sch = cfg.scheduler
  ts = cfg.timesteps()
  s = len(ts)
  ac = jnp.asarray(schedulers.make_alphas_cumprod(sch), jnp.float32)
  t_arr = jnp.asarray(ts, jnp.int32)
  a = jnp.sqrt(ac[t_arr])
  sg = jnp.sqrt(1.0 - ac[t_arr])
  bcfg = cfg.bank

  def body(params, state, frame, ctx, seeding):
    z = frame if encode is None else encode(params, frame)
    if z.shape[1:] != state.noise.shape[1:]:
      raise ValueError(f"latent {z.shape} does not fit the stream"
                       f" (want (1,) + {state.noise.shape[1:]})")
    dt = state.noise.dtype
    zf = z.astype(jnp.float32)
    ef = state.noise.astype(jnp.float32)
    if seeding:  # every slot starts from the first frame
      x = (a[:, None, None, None] * zf + sg[:, None, None, None] * ef)
    else:
      x = jnp.concatenate([a[0] * zf + sg[0] * ef[:1],
                           state.pending.astype(jnp.float32)], axis=0)
    x = x.astype(dt)
    ctx_s = jnp.broadcast_to(ctx, (s,) + ctx.shape[1:])
    bank = None if (seeding or not bcfg.enabled) else state.bank
    out, cap = denoise(params, x, t_arr, ctx_s, bank)
    den = schedulers.lcm_denoise(sch, ac, out.astype(jnp.float32), t_arr,
                                 x.astype(jnp.float32))
    result = den[s - 1:].astype(dt)
    if s > 1:
      nxt = (a[1:, None, None, None] * den[:s - 1]
             + sg[1:, None, None, None] * state.noise[1:].astype(jnp.float32))
      pending = nxt.astype(dt)
    else:
      pending = jnp.zeros((0,) + x.shape[1:], dt)
    new_bank = state.bank
    if bcfg.enabled:
      if cap is None:
        raise ValueError("the denoiser returned no captured k/v/o; build it"
                         " with capture hooks (BankConfig.hooks())")
      if seeding:
        new_bank = bank_lib.seed_bank(cap, bcfg.max_frames, dtype=dt)
      else:
        key = jax.random.fold_in(state.key, state.frame_id)
        new_bank = jax.lax.cond(
            state.frame_id % bcfg.interval == 0,
            lambda: bank_lib.update_bank(state.bank, cap, key,
                                         merge=bcfg.merge),
            lambda: state.bank)
    if decode is not None:
      result = decode(params, result)
    return result, state.replace(pending=pending, bank=new_bank,
                                 frame_id=state.frame_id + 1)

  seed_fn = jax.jit(lambda p, st, z, c: body(p, st, z, c, True))
  run_fn = jax.jit(lambda p, st, z, c: body(p, st, z, c, False),
                   donate_argnums=(1,))

  def step(params, state: StreamState, frame: Array, ctx: Array):
    if frame.ndim != 4 or frame.shape[0] != 1:
      raise ValueError(f"input {frame.shape} must be one frame (1, H, W, C)")
    if state.pending is None:
      return seed_fn(params, state, frame, ctx)
    return run_fn(params, state, frame, ctx)

  step.seed_fn, step.run_fn = seed_fn, run_fn
  return step


def unet_denoiser(unet_config, bank: BankConfig, *, dtype=None) -> Denoiser:
  """A `Denoiser` from the Flax UNet (`diffusion.unet`).

  Without a bank the UNet still captures k/v/o (for seeding) but reads none.
  """
  from jaxlib_models.diffusion.unet import UNet2DConditionModel
  plain = UNet2DConditionModel(unet_config,
                               hooks=SelfAttnHooks(capture=bank.enabled))
  banked = UNet2DConditionModel(unet_config, hooks=bank.hooks())

  def denoise(params, x, t, ctx, bank_tree):
    if bank_tree is None:
      out, var = plain.apply({"params": params}, x, t, ctx,
                             mutable=["attn_capture"])
    else:
      out, var = banked.apply({"params": params, "attn_extra": bank_tree},
                              x, t, ctx, mutable=["attn_capture"])
    return out, var.get("attn_capture")

  return denoise
