"""Byte-level causal-LM pretraining on an offline text corpus.

The corpus is the Python standard library's own source, which every machine
with Python has: the `.py` files under `sysconfig.get_paths()["stdlib"]`
(tests and site-packages excluded), sorted by path so the corpus is the same
on every run. Files whose path hash falls in 1 of 20 buckets are held out
for validation, never trained on. Tokens are bytes (vocabulary 256), so no
tokenizer file is needed.

Batches are windows at offsets drawn from `seed` and the step number, so a
run resumed at step s sees exactly the batches an uninterrupted run sees
from step s on (the data position is the step; nothing else to save).

This is the model of the communication study (`benchmarks/comm_study.py`)
and of `python -m train --config=configs/lm/pretrain.py`.
"""

import functools
import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core import trainer
from jaxlib_models.lm import config as lm_config
from jaxlib_models.lm.model import forward, init_params

VOCAB = 256


def corpus_files(root: str | None = None) -> list[str]:
  """Sorted stdlib `.py` paths (no tests, no site-packages)."""
  root = root or sysconfig.get_paths()["stdlib"]
  files = [
      f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
      if "site-packages" not in f and f"{os.sep}test" not in f[len(root):]
  ]
  if not files:
    raise FileNotFoundError(
        f"no .py files under {root}; pass corpus_root= a folder of text files")
  return sorted(files)


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None, max_bytes: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) uint8 byte arrays of the corpus.

  `max_bytes` > 0 keeps the first files up to that many bytes (both splits
  together), for tiny configs.
  """
  train, val, total = [], [], 0
  for f in corpus_files(root):
    with open(f, "rb") as fh:
      data = fh.read()
    rel = os.path.relpath(f, root or sysconfig.get_paths()["stdlib"])
    held = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0
    (val if held else train).append(data)
    total += len(data)
    if max_bytes and total >= max_bytes:
      break
  if not val:  # tiny corpora: hold out the last file
    val.append(train.pop())
  cat = lambda xs: np.frombuffer(b"\n".join(xs), np.uint8)
  return cat(train), cat(val)


def windows(data: np.ndarray, seq_len: int, n: int, seed: int) -> np.ndarray:
  """n random windows of seq_len + 1 bytes (inputs and shifted targets)."""
  if len(data) <= seq_len + 1:
    raise ValueError(f"corpus of {len(data)} bytes is shorter than seq_len+1={seq_len + 1}")
  starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, n)
  return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def loss_fn(cfg: lm_config.LlamaConfig):
  """Mean next-byte NLL (nats) over all positions of the batch."""

  def fn(params, batch, rng, step):
    del rng, step
    tokens = batch["tokens"]
    out = forward(params, cfg, tokens[:, :-1])
    lp = jax.nn.log_softmax(out.logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
    loss = nll.mean()
    return loss, {"bits_per_byte": loss / jnp.log(2.0)}

  return fn


def eval_loss(params, cfg, val: np.ndarray, seq_len: int, n: int = 64,
              seed: int = 1234, batch: int = 16) -> float:
  """Mean held-out NLL on n fixed validation windows."""
  w = windows(val, seq_len, n, seed)
  f = jax.jit(lambda p, t: loss_fn(cfg)(p, {"tokens": t}, None, None)[0])
  return float(np.mean([f(params, w[i : i + batch]) for i in range(0, n, batch)]))


def make_task(cfg: lm_config.LlamaConfig, tc: trainer.TrainConfig,
              seq_len: int = 128, seed: int = 0, corpus_root: str | None = None,
              max_bytes: int = 0) -> trainer.Task:
  if cfg.vocab_size != VOCAB:
    raise ValueError(f"byte-level pretraining needs vocab_size={VOCAB}, got {cfg.vocab_size}")
  train_bytes, _ = load_corpus(corpus_root, max_bytes)

  def batches(start: int) -> Iterator[dict]:
    step = start
    while True:
      yield {"tokens": windows(train_bytes, seq_len, tc.batch_size,
                               seed * 1_000_003 + step)}
      step += 1

  return trainer.Task(
      init_params=lambda rng: init_params(cfg, rng),
      loss_fn=loss_fn(cfg),
      param_axes=lm_config.param_axes(cfg),
      batches=batches,
      meta={"corpus_bytes": int(len(train_bytes)), "seq_len": seq_len},
  )


def model_config(d: dict) -> lm_config.LlamaConfig:
  """A small Llama config (byte vocabulary) from a config section."""
  return lm_config.LlamaConfig(
      vocab_size=VOCAB, hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"],
      num_key_value_heads=d["num_kv_heads"], rope_theta=10000.0,
      max_position_embeddings=max(2048, d.get("seq_len", 128)),
      tie_word_embeddings=d.get("tie_word_embeddings", True))
