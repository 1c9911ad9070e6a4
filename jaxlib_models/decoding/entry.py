"""Library side of `python -m train` / `python -m eval` for decoding.

train: fine-tunes an ICD/LOL amateur (HaluEval-style JSONL, or the
  cross-fitted TruthfulQA fold) on the foundation's sharded train step and
  exports it as a HF folder `<workdir>/hf`.
eval: TruthfulQA-MC or FACTOR for a list of methods; writes JSON, JSONL per
  question (resumable), a markdown report and a bar plot.
"""

import json
import os

import ml_collections

from jaxlib_models.core import io
from jaxlib_models.core import trainer
from jaxlib_models.decoding import amateur as amateur_lib
from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import harness
from jaxlib_models.decoding import report
from jaxlib_models.decoding.config import DolaConfig
from jaxlib_models.lm import registry


def train_main(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Fine-tunes the amateur; returns the exported HF folder."""
  cfg, params, tok = registry.load(config.model)
  src = config.data.source
  if src == "tqa_crossfit":
    items = data_lib.load_truthfulqa()
    pairs = amateur_lib.tqa_crossfit_pairs(items, config.data.train_fold)
  elif src == "jsonl":
    pairs = amateur_lib.load_jsonl_pairs(config.data.path)
  else:
    raise ValueError(f"data.source={src!r}: choose tqa_crossfit or jsonl")
  tc = trainer.TrainConfig.from_dict(config.train.to_dict())
  task = amateur_lib.make_task(cfg, params, pairs, tok, tc,
                               max_len=config.data.max_len,
                               seed=config.data.seed)
  task.meta.update({"model": config.model, "source": src,
                    "train_fold": config.data.get("train_fold")})
  state = trainer.train(task, tc, workdir, config_json=config.to_json())
  out = amateur_lib.export(os.path.join(workdir, "hf"), cfg, state.params,
                           tok)
  io.write_json(os.path.join(workdir, "amateur.json"),
                {"pairs": len(pairs), "steps": tc.num_steps, "hf": out,
                 **task.meta})
  print(f"amateur exported to {out} ({len(pairs)} pairs)", flush=True)
  return out


def _amateur_loader(config):
  root = config.amateur.crossfit_dir
  if not root:
    return None

  def for_fold(eval_fold: int):
    train_fold = 1 - eval_fold
    path = os.path.join(root, f"train_fold{train_fold}", "hf")
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"cross-fitted amateur {path} is missing: train it with"
          " python -m train --config=configs/decoding/amateur.py:fold"
          f"{train_fold} --workdir={os.path.join(root, f'train_fold{train_fold}')}")
    cfg, params, _ = registry.load("hf:" + path)
    return cfg, params

  return for_fold


def eval_main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg, params, tok = registry.load(config.model)
  models = {"main": (cfg, params)}
  if config.get("small_model"):
    c2, p2, _ = registry.load(config.small_model)
    models["small"] = (c2, p2)
  methods = list(config.methods)
  loader = _amateur_loader(config)
  results = {}
  for task in config.tasks:
    if task == "truthfulqa":
      res = harness.run_truthfulqa(
          models, tok, workdir, methods=methods, limit=config.limit or None,
          relative_top=config.relative_top_tqa, amateur_for_fold=loader,
          progress=config.progress)
    elif task.startswith("factor_"):
      _, split, protocol = task.split("_")
      res = harness.run_factor(
          models, tok, workdir, split=split, protocol=protocol,
          methods=methods, limit=config.limit or None,
          relative_top=config.relative_top_factor,
          overrides={"dola": {"dola": DolaConfig(
              bucket=config.get("dola_bucket_factor", "low"))}},
          amateur=loader(0) if loader and any(
              m.split("+")[0].endswith("_ft") for m in methods) else None,
          progress=config.progress)
    else:
      raise ValueError(f"unknown task {task!r}: truthfulqa,"
                       " factor_news_official, factor_expert_dola, ...")
    results[task] = res
  path = report.write_report(workdir)
  print(json.dumps({t: {m: v.get("overall", v.get("accuracy"))
                        for m, v in r["methods"].items()}
                    for t, r in results.items()}, indent=1), flush=True)
  print(f"report: {path}", flush=True)
  return results
