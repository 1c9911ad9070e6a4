"""Single-file Stable Diffusion 1.x checkpoints (original LDM/CompVis layout).

A single-file checkpoint (`v1-5-pruned-emaonly.safetensors` and the like)
holds three models under one flat key space:

- `model.diffusion_model.*`: the UNet, with LDM module names
  (`input_blocks.K.0.in_layers.2` = `down_blocks.I.resnets.J.conv1`, ...);
- `first_stage_model.*`: the AutoencoderKL (`encoder.down.I.block.J`,
  `encoder.mid.attn_1.q` as a 1x1 conv, ...);
- `cond_stage_model.transformer.*`: the CLIP text model (transformers keys,
  with or without the `text_model.` level);

plus DDPM schedule buffers (`betas`, `alphas_cumprod`, ...) and, in full
checkpoints, EMA copies (`model_ema.*`). `split_ldm_checkpoint` renames
everything to diffusers/transformers state-dict keys, after which the generic
rules of `convert.py` apply; `ldm_checkpoint_from_components` is the inverse.

Which LDM index a diffusers module gets depends on the UNet layout
(`layers_per_block`, the number of blocks and which blocks have attention),
so both directions take a small config dict with the diffusers config keys.
The mapping is our own derivation of the LDM module order, checked against
diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` in
tests/diffusion/test_single_file.py. Files are read with `safetensors`
(numpy); torch is never imported.
"""

import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from jaxlib_models.diffusion.convert import ConversionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

# diffusers configs of SD 1.5 (the keys this module reads).
SD15_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
SD15_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}

# Top-level DDPM buffers of LDM checkpoints; our schedulers recompute them.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
})
_LEAVES = frozenset({"weight", "bias"})

# Sub-module renames inside one mapped module: (diffusers, LDM) pairs.
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
                ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"),
               ("conv2", "conv2"), ("conv_shortcut", "nin_shortcut"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
             ("to_v", "v"), ("to_out.0", "proj_out"))
_ANY = None  # identical sub-structure (transformer blocks): any suffix
_LEAF = ()  # the entry is itself a module: weight/bias only


# --------------------------------------------------------------------------
# Module tables: (diffusers module, LDM module, sub-module renames).


def _layers_per_block(cfg: Mapping) -> int:
  lpb = cfg["layers_per_block"]
  if isinstance(lpb, Iterable):
    lpb = tuple(lpb)
    if len(set(lpb)) != 1:
      raise ConversionError(f"per-block layers_per_block {lpb} unsupported")
    lpb = lpb[0]
  return int(lpb)


def _has_attention(block_type: str) -> bool:
  return block_type.startswith("CrossAttn")


def unet_module_table(unet_config: Mapping) -> list[tuple[str, str, object]]:
  """(diffusers module, LDM module, sub-renames) for every UNet module.

  Args:
    unet_config: diffusers `UNet2DConditionModel` config keys
      `layers_per_block`, `down_block_types`, `up_block_types` and optionally
      `mid_block_type` (default `UNetMidBlock2DCrossAttn`).

  Returns:
    Entries in LDM order; sub-renames are a tuple of (diffusers, LDM) pairs,
    `_ANY` for identical structure or `_LEAF` for a plain layer.
  """
  lpb = _layers_per_block(unet_config)
  down = tuple(unet_config["down_block_types"])
  up = tuple(unet_config["up_block_types"])
  mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
  if mid not in ("UNetMidBlock2DCrossAttn", None):
    raise ConversionError(f"mid_block_type {mid!r} is not supported")
  t = [("conv_in", "input_blocks.0.0", _LEAF),
       ("time_embedding.linear_1", "time_embed.0", _LEAF),
       ("time_embedding.linear_2", "time_embed.2", _LEAF)]
  k = 1
  for i, kind in enumerate(down):
    for j in range(lpb):
      t.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0",
                _UNET_RESNET))
      if _has_attention(kind):
        t.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1",
                  _ANY))
      k += 1
    if i < len(down) - 1:
      t.append((f"down_blocks.{i}.downsamplers.0.conv",
                f"input_blocks.{k}.0.op", _LEAF))
      k += 1
  if mid is not None:
    t += [("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
          ("mid_block.attentions.0", "middle_block.1", _ANY),
          ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
  k = 0
  for i, kind in enumerate(up):
    attn = _has_attention(kind)
    for j in range(lpb + 1):
      t.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0",
                _UNET_RESNET))
      if attn:
        t.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1",
                  _ANY))
      if j == lpb and i < len(up) - 1:
        t.append((f"up_blocks.{i}.upsamplers.0.conv",
                  f"output_blocks.{k}.{2 if attn else 1}.conv", _LEAF))
      k += 1
  t += [("conv_norm_out", "out.0", _LEAF), ("conv_out", "out.2", _LEAF)]
  return t


def vae_module_table(vae_config: Mapping) -> list[tuple[str, str, object]]:
  """Like `unet_module_table` for `AutoencoderKL` (keys `layers_per_block`,
  `down_block_types`, `up_block_types`; mid-block attention assumed)."""
  lpb = _layers_per_block(vae_config)
  n_down = len(vae_config["down_block_types"])
  n_up = len(vae_config["up_block_types"])
  t = [("encoder.conv_in", "encoder.conv_in", _LEAF)]
  for i in range(n_down):
    for j in range(lpb):
      t.append((f"encoder.down_blocks.{i}.resnets.{j}",
                f"encoder.down.{i}.block.{j}", _VAE_RESNET))
    if i < n_down - 1:
      t.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                f"encoder.down.{i}.downsample.conv", _LEAF))
  for part in ("encoder", "decoder"):
    t += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
          (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN),
          (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)]
  t += [("encoder.conv_norm_out", "encoder.norm_out", _LEAF),
        ("encoder.conv_out", "encoder.conv_out", _LEAF),
        ("quant_conv", "quant_conv", _LEAF),
        ("post_quant_conv", "post_quant_conv", _LEAF),
        ("decoder.conv_in", "decoder.conv_in", _LEAF)]
  for i in range(n_up):
    b = n_up - 1 - i  # LDM numbers decoder levels from the bottom
    for j in range(lpb + 1):
      t.append((f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{b}.block.{j}", _VAE_RESNET))
    if i < n_up - 1:
      t.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                f"decoder.up.{b}.upsample.conv", _LEAF))
  t += [("decoder.conv_norm_out", "decoder.norm_out", _LEAF),
        ("decoder.conv_out", "decoder.conv_out", _LEAF)]
  return t


class _Renamer:
  """Renames keys or module names between the two sides of a table."""

  def __init__(self, table, to_ldm: bool):
    self._to_ldm = to_ldm
    src = 0 if to_ldm else 1
    self._entries = {e[src]: e for e in table}
    self.table = table

  def __call__(self, name: str, *, module: bool = False) -> tuple[str, str]:
    """(renamed name, table entry source name); raises KeyError if unmapped.

    `module=True` renames a module name (no `.weight`/`.bias` leaf).
    """
    segs = name.split(".")
    for n in range(len(segs), 0, -1):
      head = ".".join(segs[:n])
      if head not in self._entries:
        continue
      d_name, l_name, subs = self._entries[head]
      dst = l_name if self._to_ldm else d_name
      rest = segs[n:]
      if subs is _ANY:
        return ".".join([dst] + rest), head
      tail = rest
      if subs:
        rest_s = ".".join(rest)
        for d_sub, l_sub in subs:
          a, b = (d_sub, l_sub) if self._to_ldm else (l_sub, d_sub)
          if rest_s == a or rest_s.startswith(a + "."):
            tail = rest_s[len(a) + 1:].split(".") if rest_s != a else []
            rest = b.split(".") + tail
            break
        else:
          raise KeyError(name)
      if module:
        if tail:
          raise KeyError(name)
      elif len(tail) != 1 or tail[0] not in _LEAVES:
        raise KeyError(name)
      return ".".join([dst] + rest), head
    raise KeyError(name)


def unet_ldm_module_names(unet_config: Mapping,
                          module_names: Iterable[str]) -> dict[str, str]:
  """diffusers UNet module name -> LDM name, for the names that map.

  Used by `lora.fuse_lora` to read kohya LoRAs written with LDM names.
  """
  ren = _Renamer(unet_module_table(unet_config), to_ldm=True)
  out = {}
  for m in module_names:
    try:
      out[m] = ren(m, module=True)[0]
    except KeyError:
      pass
  return out


def unet_config_from_state(state: Iterable[str] | Mapping) -> dict:
  """Infers the `unet_module_table` config from diffusers UNet keys."""
  keys = list(state)
  down, up = {}, {}
  lpb = 0
  for k in keys:
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", k)
    if not m:
      continue
    blocks = down if m.group(1) == "down" else up
    attn = blocks.setdefault(int(m.group(2)), [False])
    if m.group(3) == "attentions":
      attn[0] = True
    if m.group(1) == "down" and m.group(3) == "resnets":
      lpb = max(lpb, int(m.group(4)) + 1)
  if not down or not up:
    raise ConversionError("no down_blocks/up_blocks keys: not a diffusers UNet")
  n = max(down) + 1
  return {
      "layers_per_block": lpb,
      "down_block_types": tuple(
          "CrossAttnDownBlock2D" if down.get(i, [False])[0] else "DownBlock2D"
          for i in range(n)),
      "up_block_types": tuple(
          "CrossAttnUpBlock2D" if up.get(i, [False])[0] else "UpBlock2D"
          for i in range(max(up) + 1)),
      "mid_block_type": ("UNetMidBlock2DCrossAttn"
                         if any(k.startswith("mid_block.") for k in keys)
                         else None),
  }


# --------------------------------------------------------------------------
# Whole checkpoints.


def _rename_all(state: Mapping[str, np.ndarray], table, to_ldm: bool,
                what: str, vae_attn: bool) -> dict[str, np.ndarray]:
  ren = _Renamer(table, to_ldm)
  out, unknown, used = {}, [], set()
  for key, x in state.items():
    try:
      new, head = ren(key)
    except KeyError:
      unknown.append(key)
      continue
    used.add(head)
    x = np.asarray(x)
    if vae_attn and ".mid_block.attentions." in (key if to_ldm else new):
      x = _vae_attn_weight(new if to_ldm else key, x, to_ldm)
    out[new] = x
  if unknown:
    raise ConversionError(
        f"{what}: {len(unknown)} key(s) fit no module of this config: "
        f"{sorted(unknown)[:8]}")
  src = 0 if to_ldm else 1
  missing = [f"{e[0]} (LDM {e[1]})" for e in table if e[src] not in used]
  if missing:
    raise ConversionError(
        f"{what}: the config has module(s) with no tensors: {missing[:8]}")
  return out


def _vae_attn_weight(ldm_key: str, x: np.ndarray, to_ldm: bool) -> np.ndarray:
  """LDM's VAE attention q/k/v/proj_out are 1x1 convs; diffusers' linears."""
  if not re.search(r"\.(q|k|v|proj_out)\.weight$", ldm_key):
    return x
  if to_ldm:
    return x[:, :, None, None] if x.ndim == 2 else x
  if x.ndim == 4 and x.shape[2:] == (1, 1):
    return x[:, :, 0, 0]
  if x.ndim == 3 and x.shape[2] == 1:
    return x[:, :, 0]
  if x.ndim != 2:
    raise ConversionError(f"{ldm_key}: shape {x.shape} is not a 1x1 conv")
  return x


def _ema_key(unet_key: str) -> str:
  # LDM's LitEma keeps `model.diffusion_model.a.b` as
  # `model_ema.diffusion_modelab` (dots dropped).
  return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def split_ldm_checkpoint(
    state: Mapping[str, np.ndarray],
    unet_config: Mapping = SD15_UNET_CONFIG,
    vae_config: Mapping = SD15_VAE_CONFIG,
    *,
    use_ema: bool = False,
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, dict[str, np.ndarray]]:
  """Splits an LDM single-file state dict into diffusers components.

  Args:
    state: flat LDM state dict (numpy arrays).
    unet_config: diffusers UNet config (see `unet_module_table`).
    vae_config: diffusers VAE config (see `vae_module_table`).
    use_ema: take the UNet weights from the `model_ema.*` copies.
    ignore_prefixes: further key prefixes to drop (e.g. a training-loss
      module); schedule buffers and `model_ema.*` are always dropped.
    source: quoted in errors.

  Returns:
    `{"unet": ..., "vae": ..., "text_encoder": ...}`, each a state dict with
    diffusers (`UNet2DConditionModel`, `AutoencoderKL`) or transformers
    (`CLIPTextModel`, `text_model.*`) keys; a component absent from the file
    is an empty dict.

  Raises:
    ConversionError: keys of no known component, keys that fit no module of
      the configs (both listed by name), or config modules without tensors.
  """
  ignore = tuple(ignore_prefixes)
  parts: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {},
                                             "text_encoder": {}}
  leftover = []
  for key, x in state.items():
    if key.startswith(UNET_PREFIX):
      if use_ema:
        ema = _ema_key(key)
        if ema not in state:
          raise ConversionError(f"{source}: no EMA copy {ema!r} of {key!r}")
        x = state[ema]
      parts["unet"][key[len(UNET_PREFIX):]] = x
    elif key.startswith(VAE_PREFIX):
      parts["vae"][key[len(VAE_PREFIX):]] = x
    elif key.startswith(TEXT_PREFIX):
      rest = key[len(TEXT_PREFIX):]
      if rest.endswith("position_ids"):
        continue  # buffer recomputed by the model
      if not rest.startswith("text_model."):
        rest = "text_model." + rest  # transformers < 4.x layout
      parts["text_encoder"][rest] = np.asarray(x)
    elif (key in _SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX)
          or key.startswith(ignore)):
      continue
    else:
      leftover.append(key)
  if leftover:
    raise ConversionError(
        f"{source}: {len(leftover)} key(s) belong to no known component: "
        f"{sorted(leftover)[:8]}")
  out = {"text_encoder": parts["text_encoder"]}
  out["unet"] = (_rename_all(parts["unet"], unet_module_table(unet_config),
                             False, f"{source} (UNet)", False)
                 if parts["unet"] else {})
  out["vae"] = (_rename_all(parts["vae"], vae_module_table(vae_config), False,
                            f"{source} (VAE)", True)
                if parts["vae"] else {})
  return out


def ldm_checkpoint_from_components(
    components: Mapping[str, Mapping[str, np.ndarray]],
    unet_config: Mapping = SD15_UNET_CONFIG,
    vae_config: Mapping = SD15_VAE_CONFIG,
) -> dict[str, np.ndarray]:
  """The inverse of `split_ldm_checkpoint` (diffusers -> one LDM dict).

  Args:
    components: any of "unet", "vae", "text_encoder" (diffusers /
      transformers keys; text keys with or without `text_model.`).
    unet_config: see `unet_module_table`.
    vae_config: see `vae_module_table`.

  Returns:
    Flat LDM state dict (VAE attention weights as 1x1 convs, text keys as
    `cond_stage_model.transformer.text_model.*`).
  """
  unknown = set(components) - {"unet", "vae", "text_encoder"}
  if unknown:
    raise ConversionError(f"unknown component(s) {sorted(unknown)}")
  out = {}
  if components.get("unet"):
    for k, x in _rename_all(components["unet"], unet_module_table(unet_config),
                            True, "UNet", False).items():
      out[UNET_PREFIX + k] = x
  if components.get("vae"):
    for k, x in _rename_all(components["vae"], vae_module_table(vae_config),
                            True, "VAE", True).items():
      out[VAE_PREFIX + k] = x
  for k, x in (components.get("text_encoder") or {}).items():
    if k.endswith("position_ids"):
      continue
    if not k.startswith("text_model."):
      k = "text_model." + k
    out[TEXT_PREFIX + k] = np.asarray(x)
  return out


def read_single_file(
    path: str,
    unet_config: Mapping = SD15_UNET_CONFIG,
    vae_config: Mapping = SD15_VAE_CONFIG,
    **kwargs,
) -> dict[str, dict[str, np.ndarray]]:
  """Reads a single-file `.safetensors` checkpoint and splits it.

  Args:
    path: the `.safetensors` file.
    unet_config: see `unet_module_table`.
    vae_config: see `vae_module_table`.
    **kwargs: passed to `split_ldm_checkpoint`.

  Returns:
    See `split_ldm_checkpoint`.

  Raises:
    ConversionError: a pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`),
      which cannot be read without torch, or any error of
      `split_ldm_checkpoint`.
  """
  path = os.fspath(path)
  if os.path.splitext(path)[1].lower() in (".ckpt", ".pt", ".pth", ".bin"):
    raise ConversionError(
        f"{path}: pickle checkpoints need torch to read. Convert once, e.g."
        " `python -c \"import torch, safetensors.torch as s; sd ="
        " torch.load('in.ckpt', map_location='cpu', weights_only=True);"
        " sd = sd.get('state_dict', sd); s.save_file({k: v.contiguous()"
        " for k, v in sd.items() if hasattr(v, 'contiguous')},"
        " 'out.safetensors')\"`, then pass the .safetensors file")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(path, framework="numpy") as f:
    state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  kwargs.setdefault("source", path)
  return split_ldm_checkpoint(state, unet_config, vae_config, **kwargs)
