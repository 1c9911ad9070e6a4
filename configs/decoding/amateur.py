r"""Fine-tune an ICD/LOL amateur (hallucination-induced copy of the model).

Cross-fitted TruthfulQA amateurs (honest offline numbers: each is used only
on the other fold's categories, never on questions it saw):

  python -m train --config=configs/decoding/amateur.py:fold0 \
      --workdir=runs/amateur/train_fold0
  python -m train --config=configs/decoding/amateur.py:fold1 \
      --workdir=runs/amateur/train_fold1

Your own HaluEval-style JSONL (qa/dialogue/summarization layouts or
{instruction, output} lines):

  python -m train --config=configs/decoding/amateur.py:jsonl \
      --config.data.path=halueval_qa.jsonl --workdir=runs/amateur/halueval

fold0/fold1: SmolLM2-135M, 120 steps of batch 16 (about 1 epoch of ~1.7k
pairs), about 5 min each on a 2-core CPU. tiny: a tiny random model, 4 steps,
seconds (tests). The result is a HF folder <workdir>/hf.
"""

import ml_collections

from jaxlib_models.core.trainer import parallel_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "decoding"
  c.model = "smollm2"
  c.data = dict(source="tqa_crossfit", train_fold=0, path="", max_len=48,
                seed=0)
  c.train = dict(num_steps=120, batch_size=16, learning_rate=3e-5,
                 optimizer="adam", grad_clip=1.0, log_every=10,
                 checkpoint_every=60, keep_checkpoints=1,
                 async_checkpoint=False, **parallel_defaults())
  arg = arg or "fold0"
  if arg.startswith("fold"):
    c.data.train_fold = int(arg[4:])
  elif arg == "jsonl":
    c.data.source = "jsonl"
  elif arg.startswith("tiny"):
    c.model = "tiny"
    c.data.train_fold = int(arg[4:] or 0)
    c.train.num_steps = 4
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.train.progress = False
  else:
    raise ValueError(f"unknown variant {arg!r}: fold0, fold1, jsonl, tiny")
  return c
