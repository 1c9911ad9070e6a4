"""BD-rate (brief learned_image_compression.md §4, §8.10).

Oracles: the published-curve BD numbers of brief §4 (derived once and
cross-checked against PyPI bjontegaard 1.3.0), closed forms on curves whose
ln R is linear in PSNR, and a live comparison with bjontegaard where it is
installed.
"""

import math
import warnings

import numpy as np
import pytest

from jaxlib_models.compression import bdrate

# Brief §4 table, vs the CompressAI vtm.json points, rounded to 0.01 pp.
PCHIP = {
    "bmshj2018-hyperprior": 30.48, "mbt2018-mean": 21.26, "mbt2018": 11.00,
    "cheng2020-anchor": 3.68, "cheng2020-attn": 5.45, "he2021-ckbd": 4.02,
    "minnen2020-charm": 1.14, "elic": -7.08, "tcm-large": -11.79,
    "mlic++": -14.99, "s2lic-figure": -10.51,
}
CUBIC = {
    "bmshj2018-hyperprior": 30.11, "mbt2018-mean": 21.02, "mbt2018": 10.62,
    "cheng2020-anchor": 3.81, "cheng2020-attn": 5.60, "he2021-ckbd": 4.27,
    "minnen2020-charm": 1.10, "elic": -7.17, "tcm-large": -12.12,
    "mlic++": -15.09, "s2lic-figure": -10.61,
}
TOL = 0.01  # the goldens carry two decimals


@pytest.mark.parametrize("name", sorted(PCHIP))
def test_pchip_goldens_vs_vtm(name):
  assert bdrate.bd_vs_vtm(name).value == pytest.approx(PCHIP[name], abs=TOL)


@pytest.mark.parametrize("name", sorted(CUBIC))
def test_cubic_goldens_vs_vtm(name):
  res = bdrate.bd_vs_vtm(name, method="cubic")
  assert res.value == pytest.approx(CUBIC[name], abs=TOL)


def test_s2lic_vs_tcm_large():
  s2, tcm = bdrate.KODAK_CURVES["s2lic-figure"], bdrate.KODAK_CURVES[
      "tcm-large"]
  assert bdrate.bd_rate(*tcm, *s2).value == pytest.approx(2.65, abs=TOL)
  assert bdrate.bd_rate(*tcm, *s2, method="cubic").value == pytest.approx(
      2.67, abs=TOL)


def test_overlap_interval():
  res = bdrate.bd_vs_vtm("bmshj2018-hyperprior")
  assert (res.lo, res.hi) == (27.58, 40.56)
  assert res.overlap == pytest.approx((40.56 - 27.58) / (46.59 - 26.14))


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_identical_curves_give_zero(method):
  r, p = bdrate.KODAK_CURVES["mbt2018"]
  assert bdrate.bd_rate(r, p, r, p, method=method).value == pytest.approx(
      0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_rates_times_0_9_give_minus_10(method):
  r, p = bdrate.KODAK_CURVES["cheng2020-anchor"]
  res = bdrate.bd_rate(r, p, [0.9 * v for v in r], p, method=method)
  assert res.value == pytest.approx(-10.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_closed_form_linear_log_rate(method):
  """ln R linear in PSNR: both interpolants are exact, so the BD-rate is
  exp(mean over [lo, hi] of the log-rate gap) - 1. Planted bugs caught:
  log10 without 10**, integrating over the union instead of the overlap."""
  pa = np.array([28.0, 30.0, 33.0, 36.0, 39.0])
  pt = np.array([30.0, 32.5, 35.0, 38.0, 41.0])
  ra = np.exp(-5.0 + 0.20 * pa)
  rt = np.exp(-4.0 + 0.16 * pt)
  lo, hi = 30.0, 39.0
  gap = (-4.0 + 5.0) + (0.16 - 0.20) * (lo + hi) / 2
  res = bdrate.bd_rate(ra, pa, rt, pt, method=method)
  assert res.value == pytest.approx(100 * math.expm1(gap), abs=1e-9)
  assert (res.lo, res.hi) == (lo, hi)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_point_order_does_not_matter(method):
  r, p = map(np.asarray, bdrate.KODAK_CURVES["elic"])
  perm = np.random.default_rng(0).permutation(len(r))
  a = bdrate.bd_rate(*bdrate.VTM, r, p, method=method).value
  b = bdrate.bd_rate(*bdrate.VTM, r[perm], p[perm], method=method).value
  assert a == pytest.approx(b, abs=1e-12)


class TestErrors:

  def test_too_few_points(self):
    with pytest.raises(ValueError, match="at least 2"):
      bdrate.bd_rate([1.0], [30.0], [1.0, 2.0], [30.0, 33.0])
    r, p = (0.1, 0.2, 0.4), (28.0, 31.0, 34.0)
    bdrate.bd_rate(r, p, r, p)  # pchip is fine with 3
    with pytest.raises(ValueError, match="at least 4"):
      bdrate.bd_rate(r, p, r, p, method="cubic")

  def test_no_overlap(self):
    with pytest.raises(ValueError, match="do not overlap"):
      bdrate.bd_rate([0.1, 0.2], [28.0, 30.0], [0.5, 0.8], [31.0, 33.0])
    with pytest.raises(ValueError, match="do not overlap"):  # touching only
      bdrate.bd_rate([0.1, 0.2], [28.0, 30.0], [0.5, 0.8], [30.0, 33.0])

  def test_non_positive_rates(self):
    with pytest.raises(ValueError, match="positive"):
      bdrate.bd_rate([0.0, 0.2], [28.0, 30.0], [0.1, 0.2], [28.0, 30.0])

  def test_repeated_quality_and_bad_method(self):
    with pytest.raises(ValueError, match="distinct"):
      bdrate.bd_rate([0.1, 0.2], [28.0, 28.0], [0.1, 0.2], [28.0, 30.0])
    with pytest.raises(ValueError, match="unknown BD method"):
      bdrate.bd_rate([0.1, 0.2], [28.0, 30.0], [0.1, 0.2], [28.0, 30.0],
                     method="akima")

  def test_infinite_psnr(self):
    with pytest.raises(ValueError, match="finite"):
      bdrate.bd_rate([0.1, 0.2], [28.0, math.inf], [0.1, 0.2], [28.0, 30.0])


@pytest.mark.oracle
@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_matches_bjontegaard_package(method):
  bjontegaard = pytest.importorskip("bjontegaard")
  for name, curve in bdrate.KODAK_CURVES.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the package warns on < 75 % overlap
      ref = bjontegaard.bd_rate(*bdrate.VTM, *curve, method=method,
                                require_matching_points=False,
                                min_overlap=0)
    assert bdrate.bd_vs_vtm(name, method).value == pytest.approx(
        ref, abs=1e-6), name
