"""Runs the rate study (E1-E5 of the brief) with per-experiment resume.

Each experiment's results land in <workdir>/<name>.json as soon as it
finishes (atomically); a rerun reads finished ones back. Neural fits resume
from their checkpoints under <workdir>/neural/.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from scipy import stats

from jaxlib_models.core import io, trainer
from jaxlib_models.score import estimators, neural, rates, samplers, targets


def _cached(workdir: str, name: str, fn):
  path = os.path.join(workdir, f"{name}.json")
  if os.path.exists(path):
    print(f"{name}: reusing {path}", flush=True)
    return io.read_json(path)
  res = fn()
  io.write_json(path, res)
  return res


def _bar(total: int, desc: str):
  return tqdm.tqdm(total=total, desc=desc, unit="cell", dynamic_ncols=True)


def run_e1(c) -> dict:
  """Score MSE against n at fixed t (slope -1 expected)."""
  out = {}
  cells = len(c.targets) * len(c.dims) * len(c.ts) * len(c.ns)
  bar = _bar(cells, "E1 score MSE vs n")
  for name in c.targets:
    for d in c.dims:
      tg = targets.make(name, d)
      for t in c.ts:
        per = []
        for n in c.ns:
          per.append([rates.score_mse(tg, n, t, s, n_eval=c.n_eval)
                      for s in range(c.seeds)])
          bar.update()
        slope, ci = rates.bootstrap_slope(c.ns, per)
        out[f"{name}/d{d}/t{t:g}"] = dict(
            target=name, d=d, t=t, ns=list(c.ns), mse=per, slope=slope,
            ci=list(ci), n_t_d2=[n * t ** (d / 2) for n in c.ns])
  bar.close()
  return out


def run_e2(c) -> dict:
  """Score MSE against t at fixed n (slope -(d+2)/2 for t < 1)."""
  out = {}
  bar = _bar(len(c.targets) * len(c.dims) * len(c.ts), "E2 score MSE vs t")
  for name in c.targets:
    for d in c.dims:
      tg = targets.make(name, d)
      per = []
      for t in c.ts:
        per.append([rates.score_mse(tg, c.n, t, s, n_eval=c.n_eval)
                    for s in range(c.seeds)])
        bar.update()
      small = [i for i, t in enumerate(c.ts) if t < 1]
      slope_small = rates.fit_slope([c.ts[i] for i in small],
                                    [np.mean(per[i]) for i in small])
      out[f"{name}/d{d}"] = dict(target=name, d=d, n=c.n, ts=list(c.ts),
                                 mse=per, slope_small_t=slope_small,
                                 theory_small_t=-(d + 2) / 2)
  bar.close()
  return out


def run_e3(c) -> dict:
  """TV of the sampler's exact output (Gaussian KDE at t0) against n."""
  out = {}
  bar = _bar(len(c.targets) * len(c.dims) * len(c.ns), "E3 TV vs n")
  for d in c.dims:
    for name in c.targets:
      tg = targets.make(name, d, c.beta)
      per = []
      for n in c.ns:
        per.append([rates.tv_rate(tg, n, s, c.beta) for s in range(c.seeds)])
        bar.update()
      slope, ci = rates.bootstrap_slope(c.ns, per)
      key = name if d == 1 else f"{name}/d{d}"
      out[key] = dict(target=name, d=d, ns=list(c.ns), tv=per, slope=slope,
                      ci=list(ci), theory=-c.beta / (2 * c.beta + d))
  bar.close()
  return out


def run_e4(c, workdir: str) -> dict:
  """Samplers against direct KDE draws (KS and its noise floor)."""
  tg = targets.make(c.target, 1)
  res = rates.sampler_vs_identity(tg, c.n, c.num, 0, tuple(c.methods),
                                  c.steps)
  np.savez_compressed(os.path.join(workdir, "e4_samples.npz"),
                      **{k: v for k, v in res.pop("samples").items()},
                      X=res.pop("X"))
  return res


def run_e5(c, workdir: str) -> dict:
  """Kernel (truncated empirical) against the DSM neural score at small n,
  one table per target."""
  return {name: _run_e5_target(c, name, workdir) for name in c.targets}


def _run_e5_target(c, name: str, workdir: str) -> dict:
  tg = targets.make(name, 1)
  ncfg = neural.NeuralConfig(hidden=tuple(c.hidden))
  rows = []
  bar = tqdm.tqdm(total=len(c.ns) * c.seeds, desc=f"E5 {name}",
                  unit="fit", dynamic_ncols=True)
  for n in c.ns:
    t0, T = samplers.theory_schedule(n, 1)
    tgrid = np.exp(np.linspace(math.log(t0), math.log(min(T, c.t_int_max)),
                               c.t_int_points))
    for s in range(c.seeds):
      rng = np.random.default_rng((s, n, 7))
      X = tg.sample(rng, n)
      tc = trainer.TrainConfig(
          num_steps=c.steps, batch_size=c.batch_size,
          learning_rate=c.learning_rate, lr_schedule="cosine",
          warmup_steps=min(100, c.steps // 10), seed=s, progress=False,
          console=False, checkpoint_every=c.steps, log_every=c.steps,
          mesh=(("data", -1), ("fsdp", 1), ("tensor", 1)))
      model, params = neural.fit(
          X, ncfg, tc, os.path.join(workdir, "neural", f"{name}_n{n}_s{s}"),
          (t0, T), data_seed=s)
      fn32 = jax.jit(neural.score_fn(model, params))
      nn_fn = lambda x, t: fn32(jnp.asarray(x, jnp.float32), t)
      row = dict(n=n, seed=s, t0=t0, T=T)
      # Sample quality: EM (K = c.sample_steps) from N(0, T I) with each
      # score, same key; W1 to a large sample of p0, and its noise floor.
      ref = tg.sample(np.random.default_rng((s, 99)), c.sample_ref)
      scfg = samplers.SamplerConfig(method="em", steps=c.sample_steps)
      ys, _ = samplers.sample(jax.random.key(s), X.astype(np.float32),
                              c.sample_num, scfg)
      yu, _ = samplers.sample(jax.random.key(s), X.astype(np.float32),
                              c.sample_num, scfg,
                              estimators.ScoreConfig(truncate=False))
      model_fn = neural.score_fn(model, params)
      key = jax.random.key(s)
      y_nn = _neural_sample(model_fn, key, c.sample_num, t0, T,
                            c.sample_steps)
      floor = tg.sample(np.random.default_rng((s, 98)), c.sample_num)
      row["w1"] = dict(
          kernel=float(stats.wasserstein_distance(np.asarray(ys)[:, 0],
                                                  ref[:, 0])),
          kernel_untruncated=float(stats.wasserstein_distance(
              np.asarray(yu)[:, 0], ref[:, 0])),
          neural=float(stats.wasserstein_distance(np.asarray(y_nn)[:, 0],
                                                  ref[:, 0])),
          floor=float(stats.wasserstein_distance(floor[:, 0], ref[:, 0])))
      for label, kw in (("kernel", {}), ("neural", dict(score_fn=nn_fn))):
        # Same data and evaluation points for both (same seed, n).
        row[label] = {f"t{t:g}": _mse_same_data(tg, X, t, s, c.n_eval, **kw)
                      for t in c.ts}
        curve = [_mse_same_data(tg, X, t, s, c.n_eval, **kw) for t in tgrid]
        row[label]["integrated"] = float(np.trapezoid(curve, tgrid))
      rows.append(row)
      bar.update()
  bar.close()
  return dict(target=name, ns=list(c.ns), seeds=c.seeds, ts=list(c.ts),
              rows=rows, steps=c.steps, hidden=list(c.hidden),
              sample_steps=c.sample_steps, sample_num=c.sample_num)


def _neural_sample(model_fn, key, num, t0, T, steps):
  """EM with the neural score, the same schedule and start as the kernel
  sampler (samplers._run draws its start and noise the same way)."""

  @jax.jit
  def run(key):
    k_start, k_run = jax.random.split(key)
    y = jnp.sqrt(T) * jax.random.normal(k_start, (num, 1), jnp.float32)
    grid = jnp.asarray(samplers.time_grid(t0, T, steps), jnp.float32)
    return samplers.integrate(model_fn, k_run, y, grid, "em")

  return run(key)


def _mse_same_data(tg, X, t, seed, n_eval, score_fn=None) -> float:
  rng = np.random.default_rng((seed, X.shape[0], 17, int(t * 1e6)))
  x = tg.sample_pt(rng, n_eval, t)
  truth = tg.score(x, t)
  if score_fn is None:
    with jax.enable_x64(True):
      est = np.asarray(rates._score_f64(jnp.asarray(x), jnp.asarray(X),
                                        jnp.asarray(t, jnp.float64)))
  else:
    est = np.asarray(score_fn(x, t), np.float64)
  return float(np.mean(np.sum((est - truth) ** 2, axis=-1)))


def run_e6(c) -> dict:
  """Ablations (brief §5 E5): truncation on/off and c_rho, Legendre vs
  empirical; score MSE at fixed n and t, same data and points per seed."""
  out = {}
  variants = {v["label"]: v for v in (dict(v) for v in c.variants)}
  bar = _bar(len(c.ts) * len(variants), "E6 ablations")
  for t in c.ts:
    row = {}
    for label, v in variants.items():
      kw = {k: val for k, val in v.items() if k != "label"}
      cfg = estimators.ScoreConfig(**kw)
      row[label] = [rates.score_mse(targets.make(c.target, c.dim), c.n, t, s,
                                    n_eval=c.n_eval, cfg=cfg)
                    for s in range(c.seeds)]
      bar.update()
    out[f"t{t:g}"] = row
  bar.close()
  return dict(target=c.target, d=c.dim, n=c.n, seeds=c.seeds, rows=out)


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  s = config.study
  res = {}
  if s.e1.enabled:
    res["e1"] = _cached(workdir, "e1", lambda: run_e1(s.e1))
  if s.e2.enabled:
    res["e2"] = _cached(workdir, "e2", lambda: run_e2(s.e2))
  if s.e3.enabled:
    res["e3"] = _cached(workdir, "e3", lambda: run_e3(s.e3))
  if s.e4.enabled:
    res["e4"] = _cached(workdir, "e4", lambda: run_e4(s.e4, workdir))
  if s.e5.enabled:
    res["e5"] = _cached(workdir, "e5", lambda: run_e5(s.e5, workdir))
  if "e6" in s and s.e6.enabled:
    res["e6"] = _cached(workdir, "e6", lambda: run_e6(s.e6))
  return res
