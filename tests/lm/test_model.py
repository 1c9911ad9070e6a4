"""Flax Llama vs PyTorch transformers on tiny random configs, cache, exits."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxlib_models.lm import (LlamaConfig, forward, init_cache, init_params,
                              token_nll)
from jaxlib_models.lm import generate as generate_lib
from jaxlib_models.lm.model import check_exit_layers

pytestmark = pytest.mark.usefixtures("fast_compile")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny(**kw):
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=10000.0, tie_word_embeddings=False)
  base.update(kw)
  return LlamaConfig(**base)


def _hf_state(cfg, params):
  """Our tree -> HF state dict, written here independently of lm.loaders."""
  p = jax.tree.map(np.asarray, params)
  m, lay = p["model"], p["model"]["layers"]
  sd = {"model.embed_tokens.weight": m["embed_tokens"]["embedding"],
        "model.norm.weight": m["norm"]["weight"]}
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = lay["input_layernorm"]["weight"][i]
    sd[pre + "post_attention_layernorm.weight"] = (
        lay["post_attention_layernorm"]["weight"][i])
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[pre + f"self_attn.{k}.weight"] = lay["self_attn"][k]["kernel"][i].T
      if "bias" in lay["self_attn"][k]:
        sd[pre + f"self_attn.{k}.bias"] = lay["self_attn"][k]["bias"][i]
    for k in ("gate_proj", "up_proj", "down_proj"):
      sd[pre + f"mlp.{k}.weight"] = lay["mlp"][k]["kernel"][i].T
  if not cfg.tie_word_embeddings:
    sd["lm_head.weight"] = p["lm_head"]["kernel"].T
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _torch_model(cfg, params, qwen=False):
  d = cfg.to_hf_dict()
  if qwen:
    d.pop("attention_bias")
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in d.items()
                                         if k not in ("architectures",
                                                      "model_type")})
    model = transformers.Qwen2ForCausalLM(hf_cfg)
  else:
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in d.items()
                                         if k not in ("architectures",
                                                      "model_type")})
    model = transformers.LlamaForCausalLM(hf_cfg)
  model = model.float().eval()
  missing, unexpected = model.load_state_dict(_hf_state(cfg, params),
                                              strict=False)
  assert not unexpected, unexpected
  tied_ok = "lm_head.weight" if cfg.tie_word_embeddings else "rotary"
  assert all("rotary" in k or k == tied_ok for k in missing), missing
  return model


def _torch_run(model, tokens, attention_mask=None):
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(tokens)).long(),
                attention_mask=None if attention_mask is None else
                torch.from_numpy(np.asarray(attention_mask)).long(),
                output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.oracle
@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_word_embeddings=True),
    dict(num_key_value_heads=1, head_dim=16),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8},
         max_position_embeddings=64),
])
def test_logits_and_hidden_states_match_transformers(kw):
  cfg = tiny(**kw)
  params = init_params(cfg, jax.random.key(3))
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 16), 0, 64))
  ref_logits, ref_hidden = _torch_run(_torch_model(cfg, params), tokens)
  out = forward(params, cfg, tokens, return_hidden=True)
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4, rtol=0)
  # HF: hidden_states[0..L-1] are block inputs (un-normed), [-1] is normed.
  for j in range(cfg.num_hidden_layers):
    np.testing.assert_allclose(out.hidden[j], ref_hidden[j], atol=1e-4)
  assert np.abs(out.hidden[-1] - ref_hidden[-1]).max() > 1e-3  # normed there


@pytest.mark.oracle
def test_qwen2_style_qkv_bias_matches_transformers():
  cfg = tiny(attention_bias=True)
  params = init_params(cfg, jax.random.key(5))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "bias" in str(path) else x, params)
  tokens = np.asarray(jax.random.randint(jax.random.key(6), (2, 12), 0, 64))
  ref_logits, _ = _torch_run(_torch_model(cfg, params, qwen=True), tokens)
  out = forward(params, cfg, tokens)
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_right_padding_matches_transformers_on_real_tokens():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(7))
  tokens = np.asarray(jax.random.randint(jax.random.key(8), (2, 10), 0, 64))
  mask = np.ones((2, 10), bool)
  mask[1, 6:] = False
  ref, _ = _torch_run(_torch_model(cfg, params), tokens, mask)
  out = forward(params, cfg, tokens, token_mask=jnp.asarray(mask))
  np.testing.assert_allclose(out.logits[0], ref[0], atol=1e-4)
  np.testing.assert_allclose(out.logits[1, :6], ref[1, :6], atol=1e-4)


def test_exits_final_norm_once_and_layer_l_bit_equal():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  out = forward(params, cfg, tokens, exit_layers=(0, 1, 2), return_hidden=True)
  assert np.array_equal(out.exits[2], out.logits)
  # exit 1 = head(norm(h1)); not head(h1)
  h1 = out.hidden[1]
  w = params["model"]["norm"]["weight"]
  normed = h1 * jax.lax.rsqrt(jnp.mean(h1 * h1, -1, keepdims=True) + 1e-5) * w
  want = normed @ params["lm_head"]["kernel"]
  np.testing.assert_allclose(out.exits[1], want, atol=1e-5)
  assert np.abs(out.exits[1] - h1 @ params["lm_head"]["kernel"]).max() > 1e-2
  with pytest.raises(ValueError, match="out of range"):
    check_exit_layers(cfg, (3,))


def test_kv_cache_prefill_decode_equals_full_pass():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
  full = forward(params, cfg, tokens).logits
  cache = init_cache(cfg, 2, 16)
  o = forward(params, cfg, tokens[:, :7], cache=cache)
  parts = [o.logits]
  cache = o.cache
  for t in range(7, 12):
    o = forward(params, cfg, tokens[:, t:t + 1], cache=cache)
    cache = o.cache
    parts.append(o.logits)
  np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=1e-5)
  assert int(cache.index) == 12


def test_shared_prefix_broadcast_equals_separate_full_passes():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  prefix = jax.random.randint(jax.random.key(3), (1, 9), 0, 64)
  conts = jax.random.randint(jax.random.key(4), (3, 5), 0, 64)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  pre = forward(params, cfg, prefix, cache=init_cache(cfg, 1, 16),
                logits_for=None)
  out = forward(params, cfg, conts, cache=pre.cache.broadcast(3),
                token_mask=mask)
  for i in range(3):
    n = int(mask[i].sum())
    full = forward(params, cfg, jnp.concatenate([prefix[0], conts[i, :n]])[None])
    np.testing.assert_allclose(out.logits[i, :n], full.logits[0, 9:],
                               atol=1e-5)


def test_logits_for_selected_positions():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
  full = forward(params, cfg, tokens, exit_layers=(1,))
  idx = jnp.array([[0, 5], [7, 2]])
  sel = forward(params, cfg, tokens, exit_layers=(1,), logits_for=idx)
  for b in range(2):
    np.testing.assert_allclose(sel.logits[b], full.logits[b, idx[b]], atol=1e-6)
    np.testing.assert_allclose(sel.exits[1][b], full.exits[1][b, idx[b]],
                               atol=1e-6)


def test_token_nll_matches_manual():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 64)
  lp = jax.nn.log_softmax(forward(params, cfg, tokens).logits[0, :-1])
  want = -np.mean([lp[t, tokens[0, t + 1]] for t in range(7)])
  np.testing.assert_allclose(token_nll(params, cfg, tokens)[0], want,
                             rtol=1e-5)


def test_config_rejects_unknown_rope_scaling():
  with pytest.raises(ValueError, match="yarn"):
    LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="not a multiple"):
    tiny(num_key_value_heads=3)


def test_read_only_shared_prefix_equals_full_passes():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  prefix = jax.random.randint(jax.random.key(3), (1, 9), 0, 64)
  conts = jax.random.randint(jax.random.key(4), (3, 5), 0, 64)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  # prefix written with 3 padded slots in the middle (invalid) -> positions
  # continue from the real length, not the slot index.
  pre_tok = jnp.concatenate([prefix, jnp.zeros((1, 3), jnp.int32)], 1)
  pre_mask = jnp.arange(12)[None] < 9
  pre = forward(params, cfg, pre_tok, token_mask=pre_mask,
                cache=init_cache(cfg, 1, 16), logits_for=None)
  pos = jnp.broadcast_to(9 + jnp.arange(5), (3, 5))
  out = forward(params, cfg, conts, prefix=pre.cache, positions=pos,
                token_mask=mask, exit_layers=(1,))
  for i in range(3):
    n = int(mask[i].sum())
    full = forward(params, cfg,
                   jnp.concatenate([prefix[0], conts[i, :n]])[None],
                   exit_layers=(1,))
    np.testing.assert_allclose(out.logits[i, :n], full.logits[0, 9:],
                               atol=1e-5)
    np.testing.assert_allclose(out.exits[1][i, :n], full.exits[1][0, 9:],
                               atol=1e-5)


def test_jitted_donated_decode_equals_full_recompute():
  """Prefill + jitted decode steps (cache donated) vs full passes.

  Checks logits, an early exit and the cache itself: after 6 prompt tokens
  and 4 decode steps, every layer's K/V at every valid slot equal those of
  one 10-token prefill. Planted bug: writing the new keys at layer 0 of the
  stacked cache instead of the current layer fails all three.
  """
  cfg = tiny(num_hidden_layers=3)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, 64)
  mask = jnp.ones((2, 10), bool).at[1, :2].set(False)  # left-padded row
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0).astype(jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(3,))
  def run(tok, m, p, cache):
    out = forward(params, cfg, tok, token_mask=m, positions=p, cache=cache,
                  exit_layers=(1,))
    return out.logits, out.exits[1], out.cache

  cache = init_cache(cfg, 2, 16)
  z, e1, cache = run(tokens[:, :6], mask[:, :6], pos[:, :6], cache)
  zs, es = [z[:, -1]], [e1[:, -1]]
  for t in range(6, 9):
    z, e1, cache = run(tokens[:, t:t + 1], mask[:, t:t + 1],
                       pos[:, t:t + 1], cache)
    zs.append(z[:, -1])
    es.append(e1[:, -1])
  _, _, cache = run(tokens[:, 9:], mask[:, 9:], pos[:, 9:], cache)
  for i, t in enumerate(range(6, 10)):
    full = forward(params, cfg, tokens[:, :t], token_mask=mask[:, :t],
                   positions=pos[:, :t], exit_layers=(1,))
    np.testing.assert_allclose(zs[i], full.logits[:, -1], atol=1e-5)
    np.testing.assert_allclose(es[i], full.exits[1][:, -1], atol=1e-5)
  once = forward(params, cfg, tokens, token_mask=mask, positions=pos,
                 cache=init_cache(cfg, 2, 16)).cache
  assert int(cache.index) == 10
  np.testing.assert_array_equal(cache.valid, once.valid)
  valid = np.asarray(once.valid)[None, :, :, None, None]
  for got, want in ((cache.k, once.k), (cache.v, once.v)):
    np.testing.assert_allclose(np.where(valid, got, 0),
                               np.where(valid, want, 0), atol=1e-5)


def test_decode_step_updates_the_donated_cache_in_place():
  """The compiled generate step writes into the donated cache buffers.

  Guards against carrying the stacked KV cache through the layer scan as
  per-layer inputs/outputs, which slices every layer out and assembles a
  fresh full-size (L, B, S, n_kv, d_h) copy of K and V on each token; that
  layout (this module before the fix) needs more than 3 cache buffers of
  scratch here and fails. In place, the scratch holds at most the current
  layer's K/V slices (2/L of one buffer) plus small activations.
  """
  cfg = tiny(num_hidden_layers=6, max_position_embeddings=2048)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  cache = jax.eval_shape(lambda: init_cache(cfg, 2, 1024))
  outs = [{cfg.num_hidden_layers: jax.ShapeDtypeStruct((2, 64), jnp.float32)}]
  pos = [jax.ShapeDtypeStruct((2,), jnp.int32)]
  rng = jax.eval_shape(lambda: jax.random.key(0))
  step = generate_lib._make_step((cfg,), ((),), generate_lib.final_logits,
                                 0.0, 1.0)
  mem = step.lower((params,), [cache], outs, pos, rng).compile()
  mem = mem.memory_analysis()
  kv_bytes = 2 * cache.k.size * cache.k.dtype.itemsize
  assert mem.alias_size_in_bytes >= kv_bytes  # donation took effect
  assert mem.temp_size_in_bytes < kv_bytes / 2, (
      f"decode step needs {mem.temp_size_in_bytes} B of scratch for a"
      f" {kv_bytes} B cache: the cache is copied, not updated in place")


@pytest.mark.parametrize("attention,remat", [("fused", "none"),
                                             ("einsum", "full"),
                                             ("fused", "dots")])
def test_fused_attention_and_remat_match_the_einsum_path(attention, remat):
  """The training options change nothing but speed/memory: same logits and
  the same gradients as the default einsum path without rematerialisation."""
  import dataclasses  # noqa: PLC0415

  base = tiny()
  other = dataclasses.replace(base, attention=attention, remat=remat)
  params = init_params(base, jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 11), 0, base.vocab_size)

  def loss(p, cfg):
    return forward(p, cfg, tokens).logits.astype(jnp.float32).std()

  la, ga = jax.value_and_grad(loss)(params, base)
  lb, gb = jax.value_and_grad(loss)(params, other)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
  # Padding still goes through the masked einsum path under "fused".
  mask = jnp.ones((2, 11), bool).at[1, 7:].set(False)
  np.testing.assert_allclose(
      forward(params, other, tokens, token_mask=mask).logits[0],
      forward(params, base, tokens, token_mask=mask).logits[0], atol=1e-5)


def test_config_rejects_unknown_attention_and_remat():
  with pytest.raises(ValueError, match="attention='flash'"):
    tiny(attention="flash")
  with pytest.raises(ValueError, match="remat='some'"):
    tiny(remat="some")
