"""TruthfulQA-MC and FACTOR metrics on host arrays (numpy float64).

TruthfulQA MC1/MC2/MC3 follow the DoLa/ICD/PLI scoring scripts' behaviour
(brief §5, §7.3, §7.4); FACTOR follows AI21Labs/factor `eval_factuality.py`
("official") or DoLa's `factor_eval.py` ("dola").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import special


def _halve_until_nonzero(scores: np.ndarray) -> np.ndarray:
  """exp(scores), halving the scores until the sum is non-zero (reference).

  exp may overflow to inf on purpose: the reference then yields NaN -> 0.
  """
  with np.errstate(over="ignore"):
    probs = np.exp(scores)
    while probs.sum() == 0:
      scores = scores / 2.0
      probs = np.exp(scores)
  return probs


def mc_scores(
    true_scores: Sequence[float],
    false_scores: Sequence[float],
    best_index: int,
    mc2_mode: Literal["reference", "logsumexp"] = "reference",
) -> dict[str, float]:
  """MC1, MC2, MC3 of one TruthfulQA question, each in [0, 1].

  MC1 = 1[s(best) > max s(false)]; MC3 = share of true answers with
  s > max s(false) (strict: ties lose); MC2 = sum_true e^s / sum_all e^s.
  "reference" reproduces the DoLa/ICD scripts: when every e^s of the true
  list underflows, the true scores are halved until the sum is non-zero, and
  independently the same for the false list; a NaN MC2 becomes 0. This
  changes the ratio (brief §7.3). "logsumexp" computes the exact ratio.

  Args:
    true_scores: Scores of the true answers.
    false_scores: Scores of the false answers.
    best_index: Index of the best answer within true_scores.
    mc2_mode: "reference" or "logsumexp".

  Returns:
    {"mc1": ., "mc2": ., "mc3": .}.
  """
  t = np.asarray(true_scores, np.float64).reshape(-1)
  f = np.asarray(false_scores, np.float64).reshape(-1)
  if t.size == 0 or f.size == 0:
    raise ValueError("need at least one true and one false score")
  if not 0 <= best_index < t.size:
    raise IndexError(f"{best_index=} outside {t.size} true answers")
  max_false = f.max()
  mc1 = float(t[best_index] > max_false)
  mc3 = float(np.mean(t > max_false))
  if mc2_mode == "reference":
    p_true = _halve_until_nonzero(t)
    p_false = _halve_until_nonzero(f)
    with np.errstate(invalid="ignore", over="ignore"):
      mc2 = float(np.sum(p_true / (p_true.sum() + p_false.sum())))
  elif mc2_mode == "logsumexp":
    log_all = special.logsumexp(np.concatenate([t, f]))
    mc2 = float(np.exp(special.logsumexp(t) - log_all))
  else:
    raise ValueError(f"{mc2_mode=} must be 'reference' or 'logsumexp'")
  if math.isnan(mc2):
    mc2 = 0.0
  return {"mc1": mc1, "mc2": mc2, "mc3": mc3}


def aggregate(
    per_question: Sequence[Mapping[str, float]],
    categories: Sequence[str] | None = None,
) -> dict:
  """Means x100 over questions, overall and per category.

  Args:
    per_question: One dict of metrics in [0, 1] per question (all with the
      same keys), e.g. from `mc_scores`.
    categories: Category of each question, or None.

  Returns:
    {"overall": {metric: mean x100}, "n": count, and when categories are
    given "per_category": {category: {metric: mean x100}} and
    "category_counts": {category: count}}.
  """
  if not per_question:
    raise ValueError("no questions to aggregate")
  keys = list(per_question[0])
  for i, d in enumerate(per_question):
    if list(d) != keys:
      raise ValueError(f"question {i} has keys {list(d)}, expected {keys}")

  def means(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    return {
        k: 100.0 * float(np.mean([r[k] for r in rows], dtype=np.float64))
        for k in keys
    }

  out = {"overall": means(per_question), "n": len(per_question)}
  if categories is not None:
    if len(categories) != len(per_question):
      raise ValueError(f"{len(categories)=} != {len(per_question)=}")
    groups: dict[str, list[Mapping[str, float]]] = {}
    for c, d in zip(categories, per_question):
      groups.setdefault(c, []).append(d)
    out["per_category"] = {c: means(rows) for c, rows in groups.items()}
    out["category_counts"] = {c: len(rows) for c, rows in groups.items()}
  return out


def factor_correct(
    scores: Sequence[float] | np.ndarray,
    protocol: Literal["official", "dola"],
) -> bool | np.ndarray:
  """Whether the true completion (index 0) wins among its options.

  "official" (AI21Labs/factor): scores are mean NLLs; correct iff argmin is
  0, so ties count as correct (argmin picks the first). "dola" (DoLa
  `factor_eval.py`): scores are summed log-probs; correct iff
  s_true >= every contradiction (ties win).

  Args:
    scores: (..., 4) [true, contradiction_0, contradiction_1,
      contradiction_2] (any number >= 2 of options).
    protocol: "official" or "dola".

  Returns:
    bool, or a bool array of the leading shape.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim == 0 or s.shape[-1] < 2:
    raise ValueError(f"need >= 2 options on the last axis, got {s.shape}")
  if protocol == "official":
    out = np.argmin(s, axis=-1) == 0
  elif protocol == "dola":
    out = np.all(s[..., :1] >= s[..., 1:], axis=-1)
  else:
    raise ValueError(f"{protocol=} must be 'official' or 'dola'")
  return bool(out) if out.ndim == 0 else out
