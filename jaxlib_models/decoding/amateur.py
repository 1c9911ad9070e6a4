"""Fine-tuned "amateur" models for ICD/LOL: data, training task, export.

ICD fine-tunes a copy of the model on hallucinated outputs (HaluEval) so that
its next-token distribution leans towards falsehoods; the contrast with the
original then down-weights them. Two data sources:

* a user's JSONL of (instruction, hallucinated answer) pairs in the HaluEval
  layouts (qa, dialogue, summarization, general) or plain
  {"instruction", "output"} lines;
* offline and honest: *cross-fitted* TruthfulQA amateurs. Categories are
  split into two folds (sorted names, alternating); the amateur for fold f is
  trained on the incorrect answers of the other fold's questions only, and is
  used to score fold f, so it never sees a question it is evaluated on.

Training uses the foundation's sharded train step (`core.trainer`): the loss is
the mean NLL of the answer tokens given the instruction, the starting point is
the pretrained model (`Task.pretrained`), and the result is exported as a HF
folder (config.json + model.safetensors + tokenizer) that the scoring engine
and transformers both load.
"""

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core import trainer
from jaxlib_models.lm import config as lm_config
from jaxlib_models.lm.model import forward, init_params


@dataclasses.dataclass(frozen=True)
class Pair:
  instruction: str  # the prompt, e.g. "Q: ...\nA:"
  answer: str  # the (hallucinated) continuation, starting with a space


_LAYOUTS = (  # (instruction keys, answer key) of HaluEval's files
    (("knowledge", "question"), "hallucinated_answer"),
    (("knowledge", "dialogue_history"), "hallucinated_response"),
    (("document",), "hallucinated_summary"),
    (("instruction",), "output"),
    (("instruction",), "hallucinated_answer"),
    (("question",), "hallucinated_answer"),
)


def load_jsonl_pairs(path: str) -> list[Pair]:
  """Reads (instruction, hallucinated answer) pairs; errors name the line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"amateur data {path} does not exist")
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object per line")
      for keys, ans in _LAYOUTS:
        if ans in row and keys[-1] in row:
          parts = [str(row[k]) for k in keys if row.get(k)]
          instr = "\n".join(parts[:-1] + [f"Q: {parts[-1]}\nA:"])
          answer = str(row[ans]).strip()
          if not answer:
            raise ValueError(f"{path}:{n}: empty {ans!r}")
          pairs.append(Pair(instr, " " + answer))
          break
      else:
        raise ValueError(
            f"{path}:{n}: no known layout; keys {sorted(row)}; expected e.g."
            " {question, hallucinated_answer} (HaluEval qa),"
            " {dialogue_history, hallucinated_response}, {document,"
            " hallucinated_summary} or {instruction, output}"
        )
  if not pairs:
    raise ValueError(f"{path}: no pairs found")
  return pairs


def category_folds(categories: Sequence[str], n_folds: int = 2) -> dict:
  """category -> fold: sorted unique names, assigned alternately."""
  return {c: i % n_folds for i, c in enumerate(sorted(set(categories)))}


def tqa_crossfit_pairs(items, train_fold: int, n_folds: int = 2) -> list[Pair]:
  """Incorrect TruthfulQA answers of the questions in `train_fold`."""
  folds = category_folds([it.category for it in items], n_folds)
  pairs = []
  for it in items:
    if folds[it.category] != train_fold:
      continue
    for a in it.false_answers:
      pairs.append(Pair(f"Q: {it.question}\nA:", " " + a))
  return pairs


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_len: int):
  """(N, max_len) tokens and a loss mask on the answer tokens (targets)."""
  n = len(pairs)
  tokens = np.zeros((n, max_len), np.int32)
  loss_mask = np.zeros((n, max_len), bool)
  valid = np.zeros((n, max_len), bool)
  eos = getattr(tokenizer, "eos_id", None)
  for i, p in enumerate(pairs):
    a = tokenizer.encode(p.instruction)
    full = tokenizer.encode(p.instruction + p.answer)
    if full[: len(a)] != a:  # BPE merge across the boundary: encode apart
      full = a + tokenizer.encode(p.answer)
    if eos is not None:
      full = full + [eos]
    n_a = len(a)
    if len(full) > max_len:  # cut the instruction from the left
      drop = len(full) - max_len
      full, n_a = full[drop:], max(1, n_a - drop)
    tokens[i, : len(full)] = full
    valid[i, : len(full)] = True
    # logits at t predict token t+1: the answer tokens n_a.. are targets
    loss_mask[i, n_a - 1 : len(full) - 1] = True
  return tokens, valid, loss_mask


def loss_fn(cfg: lm_config.LlamaConfig):
  def fn(params, batch, rng, step):
    del rng, step
    out = forward(params, cfg, batch["tokens"], token_mask=batch["valid"])
    lp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), -1)
    tgt = batch["tokens"][:, 1:]
    nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    m = batch["loss_mask"][:, :-1].astype(jnp.float32)
    loss = (nll * m).sum() / jnp.maximum(m.sum(), 1.0)
    return loss, {"nll": loss, "tokens": m.sum()}

  return fn


def make_task(
    cfg,
    base_params,
    pairs,
    tokenizer,
    tc: trainer.TrainConfig,
    max_len: int = 64,
    seed: int = 0,
) -> trainer.Task:
  tokens, valid, loss_mask = encode_pairs(pairs, tokenizer, max_len)
  n = len(tokens)
  if n < tc.batch_size:
    raise ValueError(f"{n} training pairs < batch size {tc.batch_size}")

  def batches(start: int) -> Iterator[dict]:
    per_epoch = n // tc.batch_size
    step = start
    while True:
      epoch, i = divmod(step, per_epoch)
      order = np.random.default_rng(seed + epoch).permutation(n)
      idx = order[i * tc.batch_size : (i + 1) * tc.batch_size]
      yield {
          "tokens": tokens[idx],
          "valid": valid[idx],
          "loss_mask": loss_mask[idx],
      }
      step += 1

  return trainer.Task(
      init_params=lambda rng: init_params(cfg, rng),
      loss_fn=loss_fn(cfg),
      param_axes=lm_config.param_axes(cfg),
      batches=batches,
      meta={"pairs": n, "max_len": max_len},
      pretrained=lambda: base_params,
  )


def export(folder: str, cfg, params, tokenizer=None) -> str:
  """Writes a HF folder (atomic files) that `lm.loaders.load_hf` reads."""
  from jaxlib_models.lm import loaders

  loaders.save_hf(folder, cfg, jax.device_get(params))
  if tokenizer is not None and hasattr(tokenizer, "save"):
    tokenizer.save(folder)
  return folder
