"""LoRA fusing into PyTorch-layout state dicts at load time.

Each adapted layer gets `W <- W + scale * (alpha / r) * (B @ A)` with
`A = down (r, I[, kh, kw])` and `B = up (O, r[, 1, 1])` (Hu et al., arXiv
2106.09685, Eq. 3; video-editing brief §2.1 "Weights I/O"). Conv LoRAs are
fused as 2-D matrices (`A` reshaped to `(r, I*kh*kw)`) and reshaped back, so
1x1 and 3x3 conv LoRAs (LCM-LoRA has both) need no special case. A missing
alpha means alpha = r (factor 1), as in kohya-ss and diffusers.

Two key layouts are accepted:

- kohya-ss: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight`
  / `.alpha`, `lora_te_` (or `lora_te1_`) for the text encoder, `lora_te2_`
  for a second one. The underscored name is matched against the TARGET state
  dict's module names (`.` -> `_`), never split by guesswork; a name two
  target modules share is an error. UNet names may use diffusers
  (`down_blocks_0_attentions_0_...`) or LDM module names
  (`input_blocks_1_1_...`, mapped through `single_file`).
- diffusers/PEFT: `[unet.|text_encoder.|text_encoder_2.]<module>.lora_A.weight`
  / `.lora_B.weight` [/ `<module>.alpha`]; alphas may also come from a PEFT
  `LoraConfig`-like dict (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`,
  `use_rslora`), e.g. the `lora_adapter_metadata` diffusers writes.

Anything else (DoRA magnitudes, LoHa/LoKr, LoRA biases, a key no target
module matches) raises `LoRAError`: a silently skipped tensor would change
the model without a trace.
"""

import json
import re
from collections.abc import Mapping

import numpy as np

from jaxlib_models.diffusion import single_file
from jaxlib_models.diffusion.convert import ConversionError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = re.compile(
    r"^(lora_unet|lora_te1?|lora_te2)_([^.]+)\."
    r"(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder",
                    "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
_PEFT = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|alpha)$")
_PART = {"lora_down.weight": "down", "lora_up.weight": "up",
         "lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
_LDM_UNET_HEADS = ("input_blocks_", "middle_block_", "output_blocks_",
                   "time_embed_", "out_")


class LoRAError(ValueError):
  """A LoRA file does not fit the model it is fused into."""


def read_lora(path: str, *, with_metadata: bool = False):
  """Reads a LoRA `.safetensors` file as numpy arrays.

  Args:
    path: the file.
    with_metadata: also return diffusers' parsed `lora_adapter_metadata`
      (PEFT config keys prefixed by component, e.g. `unet.lora_alpha`), or
      None when the file has none.

  Returns:
    The state dict, or (state dict, metadata) with `with_metadata`.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(path, framework="numpy") as f:
    state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = f.metadata() or {}
  if not with_metadata:
    return state
  raw = meta.get("lora_adapter_metadata")
  return state, (json.loads(raw) if raw else None)


def _describe(key: str, x) -> str:
  return f"{key!r} {tuple(np.shape(x))}"


def split_lora(lora: Mapping[str, np.ndarray]) -> dict[str | None, dict]:
  """Groups LoRA tensors by component and module.

  Returns:
    component (None for unprefixed PEFT keys) -> module name -> dict with
    "down", "up" (arrays), "alpha" (float or None), "keys" (source keys) and
    "kohya" (bool: the module name is kohya-underscored).

  Raises:
    LoRAError: a key of neither layout, or a module without both down and up.
  """
  groups: dict[str | None, dict] = {}
  for key, x in lora.items():
    m = _KOHYA.match(key)
    if m:
      comp, module, part, kohya = (_KOHYA_COMPONENT[m.group(1)], m.group(2),
                                   m.group(3), True)
    else:
      m = _PEFT.match(key)
      if not m or key.startswith("lora_"):
        raise LoRAError(
            f"LoRA key {_describe(key, x)} is neither kohya"
            " (`lora_unet_*.lora_down.weight`) nor PEFT (`*.lora_A.weight`);"
            " DoRA, LoHa/LoKr and LoRA biases are not supported")
      module, part, kohya = m.group(1), m.group(2), False
      head, _, tail = module.partition(".")
      comp = head if head in COMPONENTS and tail else None
      module = tail if comp else module
    entry = groups.setdefault(comp, {}).setdefault(
        module, {"down": None, "up": None, "alpha": None, "keys": [],
                 "kohya": kohya})
    if entry["kohya"] != kohya:
      raise LoRAError(f"LoRA key {key!r} mixes kohya and PEFT naming")
    entry["keys"].append(key)
    p = _PART[part]
    if p == "alpha":
      a = np.asarray(x, np.float64)
      if a.size != 1:
        raise LoRAError(f"LoRA alpha {_describe(key, x)} is not a scalar")
      entry["alpha"] = float(a.reshape(()))
    else:
      entry[p] = np.asarray(x)
  for comp, modules in groups.items():
    for module, e in modules.items():
      if e["down"] is None or e["up"] is None:
        raise LoRAError(
            f"LoRA module {module!r} ({comp or 'unprefixed'}) needs both a"
            f" down/A and an up/B tensor; it has {e['keys']}")
  return groups


def _module_names(state: Mapping[str, np.ndarray]) -> list[str]:
  return [k[:-len(".weight")] for k, x in state.items()
          if k.endswith(".weight") and np.ndim(x) >= 2]


def _kohya_lookup(pairs) -> dict[str, str | None]:
  """kohya underscored name -> target module (None: ambiguous)."""
  table: dict[str, str | None] = {}
  for name, module in pairs:
    u = name.replace(".", "_")
    table[u] = None if table.get(u, module) != module else module
  return table


def _aliases(modules: list[str], component: str):
  """(name, module) pairs; text encoders also without/with `text_model.`
  (SD files and transformers 5's bare CLIPTextModel differ by it)."""
  for m in modules:
    yield m, m
    if component.startswith("text_encoder"):
      if m.startswith("text_model."):
        yield m[len("text_model."):], m
      else:
        yield "text_model." + m, m


def _ldm_lookup(state: Mapping[str, np.ndarray], modules: list[str],
                unet_config: Mapping | None) -> dict[str, str | None]:
  try:
    cfg = unet_config or single_file.unet_config_from_state(state)
    names = single_file.unet_ldm_module_names(cfg, modules)
  except ConversionError as e:
    raise LoRAError(f"LDM-named kohya LoRA: {e}") from None
  return _kohya_lookup((ldm, m) for m, ldm in names.items())


def _peft_alpha(cfg: Mapping, module: str) -> tuple[float | None, int | None]:
  """(alpha, configured r) for a module under PEFT's pattern rules."""

  def pick(patterns, default):
    for pat, v in (patterns or {}).items():
      if re.match(rf"(.*\.)?({pat})$", module):
        return v
    return default

  r = pick(cfg.get("rank_pattern"), cfg.get("r"))
  alpha = pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha"))
  return alpha, r


def _strip_prefix(cfg: Mapping | None, component: str) -> Mapping | None:
  if cfg is None:
    return None
  pre = component + "."
  if any(isinstance(k, str) and k.startswith(pre) for k in cfg):
    return {k[len(pre):]: v for k, v in cfg.items() if k.startswith(pre)}
  return cfg


def fuse_lora(
    state: Mapping[str, np.ndarray],
    lora: Mapping[str, np.ndarray],
    *,
    scale: float = 1.0,
    component: str = "unet",
    peft_config: Mapping | None = None,
    unet_config: Mapping | None = None,
    source: str = "LoRA",
) -> dict[str, np.ndarray]:
  """Returns `state` with the LoRA of one component fused into its weights.

  Args:
    state: PyTorch-layout state dict of the target (diffusers
      `UNet2DConditionModel` keys, or transformers `CLIPTextModel` keys with
      or without `text_model.`). Not modified.
    lora: LoRA tensors (kohya or PEFT keys; see the module docstring). Not
      modified. Tensors of other components are ignored; unprefixed PEFT keys
      count as this component's.
    scale: user LoRA strength `s` (diffusers' `lora_scale`).
    component: "unet", "text_encoder" or "text_encoder_2".
    peft_config: PEFT config (`r`, `lora_alpha`, `rank_pattern`,
      `alpha_pattern`, `use_rslora`), bare or with `<component>.` prefixes;
      used for modules without an `.alpha` tensor.
    unet_config: UNet layout for kohya keys with LDM names; inferred from
      `state` when None.
    source: quoted in errors.

  Returns:
    A new dict: every target tensor, fused ones recomputed in float64 and
    cast back to the target dtype.

  Raises:
    LoRAError: an unmatched or ambiguous module, a rank mismatch between
      down and up, a product that does not fit the target weight, or a
      key of no known layout. Messages name the keys and shapes.
  """
  if component not in COMPONENTS:
    raise LoRAError(f"component {component!r} not in {COMPONENTS}")
  groups = split_lora(lora)
  todo = dict(groups.get(component, {}))
  for module, e in groups.get(None, {}).items():
    if module in todo:
      raise LoRAError(f"{source}: module {module!r} given twice")
    todo[module] = e
  cfg = _strip_prefix(peft_config, component)
  modules = _module_names(state)
  module_set = set(modules)
  lookup = ldm = None
  out = dict(state)
  for name, e in todo.items():
    if e["kohya"]:
      if lookup is None:
        lookup = _kohya_lookup(_aliases(modules, component))
      target = lookup.get(name, False)
      if (target is False and component == "unet"
          and name.startswith(_LDM_UNET_HEADS)):
        if ldm is None:
          ldm = _ldm_lookup(state, modules, unet_config)
        target = ldm.get(name, False)
    else:
      target = name if name in module_set else False
      if target is False and component.startswith("text_encoder"):
        alt = (name[len("text_model."):] if name.startswith("text_model.")
               else "text_model." + name)
        target = alt if alt in module_set else False
    if target is None:
      raise LoRAError(f"{source}: {e['keys'][0]!r} matches several modules")
    if target is False:
      raise LoRAError(
          f"{source}: {e['keys'][0]!r} matches no {component} weight"
          f" (looked for module {name!r})")
    wkey = target + ".weight"
    out[wkey] = _fused(state[wkey], wkey, e, scale, cfg, target, source)
  return out


def _fused(w, wkey, e, scale, cfg, module, source) -> np.ndarray:
  down, up = e["down"], e["up"]
  w = np.asarray(w)
  r = down.shape[0]
  if up.ndim < 2 or up.shape[1] != r or any(s != 1 for s in up.shape[2:]):
    raise LoRAError(
        f"{source}: rank mismatch: down {_describe(e['keys'][0], down)} has"
        f" rank {r}, up has shape {tuple(up.shape)} (needs (O, {r}[, 1, 1]))"
        f"; keys {e['keys']}")
  delta = (up.reshape(up.shape[0], r).astype(np.float64)
           @ down.reshape(r, -1).astype(np.float64))
  fan_in = int(np.prod(w.shape[1:]))
  if delta.shape != (w.shape[0], fan_in):
    raise LoRAError(
        f"{source}: LoRA up {tuple(up.shape)} @ down {tuple(down.shape)} ="
        f" {delta.shape} does not fit {wkey!r} {tuple(w.shape)}; keys"
        f" {e['keys']}")
  alpha = e["alpha"]
  use_rslora = False
  if cfg is not None:
    cfg_alpha, cfg_r = _peft_alpha(cfg, module)
    if cfg_r is not None and int(cfg_r) != r:
      raise LoRAError(
          f"{source}: rank mismatch: {e['keys'][0]!r} has rank {r}, the PEFT"
          f" config says {cfg_r}")
    if alpha is None:
      alpha = cfg_alpha
    use_rslora = bool(cfg.get("use_rslora", False))
  if alpha is None:
    alpha = r
  factor = scale * alpha / (np.sqrt(r) if use_rslora else r)
  fused = w.astype(np.float64) + factor * delta.reshape(w.shape)
  return fused.astype(w.dtype)
