r"""Convergence study: every gradient communicator and DiLoCo on one small LM.

A byte-level Llama (configs/lm/pretrain.py with 2 layers, d=256, F=768, 4
heads, 2 KV heads; 1.6 M parameters; batch 32 x 128 bytes) trained on
the Python standard library's source on 8 simulated CPU devices, once per
variant, with the same data order, seed and optimizer (`--preset`, gradient
clipping at 1 on the synced mean). Each run's held-out loss (files never trained on) and the bytes its
gradient sync sends are collected into a table and a plot. A horizon-free
measure sits next to the loss gap: the step at which the exact run's training
loss reached this run's final one (`steps_to_match`; "1.22x" = this run
needed 22 % more steps than exact for the same training loss).

  .venv/bin/python benchmarks/comm_study.py                 # ~30 min, 2 cores
  .venv/bin/python benchmarks/comm_study.py --preset adamw \
      --variants none,powersgd,topk,diloco
  .venv/bin/python benchmarks/comm_study.py --steps 60 --variants none,topk
  .venv/bin/python benchmarks/comm_study.py --report-only   # table + plot again

Runs live in `--workdir/<variant>/` and resume after a kill (finished ones are
skipped). Outputs: `<out>.json`, `<out>.md`, `<out>.png` (default
benchmarks/comm_study.*).

Two byte counts per optimizer step, per device, from the communicator's own
account of its collectives (the same account the tests check against the
lowered program):
  payload: the message each device contributes (sum of collective operand
    bytes), the count compression papers report;
  ring: what each device sends under the ring model (all-reduce 2(n-1)/n x
    operand, all-gather (n-1) x operand). All-gather based compressors
    (top-k, sign) grow with n here, all-reduce based ones do not.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _linear_phases(steps: int = 300, phases: int = 15, first: int = 6,
                   reverse: bool = False) -> tuple:
  """0-based sync steps of `phases` inner phases whose lengths grow
  linearly from `first` and sum to `steps` (300, 15, 6: 6, 8, ..., 34), or
  shrink to it with `reverse`."""
  inc = (steps - phases * first) / (phases * (phases - 1) / 2)
  lengths = [first + inc * i for i in range(phases)]
  ends, total = [], 0.0
  for n in reversed(lengths) if reverse else lengths:
    total += n
    ends.append(int(round(total)) - 1)
  return tuple(ends)


def _islands(**diloco) -> dict:
  """Overrides for DiLoCo H=20 between 2 islands of 4 devices with an
  averaging outer step, plus `diloco` settings."""
  return {"diloco": {"sync_every": 20, "outer_optimizer": "sgd",
                     "outer_lr": 1.0, **diloco},
          "mesh": {"node": 2, "data": 4}}


# name -> (label, train-config overrides)
VARIANTS = {
    "none": ("exact mean (fp32 all-reduce)", {}),
    "bf16": ("bf16 all-reduce", {"comm": {"name": "bf16"}}),
    "int8": ("int8 (shared scale)", {"comm": {"name": "int8"}}),
    "qsgd": ("QSGD s=4", {"comm": {"name": "qsgd", "levels": 4}}),
    "terngrad": ("TernGrad", {"comm": {"name": "terngrad"}}),
    "randomk": ("random-k 1% + EF", {"comm": {"name": "randomk", "ratio": 0.01}}),
    "topk": ("top-k 1% + EF", {"comm": {"name": "topk", "ratio": 0.01}}),
    "sign_mv": ("sign, majority vote + EF", {"comm": {"name": "sign_mv"}}),
    "powersgd": ("PowerSGD r=4 + EF", {"comm": {"name": "powersgd", "rank": 4}}),
    # PowerSGD r=4 with the tied embedding (256 x 256: the input lookup and
    # the output softmax's weight) at its own rank: 24 keeps the payload
    # >= 30x below the exact mean's; 256 sends it exactly (a diagnostic).
    "powersgd_embed24": ("PowerSGD r=4, tied embedding r=24 + EF",
                         {"comm": {"name": "powersgd", "rank": 4,
                                   "rank_overrides": "embed=24"}}),
    "powersgd_embed_exact": ("PowerSGD r=4, tied embedding exact + EF",
                             {"comm": {"name": "powersgd", "rank": 4,
                                       "rank_overrides": "embed=256"}}),
    # Ranks moved to where the mean gradient's spectrum is flattest late in
    # training (MLPs, embedding) from where rank 2 holds 80-90 % of it (q, k
    # projections); payload still >= 30x below the exact mean's.
    "powersgd_alloc": ("PowerSGD r=4 (MLP r=6, embedding r=11, q/k r=2) + EF",
                       {"comm": {"name": "powersgd", "rank": 4,
                                 "rank_overrides": "embed=11,mlp=6,"
                                                   "q_proj=2,k_proj=2"}}),
    # P and Q averaged in bf16 (PyTorch's bf16_compress_wrapper around
    # powerSGD_hook): rank 8 then costs the bytes of rank 4 in f32, and the
    # embedding's rank 48 those of rank 24 (= powersgd / powersgd_embed24).
    "powersgd_bf16_r8": ("PowerSGD r=8, bf16 factors + EF",
                         {"comm": {"name": "powersgd", "rank": 8,
                                   "factor_dtype": "bfloat16"}}),
    "powersgd_bf16_r8_embed48": ("PowerSGD r=8, tied embedding r=48, bf16"
                                 " factors + EF",
                                 {"comm": {"name": "powersgd", "rank": 8,
                                           "rank_overrides": "embed=48",
                                           "factor_dtype": "bfloat16"}}),
    # The same byte budget spread differently: rank 9 everywhere, the tied
    # embedding at 32 (30.8x fewer payload bytes).
    "powersgd_bf16_r9_embed32": ("PowerSGD r=9, tied embedding r=32, bf16"
                                 " factors + EF",
                                 {"comm": {"name": "powersgd", "rank": 9,
                                           "rank_overrides": "embed=32",
                                           "factor_dtype": "bfloat16"}}),
    "diloco": ("DiLoCo H=20 (Nesterov outer)",
               {"diloco": {"sync_every": 20},
                "mesh": {"node": 8, "data": 1}}),
    # Top-k with DGC's momentum correction and momentum factor masking
    # (arXiv 1712.01887 sec. 3.2): momentum runs on each device before error
    # feedback, so the optimizer is plain SGD; clipping is local (DGC).
    "topk_dgc": ("top-k 1% + EF, DGC momentum correction",
                 {"comm": {"name": "topk", "ratio": 0.01, "local_momentum": 0.9,
                           "local_nesterov": True, "momentum_masking": True,
                           "clip_local": 1.0}},
                 {"momentum": 0.0, "nesterov": False, "grad_clip": 0.0}),
    # Diagnostic: topk_dgc without momentum factor masking.
    "topk_dgc_nomask": ("top-k 1% + EF, DGC momentum correction, no masking",
                        {"comm": {"name": "topk", "ratio": 0.01,
                                  "local_momentum": 0.9,
                                  "local_nesterov": True,
                                  "momentum_masking": False,
                                  "clip_local": 1.0}},
                        {"momentum": 0.0, "nesterov": False,
                         "grad_clip": 0.0}),
    # Diagnostic: the same at 3.3 % density (f32 values, int32 indices:
    # 15x fewer bytes). Does sending more coordinates close the gap at all?
    "topk_dgc_3pct": ("top-k 3.3% + EF, DGC momentum correction",
                      {"comm": {"name": "topk", "ratio": 0.033,
                                "local_momentum": 0.9, "local_nesterov": True,
                                "momentum_masking": True, "clip_local": 1.0}},
                      {"momentum": 0.0, "nesterov": False, "grad_clip": 0.0}),
    # Top-k 1% with EF21 (comm.feedback="ef21", arXiv 2106.05203): devices
    # send top-k of g_i - h_i and the optimizer (momentum and the clip of the
    # mean, as in the exact run) sees the dense running estimate h. Step 0
    # is exact (start_iter=1, counted in the bytes) so that h starts at the
    # first mean gradient instead of 0.
    "topk_ef21": ("top-k 1%, EF21 (gradient estimates), first step exact",
                  {"comm": {"name": "topk", "ratio": 0.01, "feedback": "ef21",
                            "start_iter": 1}}),
    # EF21 with momentum on the devices (EF21-SGDM, arXiv 2305.15155): each
    # device compresses u_i - h_i, u_i its heavy-ball momentum (smooth, so
    # the estimate can follow it), local clip 1 as in topk_dgc; the
    # optimizer is plain SGD on h.
    "topk_ef21_mom": ("top-k 1%, EF21 on local momentum, first step exact",
                      {"comm": {"name": "topk", "ratio": 0.01,
                                "feedback": "ef21", "start_iter": 1,
                                "local_momentum": 0.9, "clip_local": 1.0}},
                      {"momentum": 0.0, "nesterov": False, "grad_clip": 0.0}),
    # Diagnostic: the exact mean under topk_dgc's optimizer (momentum on the
    # devices, local clip 1, no clip of the mean): how much of top-k DGC's
    # gap is the optimizer change rather than the sparsification?
    "none_dgc_opt": ("exact mean, DGC's optimizer (local Nesterov, local"
                     " clip 1)",
                     {"comm": {"name": "none", "local_momentum": 0.9,
                               "local_nesterov": True, "clip_local": 1.0}},
                     {"momentum": 0.0, "nesterov": False, "grad_clip": 0.0}),
    # Top-k with ScaleCom's cyclic local top-k (arXiv 2104.11125): one
    # device per step (rotating) picks the indices, all send their values
    # there (two all-reduces of k), so the mean is exact on them; optimizer
    # momentum on the synced mean, as for PowerSGD.
    "topk_leader": ("top-k 1% + EF, cyclic leader indices (ScaleCom CLT-k)",
                    {"comm": {"name": "topk", "ratio": 0.01,
                              "topk_select": "leader"}}),
    # DiLoCo between 2 islands of 4 devices (exact mean inside an island
    # every step), outer step = plain averaging of the islands' parameters.
    "diloco_islands": ("DiLoCo H=20, 2 islands x 4 devices, averaging outer",
                       _islands()),
    # The same, and the islands' momentum buffers averaged at every sync too
    # (diloco.sync_inner_opt): same syncs, twice the bytes per sync.
    "diloco_islands_mom": ("DiLoCo H=20, 2 islands x 4, averaging outer,"
                           " momentum averaged too",
                           _islands(sync_inner_opt=True)),
    # The same 15 syncs placed by the learning-rate schedule
    # (diloco.schedule="lr"): every inner phase covers an equal share of
    # sum lr_t ** p, short phases at the peak, long ones in the warm-up and
    # the tail of the decay (p=1: 27, 11, ..., 34, 71 steps at the preset).
    "diloco_islands_lr": ("DiLoCo 15 syncs placed by lr mass, 2 islands x 4,"
                          " averaging outer",
                          _islands(schedule="lr", lr_power=1.0)),
    # The same 15 syncs, frequent early and rare late (post-local SGD, Lin
    # et al. 2020, arXiv 1808.07217, in a graded form): phases of 6, 8, ...,
    # 34 steps (at 300 steps; later steps fall back to H=20); and the
    # reverse, rare early and frequent late (AdaComm, Wang and Joshi 2019,
    # arXiv 1810.08313).
    "diloco_islands_grow": ("DiLoCo 15 syncs, phases growing 6..34 steps,"
                            " 2 islands x 4, averaging outer",
                            _islands(sync_at=_linear_phases())),
    "diloco_islands_shrink": (
        "DiLoCo 15 syncs, phases shrinking 34..6 steps, 2 islands x 4,"
        " averaging outer",
        _islands(sync_at=_linear_phases(reverse=True))),
    "diloco_islands_lr05": ("DiLoCo 15 syncs placed by sqrt(lr) mass,"
                            " 2 islands x 4, averaging outer",
                            _islands(schedule="lr", lr_power=0.5)),
    # Damped averaging: the islands restart from the old point plus 0.8 of
    # the mean delta (outer SGD at lr 0.8, no momentum).
    "diloco_islands_olr08": ("DiLoCo H=20, 2 islands x 4, outer SGD lr 0.8",
                             _islands(outer_lr=0.8)),
    "diloco_islands_olr06": ("DiLoCo H=20, 2 islands x 4, outer SGD lr 0.6",
                             _islands(outer_lr=0.6)),
}
# Optimizer settings shared by every variant of one study (train keys).
PRESETS = {
    # Nesterov momentum SGD, the optimizer error feedback is analysed for and
    # PowerSGD / DGC were evaluated with; lr from a sweep (benchmarks/RESULTS.md).
    "sgd": dict(optimizer="sgd", momentum=0.9, nesterov=True,
                learning_rate=0.125, lr_schedule="cosine", warmup_steps=30),
    # AdamW (configs/lm/pretrain.py: lr 3e-3), same schedule.
    "adamw": dict(lr_schedule="cosine", warmup_steps=30),
}
GOALS = {"powersgd": ("bytes", 30.0), "powersgd_embed24": ("bytes", 30.0),
         "powersgd_alloc": ("bytes", 30.0),
         "powersgd_bf16_r8": ("bytes", 30.0),
         "powersgd_bf16_r8_embed48": ("bytes", 30.0),
         "powersgd_bf16_r9_embed32": ("bytes", 30.0),
         "topk": ("bytes", 30.0),
         "topk_dgc": ("bytes", 30.0), "topk_ef21": ("bytes", 30.0),
         "topk_ef21_mom": ("bytes", 30.0), "topk_leader": ("bytes", 30.0),
         "diloco": ("syncs", 20.0),
         "diloco_islands": ("syncs", 20.0),
         "diloco_islands_lr": ("syncs", 20.0),
         "diloco_islands_lr05": ("syncs", 20.0),
         "diloco_islands_grow": ("syncs", 20.0),
         "diloco_islands_shrink": ("syncs", 20.0),
         "diloco_islands_mom": ("syncs", 20.0),
         "diloco_islands_olr08": ("syncs", 20.0),
         "diloco_islands_olr06": ("syncs", 20.0)}


def parse_sets(items) -> dict:
  """["key=value", ...] -> {key: value}, values parsed as JSON when they can
  be."""
  out = {}
  for kv in items:
    k, _, v = kv.partition("=")
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def make_config(steps: int, overrides: dict, train_set: dict | None = None):
  from configs.lm import pretrain as lm_config

  c = lm_config.get_config()
  c.model.hidden_size = 256
  c.model.intermediate_size = 768
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.train.batch_size = 32
  c.train.num_steps = steps
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.progress = False
  c.train.console = False
  c.train.mesh.node = 1
  c.train.mesh.data = 8
  for k, v in (train_set or {}).items():
    c.train[k] = v
  for key, val in overrides.items():
    for k, v in val.items():
      c.train[key][k] = v
  return c


def byte_counts(config) -> dict:
  """Payload and ring bytes per optimizer step, and syncs per step."""
  import jax

  from jaxlib_models.core import mesh as mesh_lib
  from jaxlib_models.core import trainer
  from jaxlib_models.lm import pretrain
  from jaxlib_models.parallel import comm as comm_lib

  tc = trainer.TrainConfig.from_dict(config.train.to_dict())
  cfg = pretrain.model_config({**config.model.to_dict(),
                               "seq_len": config.data.seq_len})
  task = pretrain.make_task(cfg, tc, seq_len=config.data.seq_len,
                            max_bytes=4096, seed=0)
  abstract = jax.eval_shape(lambda: task.init_params(jax.random.key(0)))
  mesh = mesh_lib.make_mesh(dict(tc.mesh))
  par = trainer.plan_parallel(tc, mesh)
  colls = [c for c in par.sync_collectives(abstract) if c.group_size > 1]
  per = par.syncs_per_step()
  payload = sum(c.operand_bytes for c in colls) * per
  ring = sum(c.bytes_on_wire for c in colls) * per
  start = min(tc.comm.start_iter, tc.num_steps) if tc.comm.name != "none" else 0
  if start and not tc.diloco.enabled:
    # The first start_iter steps send the exact mean: averaged over the run.
    exact = trainer.plan_parallel(
        dataclasses.replace(tc, comm=comm_lib.CommConfig()), mesh)
    ex = [c for c in exact.sync_collectives(abstract) if c.group_size > 1]
    f = start / tc.num_steps
    payload = (1 - f) * payload + f * sum(c.operand_bytes for c in ex)
    ring = (1 - f) * ring + f * sum(c.bytes_on_wire for c in ex)
  return {
      "payload_per_step": payload,
      "ring_per_step": ring,
      "syncs_per_step": per,
      "params": sum(x.size for x in jax.tree.leaves(abstract)),
  }


def _curve(wd: str) -> list:
  from jaxlib_models.core import metrics as metrics_lib

  if not os.path.exists(os.path.join(wd, "metrics.jsonl")):
    return []
  return [(m["step"], m["train/loss"]) for m in metrics_lib.read_metrics(wd)
          if "train/loss" in m]


def _smooth(curve, window: int) -> list:
  """(step, mean of the last `window` logged losses) per logged step."""
  out = []
  for i, (step, _) in enumerate(curve):
    w = [loss for _, loss in curve[max(0, i - window + 1):i + 1]]
    out.append((step, sum(w) / len(w)))
  return out


def steps_to_match(base_curve, curve, window: int = 5):
  """The first step at which the exact run's training loss (moving mean of
  `window` logged points) is at or below this run's final one (same
  smoothing): how many exact steps this run's whole budget was worth.
  None when either curve is empty or the exact run never gets there."""
  if not base_curve or not curve:
    return None
  final = _smooth(curve, window)[-1][1]
  return next((s for s, loss in _smooth(base_curve, window)
               if loss <= final), None)


def run_variant(name: str, steps: int, workdir: str,
                train_set: dict | None = None) -> dict:
  from jaxlib_models.lm import entry

  label, overrides, *own_set = VARIANTS[name]
  if own_set:  # The variant's own optimizer settings on top of the preset's.
    train_set = {**(train_set or {}), **own_set[0]}
  wd = os.path.join(workdir, name)
  done = os.path.join(wd, "study.json")
  settings = {"steps": steps, "train_set": train_set or {}}
  marker = os.path.join(wd, "study_settings.json")
  if os.path.exists(marker):
    with open(marker) as f:
      before = json.load(f)
    if before != settings:
      raise SystemExit(
          f"{wd} holds a run with other settings ({before}, now {settings});"
          " its checkpoints would be resumed: pass another --workdir or"
          " delete that folder")
  if os.path.exists(done):
    with open(done) as f:
      r = json.load(f)
    print(f"{name}: done before (held-out loss {r['val_loss']:.4f})")
    return {**r, "train_curve": _curve(wd) or r.get("train_curve", [])}
  from jaxlib_models.core import io
  io.write_json(marker, settings)
  config = make_config(steps, overrides, train_set)
  t0 = time.time()
  res = entry.train_main(config, wd)
  seconds = time.time() - t0
  curve = _curve(wd)
  r = {"name": name, "label": label, "steps": steps,
       "val_loss": res["val_loss"], "seconds": seconds,
       "train_set": train_set or {}, "train_curve": curve,
       **byte_counts(config)}
  io.write_json(done, r)
  print(f"{name}: held-out loss {r['val_loss']:.4f}, {seconds:.0f} s", flush=True)
  return r


def report(results: list[dict], out: str, steps: int) -> None:
  from jaxlib_models.core import io

  base = next((r for r in results if r["name"] == "none"), None)
  lines = [
      "| variant | held-out loss (nats/byte) | vs exact | payload B/step |"
      " fewer payload bytes | ring B/step | fewer ring bytes | syncs |"
      " exact's step at this train loss | goal |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  rows = []
  for r in results:
    rel = (r["val_loss"] / base["val_loss"] - 1) if base else float("nan")
    fp = base["payload_per_step"] / r["payload_per_step"] if base else float("nan")
    fr = base["ring_per_step"] / r["ring_per_step"] if base else float("nan")
    syncs = round(r["syncs_per_step"] * r["steps"])
    goal = ""
    if r["name"] in GOALS and base:
      kind, need = GOALS[r["name"]]
      fewer = fp if kind == "bytes" else base["syncs_per_step"] / r["syncs_per_step"]
      ok = rel <= 0.03 and fewer >= need
      goal = (f"{'met' if ok else 'NOT met'} (<= 3% and >= {need:.0f}x"
              f" fewer {'payload bytes' if kind == 'bytes' else 'syncs'})")
    match = (steps_to_match(base.get("train_curve"), r.get("train_curve"))
             if base else None)
    rows.append({**{k: v for k, v in r.items() if k != "train_curve"},
                 "rel_loss": rel, "fewer_payload": fp, "fewer_ring": fr,
                 "syncs": syncs, "exact_step_match": match, "goal": goal})
    at = "-" if match is None else f"{match} ({r['steps'] / match:.2f}x)"
    lines.append(
        f"| {r['label']} | {r['val_loss']:.4f} | {rel * 100:+.2f}% |"
        f" {r['payload_per_step']:,.0f} | {fp:.1f}x | {r['ring_per_step']:,.0f} |"
        f" {fr:.1f}x | {syncs} | {at} | {goal} |")
  table = "\n".join(lines)
  print(table)
  io.write_text(out + ".md", table + "\n")
  io.write_json(out + ".json", {"steps": steps, "rows": rows})
  _plot(results, out + ".png")
  print(f"wrote {out}.md, {out}.json, {out}.png")


def _plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from jaxlib_models.core import io

  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in results:
    total = r["payload_per_step"] * r["steps"]
    a.scatter(total, r["val_loss"], s=30)
    a.annotate(r["name"], (total, r["val_loss"]), fontsize=8,
               xytext=(4, 3), textcoords="offset points")
    steps, loss = zip(*r["train_curve"]) if r["train_curve"] else ((), ())
    b.plot(steps, loss, label=r["name"], lw=1)
  base = next((r for r in results if r["name"] == "none"), None)
  if base:
    a.axhline(base["val_loss"] * 1.03, ls="--", c="gray", lw=0.8)
    a.text(a.get_xlim()[0], base["val_loss"] * 1.03, " exact + 3%",
           fontsize=7, va="bottom", color="gray")
  a.set_xscale("log")
  a.set_xlabel("gradient payload bytes per device, whole run (log)")
  a.set_ylabel("held-out loss (nats/byte)")
  a.set_title("final loss against bytes sent")
  b.set_xlabel("step")
  b.set_ylabel("training loss")
  b.set_title("training curves")
  b.set_yscale("log")
  b.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  io.save_figure(fig, path)
  plt.close(fig)
  del np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
  ap.add_argument("--preset", choices=sorted(PRESETS), default="sgd",
                  help="optimizer of every variant (default sgd: Nesterov"
                  " momentum 0.9, lr 0.125, cosine; adamw: lr 3e-3, cosine)")
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help=f"comma-separated subset of {','.join(VARIANTS)}")
  ap.add_argument("--workdir", default=None,
                  help="one resumable run folder per variant (default"
                  " runs/comm_study_<preset>)")
  ap.add_argument("--out", default=None,
                  help="prefix of the .md/.json/.png outputs (default"
                  " benchmarks/comm_study for sgd, benchmarks/comm_study_<preset>"
                  " otherwise)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="train setting for every variant, e.g. --set"
                  " optimizer=sgd --set momentum=0.9 (values parsed as JSON)")
  ap.add_argument("--report-only", action="store_true",
                  help="rebuild the table and plot from finished runs")
  args = ap.parse_args(argv)
  names = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  import jax
  if jax.device_count() < 8:
    ap.error(f"needs 8 devices, found {jax.device_count()}; run with"
             " XLA_FLAGS=--xla_force_host_platform_device_count=8 unset"
             " or on 8 real devices")
  args.workdir = args.workdir or f"runs/comm_study_{args.preset}"
  args.out = args.out or ("benchmarks/comm_study" if args.preset == "sgd"
                          else f"benchmarks/comm_study_{args.preset}")
  train_set = dict(PRESETS[args.preset])
  train_set.update(parse_sets(args.set))
  results = []
  for n in names:
    if args.report_only:
      p = os.path.join(args.workdir, n, "study.json")
      if os.path.exists(p):
        with open(p) as f:
          results.append(json.load(f))
      continue
    results.append(run_variant(n, args.steps, args.workdir, train_set))
  report(results, args.out, args.steps)


if __name__ == "__main__":
  main()
