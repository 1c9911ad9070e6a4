"""The multi-dataset, multi-seed study behind the report (and `make demo`).

For each dataset and seed it fits the per-weight spike-and-slab BNN (the
method), the node-level spike-and-slab of Jantre et al. (arXiv 2108.11000)
and a dense Gaussian BNN; prunes by PIPs; prunes the dense BNN by magnitude
to the same number of kept nodes and features; and runs LassoCV for feature
selection on regression sets. Each fit lives in its own run folder with
checkpoints and an atomically written results.json, so a killed study
resumes where it stopped.
"""

import copy
import os
import time
import warnings

import ml_collections
import numpy as np
import tqdm

from jaxlib_models.core import io
from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import data as data_lib
from jaxlib_models.spike_slab import experiment
from jaxlib_models.spike_slab import prune as prune_lib

SWEEP_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99)


def _metric_name(ds) -> str:
  return "rmse" if ds.task == "regression" else "accuracy"


def _pruned_score(net, ds, log_sigma_y) -> dict:
  return experiment.score(
      experiment.pruned_predict(net, ds.x_test, ds, log_sigma_y), ds.y_test, ds
  )


def threshold_sweep(params, cfg, ds) -> list[dict]:
  """Nodes kept and test metric of the pruned mean net for several t."""
  out = []
  for t in SWEEP_THRESHOLDS:
    net = prune_lib.prune(params, cfg, t)
    out.append({
        "threshold": t,
        "nodes_kept": [int(len(k)) for k in net.kept_nodes],
        "features_kept": int(len(net.kept_features)),
        **_pruned_score(net, ds, params["log_sigma_y"]),
    })
  return out


def magnitude_prune(params, cfg, ds, node_counts, num_features) -> dict:
  """Dense-BNN mean network pruned by magnitude to the given sizes.

  Features: the `num_features` inputs with the largest first-layer row norm.
  Nodes: `prune.magnitude_keep` (incoming column norm x outgoing row norm).
  """
  weights = [tuple(map(np.asarray, wb)) for wb in core.mean_network(params, cfg)]
  row_norm = np.linalg.norm(weights[0][0], axis=1)
  feat_keep = np.zeros(cfg.widths[0], bool)
  feat_keep[np.argsort(-row_norm)[: max(1, num_features)]] = True
  node_keeps = prune_lib.magnitude_keep(weights, [max(1, c) for c in node_counts])
  net = prune_lib.prune_network(weights, feat_keep, node_keeps, cfg.activation)
  res = _pruned_score(net, ds, params["log_sigma_y"])
  res["nodes_kept"] = [int(len(k)) for k in net.kept_nodes]
  res["features_kept"] = int(len(net.kept_features))
  res.update(experiment.feature_metrics(net.kept_features, ds.true_features))
  return res


def lasso(ds, seed: int) -> dict:
  """LassoCV feature selection (regression only) on standardised inputs."""
  from sklearn.linear_model import LassoCV

  from sklearn.exceptions import ConvergenceWarning

  t = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    fit = LassoCV(cv=5, random_state=seed, alphas=30, max_iter=5000).fit(
        ds.x_train, ds.y_train
    )
  sel = np.flatnonzero(np.abs(fit.coef_) > 0)
  pred = fit.predict(ds.x_test)
  res = {
      "rmse": float(np.sqrt(np.mean((pred - ds.y_test) ** 2)) * ds.y_std),
      "features_kept": int(len(sel)),
      "seconds": time.perf_counter() - t,
  }
  res.update(experiment.feature_metrics(sel, ds.true_features))
  return res


def run_config(base: ml_collections.ConfigDict, name: str, spec, seed: int,
               variant: str) -> ml_collections.ConfigDict:
  """The single-fit config of (dataset, seed, variant)."""
  c = copy.deepcopy(base)
  with c.unlocked():
    c.data = ml_collections.ConfigDict(
        {"name": name, "seed": seed, "kwargs": dict(spec.get("kwargs", {}))}
    )
    for k, v in dict(spec.get("model", {})).items():
      c.model[k] = v
    for k, v in dict(spec.get("train", {})).items():
      c.train[k] = v
    c.model.kind = variant
    overrides = base.study.get("variant_overrides", {}).get(variant, {})
    for k, v in dict(overrides).items():
      c[k] = v
    c.train.seed = seed
    c.train.progress = False
    c.train.console = False
    for k in ("study", "datasets"):
      if k in c:
        del c[k]
  return c


def _fit_one(c, rundir, ds, ss_res) -> dict:
  t = time.perf_counter()
  params, cfg, ds = experiment.fit(c, rundir, ds)
  fit_s = time.perf_counter() - t
  res = experiment.evaluate(params, cfg, ds, threshold=c.prune.threshold)
  res["fit_seconds"] = fit_s
  if cfg.kind != "dense":
    res["sweep"] = threshold_sweep(params, cfg, ds)
    if c.prune.finetune_steps > 0 and not res["pruned_bnn"].get("empty_layer"):
      small, scfg, dsm = experiment.finetune(
          params, cfg, ds, c, os.path.join(rundir, "finetune"), c.prune.threshold
      )
      res["finetuned"] = experiment.evaluate(small, scfg, dsm)["full"]
  elif ss_res is not None:
    res["magnitude"] = magnitude_prune(
        params, cfg, ds, ss_res["nodes_kept"], ss_res["features_kept"]
    )
    res["magnitude_sweep"] = [
        {"threshold": s["threshold"],
         **magnitude_prune(params, cfg, ds, s["nodes_kept"], s["features_kept"])}
        for s in ss_res["sweep"]
    ]
  return res


def run_study(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) every fit; returns one record per fit."""
  records = []
  variants = list(config.study.variants)
  # The method runs first: the magnitude baseline matches its sizes.
  variants.sort(key=lambda v: {"spike_slab": 0, "node_spike_slab": 1}.get(v, 2))
  jobs = [(n, s) for n in config.datasets for s in config.study.seeds]
  bar = tqdm.tqdm(total=len(jobs) * len(variants), unit="fit", dynamic_ncols=True)
  for name, seed in jobs:
    spec = config.datasets[name]
    ds = data_lib.load(name, seed, **dict(spec.get("kwargs", {})))
    ss_res = None
    for variant in variants:
      bar.set_description(f"{name} seed {seed} {variant}")
      rundir = os.path.join(workdir, "runs", name, f"seed{seed}", variant)
      path = os.path.join(rundir, "results.json")
      if os.path.exists(path):
        res = io.read_json(path)
      else:
        c = run_config(config, name, spec, seed, variant)
        res = _fit_one(c, rundir, ds, ss_res)
        if variant == "dense" and ds.task == "regression" and config.study.lasso:
          res["lasso"] = lasso(ds, seed)
        io.write_json(path, res)
      if variant == "spike_slab":
        ss_res = res
      records.append({"dataset": name, "seed": seed, "variant": variant,
                      "task": ds.task, "num_features": ds.num_features,
                      "true_features": None if ds.true_features is None
                      else [int(i) for i in ds.true_features], **res})
      bar.update(1)
  bar.close()
  io.write_json(os.path.join(workdir, "records.json"), records)
  return records
