"""Markdown report and plots of a spike-and-slab study (PNG next to it)."""

import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlib_models.core import io  # noqa: E402

LABELS = {
    "spike_slab": "Spike-and-slab BNN (per weight, ours)",
    "node_spike_slab": "Node spike-and-slab (Jantre et al.)",
    "dense": "Dense BNN",
}


def _ms(values) -> str:
  v = np.asarray([x for x in values if x is not None], float)
  if v.size == 0:
    return "n/a"
  if v.size == 1:
    return f"{v[0]:.4g}"
  return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}"


def _nodes(recs, key="nodes_kept") -> str:
  arr = np.asarray([r[key] for r in recs], float)
  return "-".join(f"{m:.1f}" for m in arr.mean(0))


def _rows_for(name, recs):
  """Table rows (label, metric list, nll list, ece list, nodes, feats, prec, rec)."""
  by = collections.defaultdict(list)
  for r in recs:
    by[r["variant"]].append(r)
  metric = "rmse" if recs[0]["task"] == "regression" else "accuracy"
  rows = []

  def add(label, rs, get, nodes_key="nodes_kept", feats=None, sel=None):
    if not rs:
      return
    parts = [get(r) for r in rs]
    if any(p is None for p in parts):
      return
    nodes = "-".join(
        f"{m:.1f}" for m in np.mean([p.get(nodes_key, r.get(nodes_key))
                                     for p, r in zip(parts, rs)], 0)
    ) if nodes_key else "n/a"
    f = [p.get("features_kept", r.get("features_kept")) for p, r in zip(parts, rs)]
    src = sel or parts
    rows.append([
        label, _ms([p.get(metric) for p in parts]),
        _ms([p.get("nll") for p in parts]),
        _ms([p.get("ece") for p in parts]) if metric == "accuracy" else "",
        nodes, _ms(f),
        _ms([s.get("precision") for s in src]) if "precision" in src[0] else "",
        _ms([s.get("recall") for s in src]) if "recall" in src[0] else "",
        str(len(rs)),
    ])

  for v in ("spike_slab", "node_spike_slab"):
    rs = by.get(v, [])
    add(LABELS[v] + ": full", rs, lambda r: {**r["full"],
        "nodes_kept": r["widths"][1:-1], "features_kept": r["widths"][0]})
    add(LABELS[v] + ": pruned mean net", rs, lambda r: r["pruned"],
        sel=rs if rs and "precision" in rs[0] else None)
    add(LABELS[v] + ": pruned BNN", rs, lambda r: r["pruned_bnn"])
    add(LABELS[v] + ": pruned + fine-tuned", rs, lambda r: r.get("finetuned"))
  rs = by.get("dense", [])
  add(LABELS["dense"], rs, lambda r: r["full"])
  add("Dense BNN, magnitude-pruned to the same size", rs,
      lambda r: r.get("magnitude"))
  if rs and rs[0].get("lasso"):
    add("LassoCV (linear)", rs, lambda r: r["lasso"], nodes_key=None)
  return metric, rows


def _plot_pips(name, recs, path):
  ss = [r for r in recs if r["variant"] == "spike_slab"]
  if not ss:
    return None
  layers = len(ss[0]["node_pips"])
  fig, axes = plt.subplots(1, layers + 1, figsize=(4 * (layers + 1), 3.2))
  for l in range(layers):
    v = np.concatenate([r["node_pips"][l] for r in ss])
    axes[l].hist(v, bins=np.linspace(0, 1, 26), color="tab:blue")
    axes[l].set_title(f"hidden layer {l + 1} node PIPs")
    axes[l].axvline(ss[0].get("threshold", 0.5), color="k", ls="--", lw=1)
    axes[l].set_yscale("log")
  v = np.concatenate([r["feature_pip"] for r in ss])
  axes[-1].hist(v, bins=np.linspace(0, 1, 26), color="tab:green")
  axes[-1].set_title("input feature PIPs")
  axes[-1].set_yscale("log")
  axes[-1].axvline(0.5, color="k", ls="--", lw=1)
  fig.suptitle(f"{name}: PIP histograms over {len(ss)} seeds", y=1.04)
  io.save_figure(fig, path)
  plt.close(fig)
  return path


def _plot_features(name, recs, path):
  ss = [r for r in recs if r["variant"] == "spike_slab"]
  if not ss:
    return None
  r = ss[0]
  fp = np.asarray(r["feature_pip"])
  fig, ax = plt.subplots(figsize=(8, 3))
  ax.plot(np.arange(fp.size), fp, ".", ms=3, color="tab:gray", label="feature")
  if r.get("true_features"):
    t = np.asarray(r["true_features"])
    ax.plot(t, fp[t], "o", color="tab:red", ms=6, label="true feature")
  ax.axhline(0.5, color="k", ls="--", lw=1)
  ax.set_xlabel("input feature index")
  ax.set_ylabel("feature PIP")
  ax.set_ylim(-0.03, 1.03)
  ax.set_title(f"{name}: per-feature PIPs (seed {r['seed']})")
  ax.legend(loc="center right")
  io.save_figure(fig, path)
  plt.close(fig)
  return path


def _plot_tradeoff(name, recs, path):
  ss = [r for r in recs if r["variant"] == "spike_slab" and "sweep" in r]
  dn = [r for r in recs if r["variant"] == "dense" and "magnitude_sweep" in r]
  if not ss:
    return None
  metric = "rmse" if recs[0]["task"] == "regression" else "accuracy"
  hidden = sum(ss[0]["widths"][1:-1])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))

  def curve(rs, key, label, style):
    xs = np.mean([[sum(s["nodes_kept"]) / hidden for s in r[key]] for r in rs], 0)
    ys = np.mean([[s[metric] for s in r[key]] for r in rs], 0)
    order = np.argsort(xs)
    ax.plot(xs[order], ys[order], style, label=label)

  curve(ss, "sweep", "spike-and-slab, PIP threshold sweep", "o-")
  if dn:
    curve(dn, "magnitude_sweep", "dense BNN, magnitude pruning", "s--")
  full = np.mean([r["full"][metric] for r in ss])
  ax.axhline(full, color="tab:blue", lw=0.8, ls=":", label="spike-and-slab full")
  if dn:
    ax.axhline(np.mean([r["full"][metric] for r in dn]), color="tab:orange",
               lw=0.8, ls=":", label="dense BNN full")
  nd = [r for r in recs if r["variant"] == "node_spike_slab"]
  if nd:
    ax.plot([np.mean([sum(r["nodes_kept"]) / hidden for r in nd])],
            [np.mean([r["pruned"][metric] for r in nd])], "D", color="tab:green",
            label="node spike-and-slab (Jantre), t=0.5")
  ax.set_xlabel("fraction of hidden nodes kept")
  ax.set_ylabel(f"test {metric}")
  ax.set_title(f"{name}: {metric} against nodes kept")
  ax.legend(fontsize=7)
  io.save_figure(fig, path)
  plt.close(fig)
  return path


def write_report(records: list[dict], workdir: str, title: str, notes: str = ""):
  """Writes workdir/report.md and one set of PNGs per dataset."""
  by_ds = collections.defaultdict(list)
  for r in records:
    by_ds[r["dataset"]].append(r)
  lines = [f"# {title}", "", notes, ""]
  for name, recs in by_ds.items():
    metric, rows = _rows_for(name, recs)
    r0 = recs[0]
    lines += [
        f"## {name}", "",
        f"Task: {r0['task']}, {r0['num_features']} features, widths"
        f" {r0['widths']}, seeds {sorted({r['seed'] for r in recs})}."
        " Mean ± s.d. over seeds; nodes kept per hidden layer (mean).", "",
        f"| model | test {metric} | NLL | ECE | nodes kept | features kept |"
        " feature precision | feature recall | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    ss = [r for r in recs if r["variant"] == "spike_slab"]
    if ss and ss[0].get("true_positives") is not None:
      good = sum(r["true_positives"] == len(r["true_features"])
                 and r["false_positives"] <= 1 for r in ss)
      lines += [f"All true features selected with at most one false positive"
                f" in {good} of {len(ss)} seeds.", ""]
    if ss:
      ff = np.mean([r["flops_pruned"] / r["flops_full"] for r in ss])
      tf = np.mean([r["ms_forward_pruned"] / r["ms_forward_full"] for r in ss])
      lines += [f"Pruned network: {100 * ff:.1f} % of the dense FLOPs; forward"
                f" time on the test set {100 * tf:.0f} % of the full mean"
                " network's (CPU, float32; the pruned net reads only its kept features).", ""]
    for kind, fn in (("pips", _plot_pips), ("features", _plot_features),
                     ("tradeoff", _plot_tradeoff)):
      p = fn(name, recs, os.path.join(workdir, f"{name}_{kind}.png"))
      if p:
        lines.append(f"![{name} {kind}]({os.path.basename(p)})")
    lines.append("")
  io.write_text(os.path.join(workdir, "report.md"), "\n".join(lines))
  return os.path.join(workdir, "report.md")
