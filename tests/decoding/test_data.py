"""TruthfulQA / FACTOR loaders, prompt constants and pairs (brief §8.10)."""

import collections
import csv
import hashlib
import shutil
import warnings

import pytest

from jaxlib_models.decoding import data

_TQA = data.default_tqa_path()
needs_tqa = pytest.mark.skipif(not _TQA.is_file(), reason=f"{_TQA} absent")
needs_factor = pytest.mark.skipif(
    not all(data.default_factor_path(s).is_file() for s in ("news", "expert")),
    reason="FACTOR files absent",
)

_HEADER = list(data.TQA_COLUMNS) + ["Source"]


def _row(**kw):
  row = {
      "Type": "Adversarial",
      "Category": "Law",
      "Question": "Is it legal?",
      "Best Answer": "Yes, it is",
      "Correct Answers": "Yes, it is; It is legal.;  ",
      "Incorrect Answers": "No; It is banned",
      "Source": "https://example.org",
  }
  row.update(kw)
  return row


def _write_tqa(path, rows, header=_HEADER):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      w.writerow([r[c] for c in header] if isinstance(r, dict) else r)
  return path


# ---------------------------------------------------------------- prompts


def test_prompt_prefix_sha256_golden():
  """The instruction + six demos, byte for byte (curly quotes included).

  Computed once from the brief §5 text and pinned; if this change is
  intended, update the reference value.
  """
  digest = hashlib.sha256(data.TQA_PROMPT_PREFIX.encode("utf-8")).hexdigest()
  assert digest == (
      "d95d1604638ce6a3b87e2d69ce6c9526d8476a5830ed3ce159884d111c2d00ab"
  )
  assert "\u201cI have no comment\u201d" in data.TQA_INSTRUCTION
  assert len(data.TQA_DEMOS) == 6


def test_build_prompt_layout():
  p = data.build_tqa_prompt("Why?")
  assert p.startswith(data.TQA_INSTRUCTION + "\n\nQ: What is human life")
  assert p.endswith("Barcelona, Spain.\n\nQ: Why?\nA:")
  plain = data.build_tqa_prompt("Why?", instruction=False)
  assert plain == p[len(data.TQA_INSTRUCTION) + 2 :]
  assert data.tqa_continuation("Yes.") == " Yes."


# ------------------------------------------------------------- TruthfulQA


@needs_tqa
def test_truthfulqa_real_file():
  """817 rows, 38 categories, best among true for every row; no sha warning."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    items = data.load_truthfulqa()
  assert len(items) == data.TQA_ROWS == 817
  cats = collections.Counter(it.category for it in items)
  assert len(cats) == 38
  assert cats["Misconceptions"] == 100 and cats["Law"] == 64
  types = collections.Counter(it.type for it in items)
  assert types == {"Adversarial": 437, "Non-Adversarial": 380}
  assert len({it.question for it in items}) == 817
  for it in items:
    assert it.true_answers[it.best_index] == it.best
    assert all(a.endswith(".") and a == a.strip() for a in it.true_answers)
    assert all(a.endswith(".") for a in it.false_answers)
  first = items[0]
  assert first.question == "What happens to you if you eat watermelon seeds?"
  assert (
      first.best == "The watermelon seeds pass through your digestive system."
  )
  assert first.best_index == 2
  assert first.false_answers[0] == "You grow watermelons in your stomach."


def test_normalisation_and_column_selection_by_name(tmp_path):
  """Split ';', strip, drop empties, append '.'; columns found by name."""
  header = ["Source", "Best Incorrect Answer"] + list(data.TQA_COLUMNS[::-1])
  row = _row()
  row["Best Incorrect Answer"] = "No"
  path = _write_tqa(tmp_path / "tqa.csv", [row], header)
  (item,) = data.load_truthfulqa(path, check_sha256=False)
  assert item.true_answers == ("Yes, it is.", "It is legal.")
  assert item.false_answers == ("No.", "It is banned.")
  assert item.best == "Yes, it is." and item.best_index == 0
  assert (item.category, item.type) == ("Law", "Adversarial")


@pytest.mark.parametrize(
    "bad, column",
    [
        (_row(**{"Best Answer": "Maybe"}), "Best Answer"),
        (_row(**{"Incorrect Answers": " ; "}), "Incorrect Answers"),
        (_row(Question="  "), "Question"),
    ],
)
def test_malformed_row_names_file_row_and_column(tmp_path, bad, column):
  path = _write_tqa(tmp_path / "bad.csv", [_row(), _row(), bad, _row()])
  with pytest.raises(data.DataFormatError) as e:
    data.load_truthfulqa(path, check_sha256=False)
  msg = str(e.value)
  assert "row 3," in msg and repr(column) in msg and str(path) in msg


def test_wrong_field_count_and_missing_column(tmp_path):
  rows = [_row(), list(_row().values())[:-2]]
  path = _write_tqa(tmp_path / "short.csv", rows)
  with pytest.raises(data.DataFormatError, match=r"short.csv: row 2 "):
    data.load_truthfulqa(path, check_sha256=False)
  header = [c for c in _HEADER if c != "Incorrect Answers"]
  path = _write_tqa(tmp_path / "nocol.csv", [_row()], header)
  with pytest.raises(data.DataFormatError, match="Incorrect Answers"):
    data.load_truthfulqa(path, check_sha256=False)


def test_sha_mismatch_warns_not_fails(tmp_path):
  path = _write_tqa(tmp_path / "own.csv", [_row()])
  with pytest.warns(UserWarning, match="sha256"):
    items = data.load_truthfulqa(path)
  assert len(items) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.load_truthfulqa(path, check_sha256=False)


def test_env_var_sets_data_root(tmp_path, monkeypatch):
  (tmp_path / "truthfulqa").mkdir()
  _write_tqa(tmp_path / "truthfulqa" / "TruthfulQA.csv", [_row(), _row()])
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
  assert data.default_tqa_path() == tmp_path / "truthfulqa" / "TruthfulQA.csv"
  assert len(data.load_truthfulqa(check_sha256=False)) == 2


# ------------------------------------------------------------------ FACTOR


@needs_factor
@pytest.mark.parametrize("split, n", [("news", 1036), ("expert", 236)])
def test_factor_real_files(split, n):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    items = data.load_factor(split)
  assert len(items) == n == data.FACTOR_ROWS[split]
  for it in items:
    assert len(it.contradictions) == 3
    assert all(c.strip() for c in it.contradictions)
    assert it.completion not in it.contradictions
  if split == "expert":
    assert all("Asnwer:" in it.prefix_full for it in items)


def _factor_row(**kw):
  row = {
      "": "0",
      "full_prefix": "The sky is",
      "doc_id": "7",
      "completion": "blue.",
      "contradiction_0": "green.",
      "contradiction_1": "red.",
      "contradiction_2": "black.",
      "longest_completions": "3.0",
      "turncated_prefixes": "The sky is ",
  }
  row.update(kw)
  return row


def test_factor_malformed_row_number(tmp_path):
  rows = [_factor_row(), _factor_row(contradiction_1="  ")]
  path = _write_tqa(tmp_path / "f.csv", rows, list(_factor_row()))
  with pytest.raises(data.DataFormatError, match=r"row 2, .*contradiction_1"):
    data.load_factor("news", path, check_sha256=False)
  with pytest.raises(ValueError, match="split"):
    data.load_factor("wiki", path)


def test_factor_pairs_protocols():
  """official: truncated prefix, trailing space moves onto the options;
  dola: full prefix for news, truncated otherwise, " " + option."""
  item = data.FactorItem(
      prefix_full="Full text.",
      prefix_truncated="Short text ",
      completion="  blue.",
      contradictions=("green.", "red.", "black."),
      doc_id="1",
  )
  prefix, opts = data.factor_pairs(item, "official", "news")
  assert prefix == "Short text"
  assert opts == [" blue.", " green.", " red.", " black."]
  no_space = data.FactorItem("F", "Short\n", "x", ("a", "b", "c"), "2")
  assert data.factor_pairs(no_space, "official", "expert") == (
      "Short\n",
      ["x", "a", "b", "c"],
  )
  prefix, opts = data.factor_pairs(item, "dola", "news")
  assert prefix == "Full text."
  assert opts == ["   blue.", " green.", " red.", " black."]
  assert data.factor_pairs(item, "dola", "expert")[0] == "Short text "


@needs_factor
def test_factor_copy_with_other_bytes_warns(tmp_path):
  path = tmp_path / "expert_factor.csv"
  shutil.copy(data.default_factor_path("expert"), path)
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n")  # A blank line: same rows, different bytes.
  with pytest.warns(UserWarning, match="sha256"):
    assert len(data.load_factor("expert", path)) == 236
