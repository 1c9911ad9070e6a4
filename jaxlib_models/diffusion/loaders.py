"""Loading Stable Diffusion weights: diffusers folders and single files.

Every path goes PyTorch-layout state dict (numpy, via safetensors; torch is
never imported) -> optional LoRA fusing (`lora.fuse_lora`) -> strict
conversion into our parameter tree (`convert.params_from_torch_state`: the
first missing, extra or misshapen tensor is named). Converted trees are
cached (`cache.cached_params`, keyed on the files, their sizes and mtimes,
the LoRA scales and the dtype), so a second start skips the ~1 min
conversion of a full SD-1.5 UNet.

- `load_unet`, `load_vae`, `load_taesd`, `load_controlnet`,
  `load_text_encoder`: one diffusers/transformers component folder each.
- `load_sd_folder`: a diffusers pipeline folder (`model_index.json`,
  `unet/`, `vae/`, `text_encoder/`, `tokenizer/`).
- `load_single_file`: an original (LDM/CompVis) single-file SD-1.x
  checkpoint in safetensors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlib_models.diffusion import cache as cache_lib
from jaxlib_models.diffusion import clip, convert, lora as lora_lib
from jaxlib_models.diffusion import single_file, taesd as taesd_lib
from jaxlib_models.diffusion import unet as unet_lib, vae as vae_lib
from jaxlib_models.diffusion.clip_tokenizer import CLIPTokenizer

ConversionError = convert.ConversionError


@dataclasses.dataclass
class SDComponents:
  """A Stable Diffusion model as configs and parameter trees."""

  unet_config: unet_lib.UNetConfig
  unet: Any
  vae_config: vae_lib.VAEConfig | None
  vae: Any
  text_config: clip.CLIPTextConfig
  text: Any
  tokenizer: CLIPTokenizer | None
  source: str = ""


def _read_config(folder: str, want_class: Sequence[str]) -> tuple[dict, str]:
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder")
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {folder} a diffusers"
                            f" {want_class[0]} folder?")
  with open(path) as fh:
    try:
      d = json.load(fh)
    except ValueError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from None
  name = d.get("_class_name") or (d.get("architectures") or [None])[0]
  if name is not None and name not in want_class:
    raise ConversionError(
        f"{path}: this folder holds a {name}, not a {' / '.join(want_class)};"
        " point to the right component folder")
  return d, path


def _weights(folder: str) -> tuple[dict[str, np.ndarray], list[str]]:
  files = convert._safetensor_files(os.fspath(folder))  # pylint: disable=protected-access
  return convert.read_safetensors_folder(folder), files


def _fuse(state, loras, scales, component, unet_config=None):
  scales = list(scales) + [1.0] * (len(loras) - len(scales))
  for path, s in zip(loras, scales):
    state = lora_lib.fuse_lora(state, lora_lib.read_lora(path), scale=s,
                               component=component, unet_config=unet_config,
                               source=os.fspath(path))
  return state


def _cached(files, tag, build, use_cache):
  if not use_cache:
    return build()
  return cache_lib.cached_params(list(files), tag, build)


def _lora_tag(loras, scales) -> str:
  scales = list(scales) + [1.0] * (len(loras) - len(scales))
  return ",".join(f"{os.path.basename(os.fspath(p))}@{s:g}"
                  for p, s in zip(loras, scales))


def _with_dtype(cfg, dtype: str | None):
  return cfg if dtype is None else dataclasses.replace(cfg, dtype=dtype)


def _load_component(folder: str, class_name: str, config_cls, abstract_fn,
                    *, literal=frozenset(), dtype: str | None = None,
                    loras: Sequence[str] = (),
                    lora_scales: Sequence[float] = (), cache: bool = True):
  """One diffusers model folder -> (config, params), LoRAs fused, cached.

  Args:
    folder: `config.json` + `diffusion_pytorch_model.safetensors` (or
      shards).
    class_name: the diffusers class the folder must hold (`_class_name`).
    config_cls: our config dataclass (with `from_diffusers_dict`).
    abstract_fn: config -> abstract parameter tree.
    literal: see `convert.path_to_torch_key`.
    dtype: compute dtype of the returned config (params stay float32).
    loras, lora_scales: LoRA files fused in order (UNet only), strengths.
    cache: use the converted-params cache.
  """
  d, path = _read_config(folder, (class_name,))
  cfg = _with_dtype(config_cls.from_diffusers_dict(d, source=path), dtype)
  files = convert._safetensor_files(os.fspath(folder))  # pylint: disable=protected-access

  def build():
    state = convert.read_safetensors_folder(folder)
    if loras:
      state = _fuse(state, loras, lora_scales, "unet", unet_config=d)
    return convert.params_from_torch_state(
        state.__getitem__, state.keys(), abstract_fn(cfg), literal=literal,
        source=os.fspath(folder))

  tag = f"{class_name}:{_lora_tag(loras, lora_scales)}"
  return cfg, _cached(list(files) + list(loras), tag, build, cache)


def load_unet(folder: str, *, loras: Sequence[str] = (),
              lora_scales: Sequence[float] = (), dtype: str | None = None,
              cache: bool = True) -> tuple[unet_lib.UNetConfig, Any]:
  """A diffusers `UNet2DConditionModel` folder -> (config, params), with
  LoRA files fused in order (kohya or PEFT keys; strengths default 1.0)."""
  return _load_component(
      folder, "UNet2DConditionModel", unet_lib.UNetConfig,
      unet_lib.abstract_unet_params, literal=unet_lib.UNET_LITERAL,
      dtype=dtype, loras=loras, lora_scales=lora_scales, cache=cache)


def load_controlnet(folder: str, *, dtype: str | None = None,
                    cache: bool = True):
  """A diffusers `ControlNetModel` folder -> (config, params)."""
  from jaxlib_models.diffusion import controlnet as cn  # pylint: disable=g-import-not-at-top
  return _load_component(folder, "ControlNetModel", cn.ControlNetConfig,
                         cn.abstract_controlnet_params,
                         literal=cn.CONTROLNET_LITERAL, dtype=dtype,
                         cache=cache)


def load_text_encoder(folder: str, *, loras: Sequence[str] = (),
                      lora_scales: Sequence[float] = (),
                      cache: bool = True) -> tuple[clip.CLIPTextConfig, Any]:
  """SD's `text_encoder/` (transformers CLIPTextModel) with optional LoRAs."""
  if not loras:
    files = convert._safetensor_files(os.fspath(folder))  # pylint: disable=protected-access
    holder = {}

    def build_plain():
      holder["cfg"], p = convert.load_clip_text(folder)
      return p

    params = _cached(files, "text_encoder", build_plain, cache)
    cfg = holder.get("cfg") or clip.CLIPTextConfig.from_hf_dict(
        _read_config(folder, ("CLIPTextModel", "CLIPTextModelWithProjection",
                              "CLIPModel"))[0])
    return cfg, params
  d, path = _read_config(folder, ("CLIPTextModel",))
  cfg = clip.CLIPTextConfig.from_hf_dict(d, source=path)
  files = convert._safetensor_files(os.fspath(folder))  # pylint: disable=protected-access

  def build():
    state = convert.read_safetensors_folder(folder)
    state = _fuse(state, loras, lora_scales, "text_encoder")
    return text_params_from_state(cfg, state, source=folder)

  params = _cached(list(files) + list(loras),
                   f"text_encoder:{_lora_tag(loras, lora_scales)}", build, cache)
  return cfg, params


def text_params_from_state(cfg: clip.CLIPTextConfig, state, *,
                           source: str = "state dict"):
  """transformers CLIPTextModel keys (with or without `text_model.`)."""
  import jax  # pylint: disable=g-import-not-at-top
  state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
  if not any(k.startswith("text_model.") for k in state):
    state = {f"text_model.{k}": v for k, v in state.items()}
  abstract = jax.eval_shape(lambda: clip.init_text_params(
      cfg, jax.random.key(0)))
  return convert.params_from_torch_state(state.__getitem__, state.keys(),
                                         abstract, source=source)


def load_vae(folder: str, *, dtype: str | None = None, cache: bool = False):
  """A diffusers `AutoencoderKL` folder -> (config, params)."""
  return _load_component(folder, "AutoencoderKL", vae_lib.VAEConfig,
                         vae_lib.abstract_vae_params, dtype=dtype,
                         cache=cache)


def load_taesd(folder: str, *, dtype: str | None = None,
               cache: bool = False):
  """A diffusers `AutoencoderTiny` folder (madebyollin/taesd)."""
  return _load_component(folder, "AutoencoderTiny", taesd_lib.TAESDConfig,
                         taesd_lib.abstract_taesd_params, dtype=dtype,
                         cache=cache)


def load_tokenizer(folder: str) -> CLIPTokenizer:
  return CLIPTokenizer.from_pretrained(folder)


def load_sd_folder(folder: str, *, loras: Sequence[str] = (),
                   lora_scales: Sequence[float] = (),
                   dtype: str | None = None, with_vae: bool = True,
                   cache: bool = True) -> SDComponents:
  """A diffusers Stable Diffusion pipeline folder.

  Args:
    folder: holds `unet/`, `text_encoder/`, `tokenizer/` and (with_vae)
      `vae/`; `model_index.json` is checked when present.
    loras: LoRA files (e.g. LCM-LoRA) fused into the UNet and, where they
      carry text-encoder tensors, the text encoder.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder")
  index = os.path.join(folder, "model_index.json")
  if os.path.exists(index):
    with open(index) as fh:
      idx = json.load(fh)
    missing = [c for c in ("unet", "text_encoder", "tokenizer")
               + (("vae",) if with_vae else ()) if c not in idx]
    if missing:
      raise ConversionError(f"{index}: no {missing} component; is this a"
                            " Stable Diffusion pipeline folder?")
  for sub in ("unet", "text_encoder", "tokenizer") + (
      ("vae",) if with_vae else ()):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise FileNotFoundError(
          f"{folder}: no {sub}/ folder (a diffusers SD folder has unet/,"
          " vae/, text_encoder/ and tokenizer/; a single .safetensors file"
          " goes through load_single_file)")
  ucfg, unet = load_unet(os.path.join(folder, "unet"), loras=loras,
                         lora_scales=lora_scales, dtype=dtype, cache=cache)
  te_loras, te_scales = _text_loras(loras, lora_scales)
  tcfg, text = load_text_encoder(os.path.join(folder, "text_encoder"),
                                 loras=te_loras, lora_scales=te_scales,
                                 cache=cache)
  vcfg = vae = None
  if with_vae:
    vcfg, vae = load_vae(os.path.join(folder, "vae"), dtype=dtype)
  tok = load_tokenizer(os.path.join(folder, "tokenizer"))
  return SDComponents(ucfg, unet, vcfg, vae, tcfg, text, tok, source=folder)


def _text_loras(loras, scales) -> tuple[list, list]:
  """The LoRAs (and their scales) that carry text-encoder tensors."""
  scales = list(scales) + [1.0] * (len(loras) - len(scales))
  keep = [(p, s) for p, s in zip(loras, scales)
          if lora_lib.split_lora(lora_lib.read_lora(p)).get("text_encoder")]
  return [p for p, _ in keep], [s for _, s in keep]


def bundled_bpe_vocab() -> str | None:
  """OpenAI's CLIP BPE file from an installed `open_clip` (not imported:
  `pip install --no-deps open-clip-torch` ships it)."""
  spec = importlib.util.find_spec("open_clip")
  for d in (spec.submodule_search_locations or []) if spec else []:
    p = os.path.join(d, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.exists(p):
      return p
  return None


def default_tokenizer() -> CLIPTokenizer:
  """SD's tokenizer from the bundled OpenAI BPE vocabulary."""
  path = bundled_bpe_vocab()
  if path is None:
    raise FileNotFoundError(
        "no CLIP BPE vocabulary: pass a model folder with tokenizer/, or"
        " `pip install --no-deps open-clip-torch==3.3.0` (it ships"
        " bpe_simple_vocab_16e6.txt.gz; `make venv` installs it)")
  return CLIPTokenizer.from_openai_bpe(path)


def _layout(cfg) -> dict:
  """The block layout `single_file` needs, from a UNet or VAE config."""
  n = len(cfg.block_out_channels)
  d = {"block_out_channels": tuple(cfg.block_out_channels),
       "layers_per_block": cfg.layers_per_block,
       "down_block_types": tuple(getattr(cfg, "down_block_types",
                                         ("DownEncoderBlock2D",) * n)),
       "up_block_types": tuple(getattr(cfg, "up_block_types",
                                       ("UpDecoderBlock2D",) * n))}
  if hasattr(cfg, "mid_block_type"):
    d["mid_block_type"] = cfg.mid_block_type
  return d


def load_single_file(path: str, *, loras: Sequence[str] = (),
                     lora_scales: Sequence[float] = (),
                     dtype: str | None = None,
                     unet_config: unet_lib.UNetConfig | None = None,
                     vae_config: vae_lib.VAEConfig | None = None,
                     text_config: clip.CLIPTextConfig | None = None,
                     tokenizer: CLIPTokenizer | None = None) -> SDComponents:
  """An original single-file SD-1.x checkpoint (`.safetensors`).

  The architecture defaults to SD 1.5's (UNet, VAE, CLIP ViT-L/14 text); a
  checkpoint of another layout fails with the first tensor that does not fit.
  The tokenizer is not in such files: pass one, or the bundled OpenAI BPE
  vocabulary is used when `open_clip` is installed (None otherwise).
  """
  ucfg = _with_dtype(unet_config or unet_lib.sd15_unet_config(), dtype)
  vcfg = _with_dtype(vae_config or vae_lib.VAEConfig(), dtype)
  parts = single_file.read_single_file(path, _layout(ucfg), _layout(vcfg))
  ustate = _fuse(parts["unet"], loras, lora_scales, "unet",
                 unet_config=_layout(ucfg))
  unet = unet_lib.unet_params_from_state(ucfg, ustate, source=f"{path} (unet)")
  vae = convert.params_from_torch_state(
      parts["vae"].__getitem__, parts["vae"].keys(),
      vae_lib.abstract_vae_params(vcfg), source=f"{path} (vae)")
  tcfg = text_config or clip.sd15_text_config()
  tstate = _fuse(parts["text_encoder"], *_text_loras(loras, lora_scales),
                 "text_encoder")
  text = text_params_from_state(tcfg, tstate, source=f"{path} (text encoder)")
  if tokenizer is None:
    bpe = bundled_bpe_vocab()
    tokenizer = CLIPTokenizer.from_openai_bpe(bpe) if bpe else None
  return SDComponents(ucfg, unet, vcfg, vae, tcfg, text, tokenizer,
                      source=os.fspath(path))
