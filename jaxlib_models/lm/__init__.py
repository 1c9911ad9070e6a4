"""Llama-family causal LM: model, loaders, tokenizer, generation."""

from jaxlib_models.lm.config import LlamaConfig, param_axes, smollm2_135m
from jaxlib_models.lm.model import (KVCache, LMOutput, abstract_params,
                                    forward, init_cache, init_params,
                                    logits_fn, token_nll)
