"""Markdown table and bar plots from the harness's JSON results."""

import glob
import json
import os

from jaxlib_models.core import io


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_report(workdir: str, title: str = "Contrastive decoding results"
                 ) -> str:
  """Writes report.md (+ truthfulqa.png, factor.png) from *.json results."""
  lines = [f"# {title}", ""]
  tqa_path = os.path.join(workdir, "truthfulqa.json")
  tqa = _load(tqa_path) if os.path.exists(tqa_path) else None
  factor = {os.path.basename(p)[:-5]: _load(p) for p in
            sorted(glob.glob(os.path.join(workdir, "factor_*.json")))}
  if tqa:
    lines += [f"## TruthfulQA-MC ({tqa['n']} questions, DoLa/ICD protocol,"
              f" relative_top {tqa['relative_top']})", "",
              "MC2 uses the reference underflow rule; MC2-lse is the exact"
              " logsumexp ratio.", "",
              "| method | post_softmax | MC1 | MC2 | MC3 | MC2-lse |",
              "|---|---|---:|---:|---:|---:|"]
    for name, r in tqa["methods"].items():
      o = r["overall"]
      lines.append(f"| {name} | {r['config']['post_softmax']} |"
                   f" {o['mc1']:.2f} | {o['mc2']:.2f} | {o['mc3']:.2f} |"
                   f" {o['mc2_logsumexp']:.2f} |")
    lines += ["", f"Wall time of the last run: {tqa['seconds_this_run']:.0f} s"
              f" for {tqa['questions_this_run']} questions.", ""]
    _plot_tqa(tqa, os.path.join(workdir, "truthfulqa.png"))
    lines += ["![TruthfulQA](truthfulqa.png)", ""]
    cats = None
    for name, r in tqa["methods"].items():
      if "per_category" in r:
        cats = sorted(r["per_category"], key=lambda c: -r["category_counts"][c])
        break
    if cats:
      names = list(tqa["methods"])
      lines += ["### MC1 per category", "",
                "| category | n | " + " | ".join(names) + " |",
                "|---|---:|" + "---:|" * len(names)]
      for c in cats:
        n = tqa["methods"][names[0]]["category_counts"][c]
        vals = " | ".join(f"{tqa['methods'][m]['per_category'][c]['mc1']:.0f}"
                          for m in names)
        lines.append(f"| {c} | {n} | {vals} |")
      lines.append("")
  if factor:
    names = []
    for r in factor.values():
      names += [m for m in r["methods"] if m not in names]
    lines += ["## FACTOR accuracy (%)", "",
              "| split / protocol | n | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for tag, r in factor.items():
      vals = " | ".join(f"{r['methods'][m]['accuracy']:.2f}"
                        if m in r["methods"] else "-" for m in names)
      lines.append(f"| {r['dataset']} / {r['protocol']} | {r['n']} |"
                   f" {vals} |")
    lines += ["", "official = AI21 eval_factuality.py (mean NLL, ties win);"
              " dola = DoLa factor_eval.py (summed scores, >=).", ""]
    _plot_factor(factor, names, os.path.join(workdir, "factor.png"))
    lines += ["![FACTOR](factor.png)", ""]
  path = os.path.join(workdir, "report.md")
  io.write_text(path, "\n".join(lines))
  return path


def _plot_tqa(tqa, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  names = list(tqa["methods"])
  keys = ("mc1", "mc2", "mc3")
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.6))
  for i, k in enumerate(keys):
    ax.bar(x + (i - 1) * 0.27, [tqa["methods"][m]["overall"][k]
                                for m in names], 0.27, label=k.upper())
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel("score (%)")
  ax.set_title(f"TruthfulQA-MC, {tqa['n']} questions")
  ax.legend()
  fig.tight_layout()
  io.save_figure(fig, path)
  plt.close(fig)


def _plot_factor(factor, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  tags = list(factor)
  x = np.arange(len(names))
  w = 0.8 / max(1, len(tags))
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.6))
  for i, t in enumerate(tags):
    r = factor[t]
    ax.bar(x + (i - (len(tags) - 1) / 2) * w,
           [r["methods"].get(m, {}).get("accuracy", 0) for m in names], w,
           label=f"{r['dataset']} ({r['protocol']})")
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  io.save_figure(fig, path)
  plt.close(fig)
