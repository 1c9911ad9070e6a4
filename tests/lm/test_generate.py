"""Generation: cache + left padding equal step-by-step full passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.decoding import contrast
from jaxlib_models.decoding.config import DecodingConfig
from jaxlib_models.lm import LlamaConfig, forward, init_params
from jaxlib_models.lm.generate import GenStream, generate, greedy

pytestmark = pytest.mark.usefixtures("fast_compile")

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def params():
  p = init_params(CFG, jax.random.key(0))
  return jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x, p)


_ORACLE_LEN = 32


@jax.jit
def _full_pass_logits(params, tokens_1T):
  return forward(params, CFG, tokens_1T).logits


def _last_logits(params, ids):
  """Logits after `ids` from one full causal pass without a cache: `ids`
  right-padded to a fixed length (one compilation), read at len(ids) - 1
  (causal attention: later tokens cannot reach it)."""
  assert len(ids) <= _ORACLE_LEN
  toks = jnp.array([list(ids) + [0] * (_ORACLE_LEN - len(ids))])
  return _full_pass_logits(params, toks)[:, len(ids) - 1]


def _greedy_oracle(params, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(jnp.argmax(_last_logits(params, ids)[0])))
  return ids[len(prompt):]


def test_greedy_batch_with_left_padding_equals_full_passes(params):
  prompts = [[5, 9, 11, 3, 7, 8], [12, 4], [1, 2, 3]]
  out = generate([GenStream(CFG, params, prompts)], max_new_tokens=6)
  for p, o in zip(prompts, out):
    assert o == _greedy_oracle(params, p, 6)


def test_eos_stops_a_row(params):
  p = [[5, 9, 11]]
  first = _greedy_oracle(params, p[0], 1)[0]
  out = generate([GenStream(CFG, params, p)], max_new_tokens=5,
                 eos_id=first)
  assert out == [[]]


def test_top_p_tiny_is_greedy_and_sampling_is_seeded(params):
  p = [[5, 9, 11], [7, 7]]
  greedy = generate([GenStream(CFG, params, p)], max_new_tokens=5)
  nucleus = generate([GenStream(CFG, params, p)], max_new_tokens=5,
                     temperature=1.0, top_p=1e-6, seed=3)
  assert nucleus == greedy
  a = generate([GenStream(CFG, params, p)], max_new_tokens=8,
               temperature=1.5, seed=1)
  b = generate([GenStream(CFG, params, p)], max_new_tokens=8,
               temperature=1.5, seed=1)
  c = generate([GenStream(CFG, params, p)], max_new_tokens=8,
               temperature=1.5, seed=2)
  assert a == b and a != c


def test_contrastive_generation_with_two_streams(params):
  """ICD as a logit processor: expert on P, amateur on A + P."""
  cfg = DecodingConfig(method="icd", relative_top=0.1)
  expert_p, amateur_p = [3, 4, 5], [60, 61, 3, 4, 5]

  def combine(outs):
    f = contrast.method_logits(cfg, {k: v[:, None] for k, v in
                                     outs[0].items()},
                               {k: v[:, None] for k, v in outs[1].items()},
                               CFG.num_hidden_layers, "gen")
    return f[:, 0]

  out = generate([GenStream(CFG, params, [expert_p]),
                  GenStream(CFG, params, [amateur_p])], max_new_tokens=4,
                 combine=combine)
  e, a = list(expert_p), list(amateur_p)
  want = []
  for _ in range(4):
    ze = _last_logits(params, e)[:, None]
    za = _last_logits(params, a)[:, None]
    f = contrast.method_logits(cfg, {3: ze}, {3: za}, 3, "gen")
    t = int(jnp.argmax(f[0, 0]))
    want.append(t)
    e.append(t)
    a.append(t)
  assert out == [want]


def test_too_long_prompt_and_bad_args_raise(params):
  with pytest.raises(ValueError, match="context"):
    generate([GenStream(CFG, params, [[1] * 120])], max_new_tokens=20)
  with pytest.raises(ValueError, match="top_p"):
    generate([GenStream(CFG, params, [[1]])], max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="out of range"):
    generate([GenStream(CFG, params, [[1]], exit_layers=(9,))],
             max_new_tokens=2)


def test_greedy_equals_argmax_with_ties_and_nan():
  """The max+compare argmax picks the first maximum like jnp.argmax.

  Planted bug: `jnp.max` of the indices (last maximum) fails the tie rows.
  """
  z = jax.random.normal(jax.random.key(0), (6, 50))
  z = z.at[1, 7].set(9.0).at[1, 30].set(9.0)  # tie: first wins
  z = z.at[2].set(0.0)  # all equal
  z = z.at[3, 11].set(jnp.nan).at[3, 40].set(jnp.nan)  # first NaN wins
  z = z.at[4, 49].set(jnp.inf)
  z = z.at[5].set(-jnp.inf)
  got = jax.jit(greedy)(z)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(z, -1))
