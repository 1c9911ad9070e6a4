"""One fit of a spike-and-slab BNN on one dataset: train, score, prune.

Training goes through the library's generic sharded trainer
(`jaxlib_models.core.trainer`); this module only supplies the task (params,
loss, logical axes, batches) and the evaluation of a fitted posterior.
"""

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlib_models.core import trainer
from jaxlib_models.spike_slab import core
from jaxlib_models.spike_slab import data as data_lib
from jaxlib_models.spike_slab import pips as pips_lib
from jaxlib_models.spike_slab import prune as prune_lib
from jaxlib_models.spike_slab.config import SpikeSlabConfig


def model_config(model: dict, ds: data_lib.Dataset) -> SpikeSlabConfig:
  """SpikeSlabConfig from a config's `model` block and the data's shape."""
  m = dict(model)
  hidden = tuple(m.pop("hidden"))
  out = 1 if ds.task == "regression" else ds.num_classes
  widths = (ds.num_features, *hidden, out)
  names = {f.name for f in dataclasses.fields(SpikeSlabConfig)}
  unknown = set(m) - names
  if unknown:
    raise ValueError(f"unknown model settings {sorted(unknown)}; valid: {sorted(names)}")
  return SpikeSlabConfig(widths=widths, likelihood=ds.task, **m)


def param_axes(cfg: SpikeSlabConfig) -> dict:
  """Logical axis names of every parameter (the rules table maps them)."""
  axes: dict[str, Any] = {}
  for l in range(cfg.num_layers):
    layer = {"mu": ("in", "out"), "rho": ("in", "out"), "m": ("out",),
             "rho_b": ("out",)}
    if cfg.kind == "spike_slab":
      layer["theta"] = ("in", "out")
    elif cfg.kind == "node_spike_slab":
      layer["theta"] = (None, "out")
    axes[core.layer_name(l)] = layer
  axes["log_sigma_y"] = ()
  return axes


def make_task(
    cfg: SpikeSlabConfig,
    ds: data_lib.Dataset,
    tc: trainer.TrainConfig,
    *,
    loss_impl: str = "core",
    data_seed: int = 0,
    theta_lr_mult: float = 1.0,
) -> trainer.Task:
  """The trainer's view of a spike-and-slab fit.

  Args:
    loss_impl: "core" (plain-JAX closed-form ELBO, the fast path) or
      "numpyro" (the NumPyro model and custom guide, TraceMeanField_ELBO).
  """
  if loss_impl == "core":
    base = core.loss_fn
  elif loss_impl == "numpyro":
    from jaxlib_models.spike_slab import model as numpyro_model

    base = numpyro_model.numpyro_loss_fn
  else:
    raise ValueError(f"{loss_impl=}: choose 'core' or 'numpyro'")
  classes = cfg.widths[-1] if ds.task == "classification" else None
  for split in ("train", "test"):
    data_lib.validate(
        getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}"), task=ds.task,
        num_features=cfg.widths[0], num_classes=classes,
        name=f"{ds.name}/{split}",
    )
  if tc.batch_size > ds.num_train:
    raise ValueError(
        f"batch_size {tc.batch_size} exceeds the {ds.num_train} training rows"
        f" of {ds.name}; lower --config.train.batch_size"
    )

  def loss_fn(params, batch, rng, step):
    return base(params, batch, rng, cfg=cfg, num_data=ds.num_train,
                step=step, total_steps=tc.num_steps)

  init_params = functools.partial(core.init, cfg=cfg)
  lr_scales = None
  if theta_lr_mult != 1.0:
    # Inclusion logits travel ~10 units (prior log-odds) while weights move
    # by O(0.1): a larger step for theta reaches the sparse optimum sooner.
    shapes = jax.eval_shape(init_params, jax.random.key(0))
    lr_scales = {
        k: ({n: (theta_lr_mult if n == "theta" else 1.0) for n in v}
            if isinstance(v, dict) else 1.0)
        for k, v in shapes.items()
    }
  return trainer.Task(
      lr_scales=lr_scales,
      init_params=init_params,
      loss_fn=loss_fn,
      param_axes=param_axes(cfg),
      batches=lambda start: data_lib.batches(
          ds.x_train, ds.y_train, tc.batch_size, data_seed, start
      ),
      meta={"dataset": ds.name, "widths": list(cfg.widths), "kind": cfg.kind},
  )


# ---------------------------------------------------------------- evaluation


def score(pred: dict, y, ds: data_lib.Dataset) -> dict[str, float]:
  """Test metrics of a predictive dict (RMSE/NLL in original units)."""
  if ds.task == "regression":
    mean, var = pred["mean"], pred["var"]
    # Original units: targets were standardised with training statistics.
    rmse = float(core.rmse(mean, y)) * ds.y_std
    nll = float(core.gaussian_nll(mean, var, y)) + float(np.log(ds.y_std))
    return {"rmse": rmse, "nll": nll}
  probs = pred["probs"]
  return {
      "accuracy": float(core.accuracy(probs, y)),
      "nll": float(core.categorical_nll(probs, y)),
      "ece": float(core.ece(probs, y)),
  }


def pruned_predict(net: prune_lib.PrunedNet, x, ds, log_sigma_y):
  """Predictive dict of a pruned mean network (same form as core.predict)."""
  out = np.asarray(net.forward(jnp.asarray(x)))
  if ds.task == "regression":
    s2 = float(np.exp(2 * log_sigma_y))
    return {"mean": out[:, 0], "var": np.full(out.shape[0], s2)}
  return {"probs": jax.nn.softmax(out, axis=-1)}


def _time_forward(fn, x, repeats=20) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(x))
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn(x)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats * 1e3


def feature_metrics(selected: np.ndarray, truth) -> dict[str, float]:
  """Precision/recall/TPR/FPR of a selected 0-based feature set."""
  if truth is None:
    return {}
  sel, truth = set(map(int, selected)), set(map(int, truth))
  tp = len(sel & truth)
  return {
      "true_positives": tp,
      "false_positives": len(sel - truth),
      "precision": tp / len(sel) if sel else 0.0,
      "recall": tp / len(truth),
  }


def evaluate(
    params, cfg: SpikeSlabConfig, ds: data_lib.Dataset, seed: int = 0,
    threshold: float | None = None,
) -> dict[str, Any]:
  """Scores the full BNN and its median-probability pruned network."""
  key = jax.random.key(seed)
  x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  out: dict[str, Any] = {"task": ds.task, "kind": cfg.kind}
  out["full"] = score(core.predict(params, key, x, cfg), y, ds)
  out["full_mean_net"] = score(core.predict_mean_network(params, x, cfg), y, ds)
  hidden = cfg.widths[1:-1]
  out["widths"] = list(cfg.widths)
  if cfg.kind == "dense":
    out["nodes_kept"] = list(hidden)
    out["features_kept"] = ds.num_features
    return out
  feat_keep, node_keeps = pips_lib.keep_masks(params, cfg, threshold)
  net = prune_lib.prune(params, cfg, threshold)
  out["pruned"] = score(
      pruned_predict(net, ds.x_test, ds, params["log_sigma_y"]), y, ds
  )
  if min(int(np.sum(k)) for k in node_keeps) > 0 and np.any(feat_keep):
    small, small_cfg = prune_lib.prune_params(params, cfg, feat_keep, node_keeps)
    out["pruned_bnn"] = score(
        core.predict(small, key, x[:, np.asarray(net.kept_features)], small_cfg),
        y, ds,
    )
  else:  # A layer lost every node: the pruned net is a constant function.
    out["pruned_bnn"] = dict(out["pruned"], empty_layer=True)
  out["nodes_kept"] = [int(len(k)) for k in net.kept_nodes]
  out["node_frac_kept"] = float(sum(out["nodes_kept"]) / max(1, sum(hidden)))
  out["features_kept"] = int(len(net.kept_features))
  out["selected_features"] = [int(i) for i in net.kept_features]
  out["flops_full"] = int(prune_lib.flops_dense(cfg.widths))
  out["flops_pruned"] = int(net.flops())
  out["params_pruned"] = int(net.num_params)
  phis = pips_lib.edge_pip(params, cfg)
  out["edges_on"] = int(sum(int(jnp.sum(p > 0.5)) for p in phis))
  out.update(feature_metrics(net.kept_features, ds.true_features))
  xb = jnp.asarray(ds.x_test)
  full_w = core.mean_network(params, cfg)
  out["ms_forward_full"] = _time_forward(
      lambda a: core.forward(full_w, a, cfg.activation), xb
  )
  # Deployed, the pruned net only ever sees its kept features.
  out["ms_forward_pruned"] = _time_forward(
      net.forward_selected, xb[:, np.asarray(net.kept_features)]
  )
  out["feature_pip"] = np.asarray(pips_lib.feature_pip(params, cfg)).tolist()
  out["node_pips"] = [np.asarray(p).tolist() for p in pips_lib.node_pips(params, cfg)]
  return out


def task_for(config, cfg, ds, tc) -> trainer.Task:
  """`make_task` with the settings of an experiment config (train & eval)."""
  return make_task(cfg, ds, tc, loss_impl=config.loss_impl,
                   data_seed=config.data.seed,
                   theta_lr_mult=config.get("theta_lr_mult", 1.0))


def train_config(config: ml_collections.ConfigDict, **overrides) -> trainer.TrainConfig:
  d = config.train.to_dict()
  d.update(overrides)
  return trainer.TrainConfig.from_dict(d)


def fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    ds: data_lib.Dataset | None = None,
    *,
    model_overrides: dict | None = None,
    mesh=None,
) -> tuple[Any, SpikeSlabConfig, data_lib.Dataset]:
  """Trains (or resumes) one fit; returns (params, model cfg, dataset)."""
  if ds is None:
    ds = data_lib.load(config.data.name, config.data.seed, **dict(config.data.kwargs))
  model = {**config.model.to_dict(), **(model_overrides or {})}
  cfg = model_config(model, ds)
  tc = train_config(config)
  task = task_for(config, cfg, ds, tc)
  cfg_json = json.dumps(
      {"config": config.to_dict(), "model": dataclasses.asdict(cfg)},
      indent=2, default=str,
  )
  state = trainer.train(task, tc, workdir, mesh=mesh, config_json=cfg_json)
  return jax.device_get(state.params), cfg, ds


def finetune(
    params, cfg: SpikeSlabConfig, ds: data_lib.Dataset,
    config: ml_collections.ConfigDict, workdir: str, threshold=None,
):
  """Retrains the pruned BNN (kept features/nodes only) for a few steps."""
  feat_keep, node_keeps = pips_lib.keep_masks(params, cfg, threshold)
  if min(int(np.sum(k)) for k in node_keeps) == 0 or not np.any(feat_keep):
    raise ValueError(
        "pruning removed every node of a layer (or every feature): nothing to"
        " fine-tune; lower the threshold (prune.threshold) or pi0"
    )
  small, small_cfg = prune_lib.prune_params(params, cfg, feat_keep, node_keeps)
  small_cfg = dataclasses.replace(small_cfg, kl_warmup_frac=0.0)
  cols = np.flatnonzero(np.asarray(feat_keep))
  ds_small = dataclasses.replace(
      ds, x_train=ds.x_train[:, cols], x_val=ds.x_val[:, cols],
      x_test=ds.x_test[:, cols],
      true_features=None if ds.true_features is None else np.flatnonzero(
          np.isin(cols, ds.true_features)),
  )
  tc = train_config(config, num_steps=int(config.prune.finetune_steps))
  task = task_for(config, small_cfg, ds_small, tc)
  task.init_params = lambda rng: jax.tree.map(jnp.asarray, small)
  state = trainer.train(task, tc, workdir)
  return jax.device_get(state.params), small_cfg, ds_small
