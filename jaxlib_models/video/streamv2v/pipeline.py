"""End-to-end StreamV2V: frames in, edited frames out, one jitted call each.

A call encodes the new frame (TAESD by default, or the SD VAE), runs the
stream-batch step with the feature bank (`stream.make_step`) and decodes the
finished latent, all inside one compiled function; the text states are an
argument, so switching prompts never recompiles.

`StreamModels` bundles the networks: `load_models` reads a diffusers
Stable Diffusion folder (plus an optional TAESD folder and LoRA, e.g.
LCM-LoRA), `random_models` builds the real or a tiny architecture with random
weights (speed tests and demos; the images are meaningless, and say so).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.diffusion import clip, taesd as taesd_lib, unet as unet_lib
from jaxlib_models.diffusion import loaders, vae as vae_lib
from jaxlib_models.diffusion import winograd as winograd_lib
from jaxlib_models.diffusion.clip_tokenizer import CLIPTokenizer
from jaxlib_models.video.streamv2v import stream as stream_lib

Array = jax.Array
AUTOENCODERS = ("taesd", "vae")


@dataclasses.dataclass
class StreamModels:
  """The networks of a StreamV2V run (configs and parameter trees)."""

  unet_config: unet_lib.UNetConfig
  unet: Any
  ae_kind: str  # "taesd" or "vae"
  ae_config: Any  # TAESDConfig or VAEConfig
  ae: Any
  text_config: clip.CLIPTextConfig
  text: Any
  tokenizer: CLIPTokenizer
  description: str = ""  # where the weights came from (shown by the CLI)

  def __post_init__(self):
    if self.ae_kind not in AUTOENCODERS:
      raise ValueError(f"ae_kind={self.ae_kind!r}: one of {AUTOENCODERS}")
    if self.text_config.hidden_size != self.unet_config.cross_attention_dim:
      raise ValueError(
          f"text encoder width {self.text_config.hidden_size} does not match"
          f" the UNet's cross_attention_dim"
          f" {self.unet_config.cross_attention_dim}")

  @property
  def ae_lib(self):
    return taesd_lib if self.ae_kind == "taesd" else vae_lib

  @property
  def downscale(self) -> int:
    """Pixels per latent cell times the UNet's own downsampling."""
    ae = (self.ae_config.downsample_factor if self.ae_kind == "taesd"
          else 2 ** (len(self.ae_config.block_out_channels) - 1))
    return ae * 2 ** (len(self.unet_config.block_out_channels) - 1)


def random_models(size: str = "tiny", *, seed: int = 0,
                  dtype: str = "float32") -> StreamModels:
  """Random-weight models: "sd15" (the full SD-1.5 UNet + TAESD + CLIP-L
  text architecture) or "tiny" (a few channels; tests and the demo)."""
  k_u, k_a, k_t = jax.random.split(jax.random.key(seed), 3)
  tok = loaders.default_tokenizer()
  if size == "sd15":
    ucfg = unet_lib.sd15_unet_config(dtype=dtype)
    acfg = taesd_lib.TAESDConfig(dtype=dtype)
    tcfg = clip.sd15_text_config()
  elif size == "tiny":
    ucfg = unet_lib.UNetConfig(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
        dtype=dtype)
    acfg = taesd_lib.TAESDConfig(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
        dtype=dtype)
    tcfg = clip.CLIPTextConfig(hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2)
  else:
    raise ValueError(f"size={size!r}: 'tiny' or 'sd15'")
  return StreamModels(
      unet_config=ucfg, unet=unet_lib.init_unet_params(ucfg, k_u),
      ae_kind="taesd", ae_config=acfg,
      ae=taesd_lib.init_taesd_params(acfg, k_a), text_config=tcfg,
      text=clip.init_text_params(tcfg, k_t), tokenizer=tok,
      description=f"RANDOM weights ({size} architecture): images are"
      " meaningless; use for speed and plumbing only")


def load_models(model: str, *, taesd: str | None = None,
                loras: Sequence[str] = (), lora_scales: Sequence[float] = (),
                dtype: str = "float32", cache: bool = True) -> StreamModels:
  """Real weights: a diffusers SD-1.5 folder or a single-file checkpoint.

  Args:
    model: diffusers pipeline folder, or an LDM single-file `.safetensors`.
    taesd: AutoencoderTiny folder (StreamV2V's default codec); None: the
      model's own VAE.
    loras: LoRA files fused at load time (LCM-LoRA for StreamV2V).
    lora_scales: one per LoRA (default 1.0).
    dtype: compute dtype.
    cache: reuse converted parameters across runs.
  """
  model = os.fspath(model)
  if os.path.isfile(model):
    comps = loaders.load_single_file(model, loras=loras,
                                     lora_scales=lora_scales, dtype=dtype)
  else:
    comps = loaders.load_sd_folder(model, loras=loras,
                                   lora_scales=lora_scales, dtype=dtype,
                                   with_vae=taesd is None, cache=cache)
  if taesd is not None:
    acfg, ae = loaders.load_taesd(taesd, dtype=dtype)
    kind = "taesd"
  else:
    acfg, ae, kind = comps.vae_config, comps.vae, "vae"
  lo = f" + LoRA {[os.path.basename(p) for p in loras]}" if loras else ""
  return StreamModels(
      unet_config=comps.unet_config, unet=comps.unet, ae_kind=kind,
      ae_config=acfg, ae=ae, text_config=comps.text_config, text=comps.text,
      tokenizer=comps.tokenizer or loaders.default_tokenizer(),
      description=f"{model}{lo}, {kind}")


def encode_prompt(models: StreamModels, prompt: str) -> Array:
  """(1, 77, D) CLIP last hidden states, as SD consumes them."""
  ids = models.tokenizer([prompt], max_length=min(
      77, models.text_config.max_position_embeddings))["input_ids"]
  return clip.encode_text(models.text, models.text_config,
                          jnp.asarray(ids)).last_hidden_state


def to_model_range(frame: Array) -> Array:
  """uint8 (1, H, W, 3) -> float32 in [-1, 1]."""
  return frame.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: Array) -> Array:
  """[-1, 1] -> uint8, rounded."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _winograd_tile(choice, unet_dtype) -> str | int | None:
  """The tile `winograd.prepare_params` gets, or None (XLA's convolutions)."""
  if choice == "off" or choice is None:
    return None
  if choice == "auto":
    cpu = jax.default_backend() == "cpu"
    return "auto" if cpu and jnp.dtype(unet_dtype) == jnp.float32 else None
  if choice in winograd_lib.TILES:
    return choice
  raise ValueError(f"winograd={choice!r}: choose 'auto', 'off' or a tile in"
                   f" {winograd_lib.TILES}")


class StreamV2VPipeline:
  """Streaming video-to-video editor (one input frame -> one output frame).

  Output n is the edit of input n - latency (3 with 4 steps); the first
  `latency` outputs show frame 0 (the stream primes itself with it).

  `winograd`: the UNet's stride-1 3x3 convolutions on the Winograd route
  (`diffusion.winograd`, kernels transformed once here). "auto" (default):
  on a CPU backend with a float32 UNet, with the per-kernel tile choice of
  `winograd.prepare_params` (about +2 GB for SD-1.5); 2 or 4: that tile
  everywhere, on any backend; "off": XLA's convolutions. The parameters in
  `models` are not changed.
  """

  def __init__(self, models: StreamModels,
               cfg: stream_lib.StreamConfig = stream_lib.StreamConfig(), *,
               height: int, width: int, prompt: str = "",
               winograd: str | int = "auto"):
    f = models.downscale
    if height % f or width % f:
      raise ValueError(
          f"{width}x{height}: both sides must be multiples of {f} (the"
          f" autoencoder's x{f // 2 ** (len(models.unet_config.block_out_channels) - 1)}"
          f" times the UNet's {len(models.unet_config.block_out_channels) - 1}"
          f" downsamplings); resize or crop the video, e.g. to"
          f" {width // f * f}x{height // f * f}")
    self.models, self.cfg = models, cfg
    self.height, self.width = height, width
    ae_lib, acfg = models.ae_lib, models.ae_config
    denoise = stream_lib.unet_denoiser(models.unet_config, cfg.bank)
    self._step = stream_lib.make_step(
        lambda p, *a: denoise(p["unet"], *a), cfg,
        encode=lambda p, fr: ae_lib.encode_latents(
            p["ae"], to_model_range(fr), acfg),
        decode=lambda p, z: to_uint8(ae_lib.decode_latents(p["ae"], z, acfg)))
    self.winograd = _winograd_tile(winograd, models.unet_config.dtype)
    unet_params = models.unet
    if self.winograd is not None:
      unet_params = winograd_lib.prepare_params(unet_params, self.winograd)
    self._params = {"unet": unet_params, "ae": models.ae}
    ch = models.unet_config.in_channels
    self._latent_shape = (height // 8, width // 8, ch) if (
        models.ae_kind == "vae") else (
            height // acfg.downsample_factor,
            width // acfg.downsample_factor, ch)
    self.state = stream_lib.init_state(cfg, self._latent_shape)
    self.prompt = None
    self.set_prompt(prompt)

  def set_prompt(self, prompt: str, *, reset_bank: bool = False) -> None:
    """Switches the text condition (no recompilation)."""
    self.prompt = prompt
    self._ctx = encode_prompt(self.models, prompt)
    if reset_bank:
      self.reset()

  def reset(self) -> None:
    """Empties the stream and the bank (the next call primes again)."""
    self.state = stream_lib.init_state(self.cfg, self._latent_shape)

  def __call__(self, frame: np.ndarray | Array) -> Array:
    """uint8 (H, W, 3) -> uint8 (H, W, 3) (device array; not synchronised)."""
    frame = jnp.asarray(frame)
    if frame.shape != (self.height, self.width, 3) or frame.dtype != jnp.uint8:
      raise ValueError(f"frame {frame.shape} {frame.dtype}: want uint8"
                       f" ({self.height}, {self.width}, 3)")
    out, self.state = self._step(self._params, self.state, frame[None],
                                 self._ctx)
    return out[0]

  def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Edits a stream of frames, yielding numpy frames as they finish."""
    for fr in frames:
      yield np.asarray(self(fr))

  @property
  def bank_bytes(self) -> int:
    from jaxlib_models.video.streamv2v import bank as bank_lib  # pylint: disable=g-import-not-at-top
    return 0 if self.state.bank is None else bank_lib.bank_bytes(
        self.state.bank)
