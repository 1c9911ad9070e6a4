r"""TruthfulQA-MC and FACTOR for the contrastive decoding family (row 2).

Full table (SmolLM2-135M-Instruct, all 817 questions, FACTOR news + expert;
needs the cross-fitted amateurs of configs/decoding/amateur.py):

  python -m eval --config=configs/decoding/eval.py --workdir=runs/decoding

Variants: "" (everything), tqa (TruthfulQA only), factor (FACTOR only),
lol (LOL with the prompt amateur on TruthfulQA: the 45-minute budget check),
smoke (5 questions, methods that need no training: CI), tiny (a tiny random
model, 3 questions: unit tests).

Methods (see jaxlib_models/decoding/harness.py): base, dola, sled,
icd_prompt, icd_ft, lol_prompt, lol_ft, cd; "+ps" adds post_softmax=True.
Absolute SmolLM2 scores sit near chance; they are for deltas and
equivalence, not for comparison with 7B papers. Runtime on a 2-core CPU:
see eval/RESULTS.md.
"""

import ml_collections

ALL = ("base", "base+ps", "dola", "dola+ps", "sled", "sled+ps", "icd_prompt",
       "icd_prompt+ps", "icd_ft", "icd_ft+ps", "lol_prompt", "lol_prompt+ps",
       "lol_ft", "lol_ft+ps")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "decoding"
  c.model = "smollm2"
  c.small_model = ""  # a smaller model with the same tokenizer, for "cd"
  c.methods = ALL
  c.tasks = ("truthfulqa", "factor_news_official", "factor_expert_official")
  c.limit = 0  # 0 = every question / row
  c.relative_top_tqa = 0.0  # ICD's TruthfulQA script; paper value unknown
  c.relative_top_factor = 0.1  # DoLa's default; paper value unknown
  # DoLa's premature-layer bucket: "high" on TruthfulQA, "low" on FACTOR
  # (DoLa's own scripts: {16..30} vs {0..14} on 32-layer LLaMA).
  c.dola_bucket_factor = "low"
  c.amateur = dict(crossfit_dir="runs/amateur")
  c.progress = True
  arg = arg or ""
  if arg == "tqa":
    c.tasks = ("truthfulqa",)
  elif arg == "factor":
    c.tasks = ("factor_news_official", "factor_expert_official",
               "factor_expert_dola")
  elif arg == "lol":
    c.tasks = ("truthfulqa",)
    c.methods = ("lol_prompt",)
    c.amateur.crossfit_dir = ""
  elif arg == "smoke":
    c.tasks = ("truthfulqa", "factor_expert_official")
    c.methods = ("base", "dola", "icd_prompt", "lol_prompt", "lol_prompt+ps")
    c.limit = 5
    c.amateur.crossfit_dir = ""
    c.progress = False
  elif arg == "tiny":
    c.model = "tiny"
    c.dola_bucket_factor = "high"  # the low bucket is empty for 4 layers
    c.tasks = ("truthfulqa", "factor_expert_official")
    c.methods = ("base", "dola", "sled", "icd_prompt", "lol_prompt")
    c.limit = 3
    c.amateur.crossfit_dir = ""
    c.progress = False
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: tqa, factor, lol, smoke,"
                     " tiny")
  return c
