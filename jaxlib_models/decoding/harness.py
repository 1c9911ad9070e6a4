"""TruthfulQA-MC and FACTOR evaluation of every decoding method in one pass.

The harness names methods from a fixed menu (`METHODS`), maps each to its
expert and amateur *streams* and lets `engine.ScoringEngine` score all of
them from one set of forward passes per question. Results are appended per
question to a JSONL file (a killed run resumes where it stopped), then
aggregated into JSON, a markdown table and bar plots.

Method names: base, dola, sled, icd_prompt, icd_ft, lol_prompt, lol_ft, and
cd (needs a smaller model "small"); a "+ps" suffix is the same method with
`post_softmax=True` (brief §7.1: both settings are always worth reporting).
"*_ft" methods use the cross-fitted fine-tuned amateur: a question of fold f
is scored against the amateur trained on the other fold's incorrect answers.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxlib_models.core import io
from jaxlib_models.decoding import amateur as amateur_lib
from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import metrics as metrics_lib
from jaxlib_models.decoding.config import DecodingConfig
from jaxlib_models.decoding.engine import Method, ScoringEngine, Stream

BASE_METHODS = (
    "base",
    "dola",
    "sled",
    "icd_prompt",
    "icd_ft",
    "lol_prompt",
    "lol_ft",
    "cd",
)
# Methods that take the plausibility mask (relative_top).
MASKED_METHODS = ("dola", "icd", "lol", "cd")
# cd needs a smaller model with the same tokenizer (none ships offline).
DEFAULT_METHODS = tuple(m for m in BASE_METHODS if m != "cd")


def _split(name: str) -> tuple[str, bool]:
  ps = name.endswith("+ps")
  base = name[:-3] if ps else name
  if base not in BASE_METHODS:
    raise ValueError(
        f"unknown method {name!r}; choose from {BASE_METHODS}"
        " (optionally with a '+ps' suffix for post_softmax)"
    )
  return base, ps


def build_methods(
    names: Sequence[str],
    *,
    relative_top: float,
    mc2_mode: str = "reference",
    overrides: dict | None = None,
) -> tuple[list, list]:
  """(methods, streams) for the engine from menu names.

  `relative_top` (the plausibility alpha) applies to the contrastive methods
  only (dola, icd, lol, cd), as in DoLa's and ICD's scoring code: the
  baseline is plain log-likelihood and SLED has its own eta outside the top-k
  (a -1000 mask on base would score answers by their count of implausible
  tokens).
  """
  overrides = overrides or {}
  methods, streams = [], {}
  for name in names:
    base, ps = _split(name)
    kind = base.split("_")[0]
    kw = dict(
        method=kind,
        relative_top=relative_top if kind in MASKED_METHODS else 0.0,
        post_softmax=ps,
        mc2_mode=mc2_mode,
    )
    if base.endswith("_ft"):
      kw["amateur"] = "model"
    elif kind == "cd":
      kw["amateur"] = "smaller_model"
    kw.update(overrides.get(kind, {}))
    cfg = DecodingConfig(**kw)
    expert = "plain"
    if kind == "lol" and cfg.lol.refocus_on in ("expert", "both"):
      expert = "refocus"
      streams[expert] = Stream(
          expert, "main", cfg.lol.refocus_text + cfg.prompt_sep
      )
    else:
      streams["plain"] = Stream("plain", "main", "")
    amateur = None
    if cfg.needs_amateur:
      if cfg.amateur == "prompt":
        amateur = "evil"
        pre = cfg.evil_prompt + cfg.prompt_sep
        if kind == "lol" and cfg.lol.refocus_on == "both":
          amateur = "evil_refocus"
          pre += cfg.lol.refocus_text + cfg.prompt_sep
        streams[amateur] = Stream(amateur, "main", pre)
      elif cfg.amateur == "model":
        amateur = "ft"
        streams["ft"] = Stream("ft", "ft", "")
      else:
        amateur = "small"
        streams["small"] = Stream("small", "small", "")
    methods.append(Method(name, cfg, expert, amateur))
  return methods, list(streams.values())


def _needs(methods, model: str, streams) -> bool:
  by = {s.name: s for s in streams}
  return any(
      by[m.expert].model == model
      or (m.amateur and by[m.amateur].model == model)
      for m in methods
  )


def _read_done(path: str) -> dict:
  done = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          break  # a torn last line from a kill: redo that question
        done[rec["idx"]] = rec
  return done


def _append(f, rec):
  f.write(json.dumps(rec) + "\n")
  f.flush()
  os.fsync(f.fileno())


def _rewrite(path: str, done: dict):
  """Drops a torn tail so appends continue on a clean line."""
  io.write_text(path, "".join(json.dumps(done[k]) + "\n" for k in sorted(done)))


def run_truthfulqa(
    models: dict,
    tokenizer,
    out_dir: str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    items: Sequence[data_lib.TQAItem] | None = None,
    limit: int | None = None,
    relative_top: float = 0.0,
    amateur_for_fold: Callable[[int], tuple] | None = None,
    max_tokens: int = 512,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
  """Scores TruthfulQA-MC (DoLa/ICD protocol) for every method.

  Args:
    models: {"main": (cfg, params)} and optionally "small" (for cd).
    out_dir: results land in truthfulqa.jsonl (per question, resumable)
      and truthfulqa.json (aggregate).
    amateur_for_fold: eval fold -> (cfg, params) of the amateur that never
      saw that fold (needed by *_ft methods).
    limit: score only the first `limit` questions (smoke runs).
  """
  items = list(items if items is not None else data_lib.load_truthfulqa())
  if limit:
    items = items[:limit]
  ms, streams = build_methods(
      methods, relative_top=relative_top, overrides=overrides
  )
  uses_ft = _needs(ms, "ft", streams)
  if uses_ft and amateur_for_fold is None:
    raise ValueError(
        "methods "
        + ", ".join(m.name for m in ms if m.amateur == "ft")
        + " need amateur_for_fold (cross-fitted amateurs);"
        " train them with configs/decoding/amateur.py"
    )
  folds = amateur_lib.category_folds(
      [it.category for it in data_lib.load_truthfulqa()]
      if items and len(items) < 817
      else [it.category for it in items]
  )
  os.makedirs(out_dir, exist_ok=True)
  part = os.path.join(out_dir, "truthfulqa.jsonl")
  done = _read_done(part)
  _rewrite(part, done)
  by_fold = {}
  for i, it in enumerate(items):
    by_fold.setdefault(folds.get(it.category, 0) if uses_ft else 0, []).append(
        i
    )
  bar = tqdm(
      total=len(items),
      initial=sum(i in done for i in range(len(items))),
      disable=not progress,
      desc="truthfulqa",
      unit="q",
  )
  t0 = time.time()
  n_new = 0
  with open(part, "a", encoding="utf-8") as f:
    for fold in sorted(by_fold):
      todo = [i for i in by_fold[fold] if i not in done]
      if not todo:
        continue
      mdl = dict(models)
      if uses_ft:
        mdl["ft"] = amateur_for_fold(fold)
      eng = ScoringEngine(
          mdl,
          tokenizer,
          streams,
          ms,
          shared_text=data_lib.TQA_PROMPT_PREFIX,
          max_len=768,
          max_tokens=max_tokens,
      )
      for i in todo:
        it = items[i]
        cands = [
            data_lib.tqa_continuation(a)
            for a in it.true_answers + it.false_answers
        ]
        res = eng.score(data_lib.build_tqa_prompt(it.question), cands)
        nt = len(it.true_answers)
        rec = {
            "idx": i,
            "category": it.category,
            "fold": fold,
            "question": it.question,
            "scores": {},
            "metrics": {},
        }
        best = it.true_answers.index(it.best)
        for m in ms:
          s = res[m.name][0]
          rec["scores"][m.name] = [float(x) for x in s]
          r = metrics_lib.mc_scores(s[:nt], s[nt:], best, "reference")
          r["mc2_logsumexp"] = metrics_lib.mc_scores(
              s[:nt], s[nt:], best, "logsumexp"
          )["mc2"]
          rec["metrics"][m.name] = r
        _append(f, rec)
        done[i] = rec
        n_new += 1
        bar.update(1)
  bar.close()
  elapsed = time.time() - t0
  recs = [done[i] for i in range(len(items)) if i in done]
  out = {
      "dataset": "TruthfulQA-MC (DoLa/ICD protocol)",
      "n": len(recs),
      "relative_top": relative_top,
      "methods": {},
      "seconds_this_run": elapsed,
      "questions_this_run": n_new,
  }
  for m in ms:
    agg = metrics_lib.aggregate(
        [r["metrics"][m.name] for r in recs], [r["category"] for r in recs]
    )
    out["methods"][m.name] = {"config": _cfg_summary(m), **agg}
  io.write_json(os.path.join(out_dir, "truthfulqa.json"), out)
  return out


def _cfg_summary(m: Method) -> dict:
  c = m.cfg
  d = {
      "method": c.method,
      "post_softmax": c.post_softmax,
      "relative_top": c.relative_top,
      "expert": m.expert,
      "amateur": m.amateur,
  }
  if c.method == "lol":
    d["lol"] = {
        k: v
        for k, v in dataclasses.asdict(c.lol).items()
        if k != "refocus_text"
    }
  return d


def run_factor(
    models: dict,
    tokenizer,
    out_dir: str,
    *,
    split: str = "news",
    protocol: str = "official",
    methods: Sequence[str] = DEFAULT_METHODS,
    limit: int | None = None,
    relative_top: float = 0.1,
    amateur: tuple | None = None,
    max_tokens: int = 512,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
  """FACTOR accuracy of every method under one protocol (brief §5).

  "official": mean per-token score of the truncated prefix (left-cut at
  1024 tokens), argmin-NLL with ties winning; "dola": summed scores with
  ">=". `amateur` is the fine-tuned amateur for *_ft methods (any fold:
  it never saw FACTOR).
  """
  items = data_lib.load_factor(split)
  if limit:
    items = items[:limit]
  ms, streams = build_methods(
      methods, relative_top=relative_top, overrides=overrides
  )
  mdl = dict(models)
  if _needs(ms, "ft", streams):
    if amateur is None:
      raise ValueError("*_ft methods need the fine-tuned amateur")
    mdl["ft"] = amateur
  tag = f"factor_{split}_{protocol}"
  os.makedirs(out_dir, exist_ok=True)
  part = os.path.join(out_dir, tag + ".jsonl")
  done = _read_done(part)
  _rewrite(part, done)
  eng = ScoringEngine(
      mdl,
      tokenizer,
      streams,
      ms,
      max_len=1024 + 160,
      max_tokens=max_tokens,
      len_bucket=32,
      truncate_left=1024 if protocol == "official" else None,
      boundary=("separate" if protocol == "official" else "joint_or_separate"),
  )
  t0 = time.time()
  n_new = 0
  with open(part, "a", encoding="utf-8") as f:
    for i in tqdm(
        [i for i in range(len(items)) if i not in done],
        disable=not progress,
        desc=tag,
        unit="row",
    ):
      prompt, conts = data_lib.factor_pairs(items[i], protocol, split)
      res = eng.score(prompt, conts)
      rec = {"idx": i, "scores": {}, "correct": {}}
      for m in ms:
        s, n = res[m.name]
        if protocol == "official":
          val = -(s / n)  # mean NLL-like: lower is better
        else:
          val = s
        rec["scores"][m.name] = [float(x) for x in val]
        rec["correct"][m.name] = bool(metrics_lib.factor_correct(val, protocol))
      _append(f, rec)
      done[i] = rec
      n_new += 1
  recs = [done[i] for i in range(len(items)) if i in done]
  out = {
      "dataset": f"FACTOR {split}",
      "protocol": protocol,
      "n": len(recs),
      "relative_top": relative_top,
      "seconds_this_run": time.time() - t0,
      "rows_this_run": n_new,
      "methods": {},
  }
  for m in ms:
    acc = float(np.mean([r["correct"][m.name] for r in recs])) * 100
    out["methods"][m.name] = {"config": _cfg_summary(m), "accuracy": acc}
  io.write_json(os.path.join(out_dir, tag + ".json"), out)
  return out
