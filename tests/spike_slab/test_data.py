"""Tests of spike_slab.data: generators (brief §8.10), loaders, validation."""

import itertools

import numpy as np
import pytest

from jaxlib_models.spike_slab import data

N = 10_000  # Sample size of brief §8.10.


def _f_variable(x):
  """Independent re-statement of the variable-selection mean (1-based)."""
  x1, x2, x3, x4, x5 = (x[:, i].astype(np.float64) for i in range(5))
  return 5 * x2 / (1 + x1**2) + 5 * np.sin(x3 * x4) + 2 * x5


def _f_structure(x):
  """Independent re-statement of the structure-selection mean (1-based)."""
  x1, x2, x3, x4, x5 = (x[:, i].astype(np.float64) for i in range(5))
  return np.tanh(2 * np.tanh(2 * x1 - x2)) + 2 * np.tanh(
      2 * np.tanh(x3 - 2 * x4 - 2 * x5)
  )


def _check_inputs(x, variance, var_tol):
  corr = np.corrcoef(x[:, :10].T)
  # A pairwise correlation has s.e. (1 - 0.25)/sqrt(n) ~ 0.0075 (fixed seed);
  # all pairs share e_i, so check one pair and the average of 45 pairs.
  assert abs(corr[0, 1] - 0.5) < 0.02
  assert abs(corr[np.triu_indices(10, 1)].mean() - 0.5) < 0.02
  np.testing.assert_allclose(x[:, :10].var(axis=0), variance, atol=var_tol)


def _check_residual(x, y, f):
  resid = y.astype(np.float64) - f(x)
  assert abs(resid.var() - 1.0) < 0.05
  # Under the truth each correlation is ~N(0, 1/n): 4 sigma = 0.04.
  xn = x[:, 5:] - x[:, 5:].mean(0)
  rn = resid - resid.mean()
  corr = (xn * rn[:, None]).mean(0) / (xn.std(0) * rn.std())
  assert np.abs(corr).max() < 4 / np.sqrt(len(x))


def test_variable_selection_matches_brief():
  """Brief §8.10. Catches: 0-based use of the 1-based formula (pitfall 4),
  variance 1/2 instead of 1, missing noise, wrong correlation construction."""
  ds = data.variable_selection(1, p=50, n_train=N, n_val=10, n_test=10)
  _check_inputs(ds.x_train, 1.0, 0.03)
  _check_residual(ds.x_train, ds.y_train, _f_variable)
  np.testing.assert_array_equal(ds.true_features, np.arange(5))
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
  assert ds.x_val.shape == (10, 50) and ds.x_test.shape == (10, 50)


def test_structure_selection_matches_brief():
  """Brief §8.10 with input variance 0.5 in every split by default."""
  ds = data.structure_selection(2, p=50, n_train=N, n_val=N, n_test=10)
  _check_inputs(ds.x_train, 0.5, 0.02)
  _check_residual(ds.x_train, ds.y_train, _f_structure)
  _check_inputs(ds.x_val, 0.5, 0.02)
  _check_residual(ds.x_val, ds.y_val, _f_structure)


def test_structure_selection_reference_quirk_changes_eval_variance():
  """Pitfall 3: the quirk only resets val/test input variance to 1."""
  kw = dict(p=20, n_train=N, n_val=10, n_test=N)
  plain = data.structure_selection(3, **kw)
  quirk = data.structure_selection(3, reference_quirk=True, **kw)
  np.testing.assert_array_equal(plain.x_train, quirk.x_train)
  np.testing.assert_allclose(plain.x_test.var(0), 0.5, atol=0.02)
  np.testing.assert_allclose(quirk.x_test.var(0), 1.0, atol=0.03)
  _check_residual(quirk.x_test, quirk.y_test, _f_structure)


def test_generators_are_seeded():
  a = data.variable_selection(5, p=8, n_train=30, n_val=3, n_test=3)
  b = data.variable_selection(5, p=8, n_train=30, n_val=3, n_test=3)
  c = data.variable_selection(6, p=8, n_train=30, n_val=3, n_test=3)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.x_train, c.x_train)


def test_classification_sim_labels_depend_on_true_features():
  """Labels are balanced and driven by f(x), not by nuisance inputs."""
  ds = data.classification_sim(0, p=20, n_train=4000, n_val=0, n_test=2000)
  assert ds.num_classes == 2 and ds.y_train.dtype == np.int32
  assert abs(ds.y_train.mean() - 0.5) < 0.01
  f = _f_variable(ds.x_test)
  # Logistic noise (s.d. 1.8) against f (s.d. ~4.5): strongly predictive.
  acc = np.mean((f > np.median(_f_variable(ds.x_train))) == ds.y_test)
  assert acc > 0.8
  corr = [abs(np.corrcoef(ds.x_test[:, j], ds.y_test)[0, 1]) for j in (8, 9)]
  assert max(corr) < 4 / np.sqrt(2000) + 0.25  # Equicorrelation leaks a bit.


def test_friedman1():
  ds = data.friedman1(0, p=12, n=500)
  assert ds.x_train.shape == (400, 12) and ds.x_test.shape == (100, 12)
  np.testing.assert_array_equal(ds.true_features, np.arange(5))
  np.testing.assert_allclose(ds.y_train.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.y_train.std(), 1.0, atol=1e-5)
  assert ds.y_std > 1.0  # Friedman #1 targets range over ~[0, 30].


@pytest.mark.parametrize(
    "name, n, p, classes",
    [
        ("breast_cancer", 569, 30, 2),
        ("digits", 1797, 64, 10),
        ("diabetes", 442, 10, 0),
        ("wine", 178, 13, 3),
        ("iris", 150, 4, 3),
        ("mnist5k", 5000, 784, 10),
    ],
)
def test_real_loaders(name, n, p, classes):
  """Shapes, train-statistics standardisation, stratification, dtypes."""
  ds = data.load(name, 3)
  n_test = len(ds.x_test)
  assert len(ds.x_train) + n_test == n
  assert n_test == int(np.ceil(0.2 * n))
  assert ds.x_train.shape[1] == ds.x_test.shape[1] == p
  assert ds.x_val.shape == (0, p)
  assert ds.num_classes == classes
  assert ds.true_features is None
  if name == "mnist5k":
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  else:
    std = ds.x_train.std(0)
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-4)
    # digits has constant pixels: std 0 stays 0 (guarded divisor 1).
    np.testing.assert_allclose(std[std > 0.5], 1.0, atol=1e-4)
    assert np.all((std > 0.999) | (std < 1e-6))
    # Test statistics differ from train ones: train-only statistics used.
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3
  if classes:
    assert ds.y_train.dtype == np.int32
    tr = np.bincount(ds.y_train, minlength=classes) / len(ds.y_train)
    te = np.bincount(ds.y_test, minlength=classes) / n_test
    # Stratified: class shares agree to within one example of the test set.
    np.testing.assert_allclose(tr, te, atol=1.0 / n_test + 1e-9)
  else:
    assert ds.y_train.dtype == np.float32
    np.testing.assert_allclose(ds.y_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.y_train.std(), 1.0, atol=1e-5)
    # Back in original units: diabetes targets lie in [25, 346].
    orig = ds.y_test * ds.y_std + ds.y_mean
    assert 25 <= orig.min() and orig.max() <= 346


def test_split_depends_on_seed():
  a, b = data.load("iris", 0), data.load("iris", 1)
  assert not np.array_equal(a.x_test, b.x_test)
  np.testing.assert_array_equal(a.x_test, data.load("iris", 0).x_test)


def test_load_unknown_name_suggests():
  with pytest.raises(ValueError, match="Did you mean 'breast_cancer'"):
    data.load("brest_cancer", 0)
  with pytest.raises(ValueError, match="valid names:.*mnist5k"):
    data.load("cifar10", 0)


class TestValidate:

  def test_nan_rows_counted(self):
    x = np.ones((6, 3), np.float32)
    x[2, 1] = np.nan
    x[4, 0] = np.inf
    with pytest.raises(
        ValueError, match=r"train: x has 2 row\(s\) with NaN or Inf "
        r"\(first at row 2\); drop or impute"
    ):
      data.validate(x, np.zeros(6), task="regression", name="train")

  def test_nan_in_y(self):
    y = np.zeros(4)
    y[3] = np.nan
    with pytest.raises(ValueError, match=r"y has 1 row.*first at row 3"):
      data.validate(np.ones((4, 2)), y, task="regression")

  def test_x_not_2d(self):
    with pytest.raises(
        ValueError, match=r"x must be 2-D.*\(4, 8, 8\).*reshape"
    ):
      data.validate(np.ones((4, 8, 8)), np.zeros(4), task="regression")

  def test_y_one_hot(self):
    with pytest.raises(ValueError, match=r"y must be 1-D.*\(4, 3\)"):
      data.validate(np.ones((4, 2)), np.eye(4, 3), task="classification")

  def test_length_mismatch(self):
    with pytest.raises(ValueError, match="x has 5 rows but y has 4"):
      data.validate(np.ones((5, 2)), np.zeros(4), task="regression")

  def test_feature_count(self):
    with pytest.raises(ValueError, match=r"x has 3 features.*7 are expected"):
      data.validate(
          np.ones((5, 3)), np.zeros(5), task="regression", num_features=7
      )

  def test_labels_out_of_range(self):
    y = np.array([0, 1, 3, 2, -1])
    with pytest.raises(
        ValueError, match=r"2 label\(s\) outside \[0, 3\) \(first at row 2: "
    ):
      data.validate(np.ones((5, 2)), y, task="classification", num_classes=3)

  def test_labels_not_integer(self):
    y = np.array([0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=r"must be integers.*first at row 2"):
      data.validate(np.ones((3, 2)), y, task="classification")

  def test_valid_passes(self):
    data.validate(
        np.ones((3, 2)), np.array([0, 1, 1]), task="classification",
        num_features=2, num_classes=2,
    )


class TestBatches:

  def _data(self, n=23):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return x, np.arange(n, dtype=np.float32)

  def test_epochs_are_permutations_and_drop_remainder(self):
    x, y = self._data()
    it = data.batches(x, y, 5, seed=0)
    epoch = [next(it) for _ in range(4)]  # 23 // 5 = 4 batches per epoch.
    seen = np.concatenate([b["y"] for b in epoch])
    assert len(set(seen.tolist())) == 20
    for b in epoch:
      assert b["x"].shape == (5, 2)
      np.testing.assert_array_equal(b["x"][:, 0], 2 * b["y"])
    nxt = np.concatenate([next(it)["y"] for _ in range(4)])
    assert not np.array_equal(seen, nxt)  # A fresh permutation per epoch.

  @pytest.mark.parametrize("k", [0, 3, 4, 9, 41])
  def test_resume_equals_fresh(self, k):
    """Catches: resuming from epoch 0, or an rng not keyed by the epoch."""
    x, y = self._data()
    fresh = data.batches(x, y, 5, seed=7)
    ref = list(itertools.islice(fresh, k, k + 6))
    got = list(itertools.islice(data.batches(x, y, 5, 7, start_step=k), 6))
    for a, b in zip(ref, got, strict=True):
      np.testing.assert_array_equal(a["x"], b["x"])
      np.testing.assert_array_equal(a["y"], b["y"])

  def test_bad_batch_size(self):
    x, y = self._data(4)
    with pytest.raises(ValueError, match="batch_size"):
      next(data.batches(x, y, 5, 0))
