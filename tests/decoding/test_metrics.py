"""TruthfulQA MC and FACTOR metric goldens (brief §8.8, §7.3, §7.4)."""

import math

import numpy as np
import pytest

from jaxlib_models.decoding import metrics


@pytest.mark.parametrize("mode", ["reference", "logsumexp"])
def test_hand_golden(mode):
  """true [-1, -3], false [-2, -5], best first: MC1 1, MC3 0.5, MC2 ratio."""
  m = metrics.mc_scores([-1.0, -3.0], [-2.0, -5.0], 0, mode)
  e = math.exp
  assert m["mc1"] == 1.0
  assert m["mc3"] == 0.5
  want = (e(-1) + e(-3)) / (e(-1) + e(-3) + e(-2) + e(-5))
  assert m["mc2"] == pytest.approx(want, rel=1e-12)


def test_best_index_is_used():
  """Planted bug caught: MC1 from the first or the max true score."""
  m = metrics.mc_scores([-3.0, -1.0], [-2.0], 0)
  assert m["mc1"] == 0.0 and m["mc3"] == 0.5
  assert metrics.mc_scores([-3.0, -1.0], [-2.0], 1)["mc1"] == 1.0


def test_ties_lose():
  """Strict '>': true [0], false [0] => MC1 0, MC3 0, MC2 0.5."""
  m = metrics.mc_scores([0.0], [0.0], 0)
  assert m == {"mc1": 0.0, "mc2": 0.5, "mc3": 0.0}


def test_underflow_golden():
  """true [-2000], false [-1000, -3000] (brief §8.8).

  reference: true halved to -500 (exp(-1000) still underflows in float64),
  false halved once to [-500, -1500] => MC2 = 0.5. logsumexp: the exact
  ratio ~ e^-1000 = 0. Planted bug caught: halving both lists together gives
  ~0, and no halving gives NaN -> 0.
  """
  t, f = [-2000.0], [-1000.0, -3000.0]
  assert metrics.mc_scores(t, f, 0, "reference")["mc2"] == pytest.approx(
      0.5, abs=1e-12
  )
  assert metrics.mc_scores(t, f, 0, "logsumexp")["mc2"] < 1e-300


def test_overflow_nan_becomes_zero_in_reference_mode():
  """exp(1000) = inf => inf/inf = NaN => 0 (reference); 1 exactly otherwise."""
  assert metrics.mc_scores([1000.0], [0.0], 0, "reference")["mc2"] == 0.0
  lse = metrics.mc_scores([1000.0], [0.0], 0, "logsumexp")["mc2"]
  assert lse == pytest.approx(1.0)


def test_bad_inputs():
  with pytest.raises(IndexError):
    metrics.mc_scores([0.0], [0.0], 1)
  with pytest.raises(ValueError):
    metrics.mc_scores([0.0], [], 0)
  with pytest.raises(ValueError):
    metrics.mc_scores([0.0], [0.0], 0, "mean")


def test_aggregate_overall_and_per_category():
  rows = [
      {"mc1": 1.0, "mc2": 0.5, "mc3": 1.0},
      {"mc1": 0.0, "mc2": 0.25, "mc3": 0.0},
      {"mc1": 1.0, "mc2": 1.0, "mc3": 0.5},
  ]
  out = metrics.aggregate(rows, ["Law", "Health", "Law"])
  assert out["n"] == 3
  assert out["overall"] == pytest.approx(
      {"mc1": 200 / 3, "mc2": 175 / 3, "mc3": 50.0}
  )
  assert out["per_category"]["Law"] == pytest.approx(
      {"mc1": 100.0, "mc2": 75.0, "mc3": 75.0}
  )
  assert out["per_category"]["Health"] == pytest.approx(
      {"mc1": 0.0, "mc2": 25.0, "mc3": 0.0}
  )
  assert out["category_counts"] == {"Law": 2, "Health": 1}
  assert "per_category" not in metrics.aggregate(rows)


def test_factor_tie_rules():
  """official: argmin of mean NLL, ties win for index 0; dola: true >= all."""
  assert metrics.factor_correct([1.0, 2.0, 3.0, 4.0], "official")
  assert metrics.factor_correct([1.0, 1.0, 3.0, 4.0], "official")  # Tie wins.
  assert not metrics.factor_correct([2.0, 1.0, 3.0, 4.0], "official")
  assert metrics.factor_correct([-1.0, -2.0, -3.0, -4.0], "dola")
  assert metrics.factor_correct([-1.0, -1.0, -3.0, -4.0], "dola")  # Tie wins.
  assert not metrics.factor_correct([-2.0, -1.0, -3.0, -4.0], "dola")
  # Opposite orientations: official is lower-better, dola higher-better.
  assert not metrics.factor_correct([-1.0, -2.0, -3.0, -4.0], "official")
  batch = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 2.0, 3.0, 4.0]])
  np.testing.assert_array_equal(
      metrics.factor_correct(batch, "official"), [True, False]
  )
  with pytest.raises(ValueError):
    metrics.factor_correct([1.0, 2.0], "argmax")
