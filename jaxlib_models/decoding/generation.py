"""Every decoding method as a logit processor in generation.

`generate(models, tokenizer, prompts, method)` builds the method's streams
(expert on the plain or refocused prompt, amateur behind the evil prompt or
a fine-tuned model), runs them in lock step with one KV cache each, and picks
each token from the method's fused, masked score F (brief §2.2 in "gen" mode:
SLED's eta and the -1000 plausibility mask keep implausible tokens out).
"""

import functools

from jaxlib_models.decoding import contrast
from jaxlib_models.decoding import harness
from jaxlib_models.lm.generate import GenStream
from jaxlib_models.lm.generate import generate as lm_generate


def _combine(method, num_layers, tied, has_amateur):
  def combine(outs):
    expert = {k: v[:, None] for k, v in outs[0].items()}
    amateur = ({k: v[:, None] for k, v in outs[1].items()}
               if has_amateur else None)
    f = contrast.method_logits(method.cfg, expert, amateur, num_layers, "gen",
                               tied=tied)
    return f[:, 0]
  return combine


@functools.lru_cache(maxsize=16)
def _cached_combine(method, num_layers, tied, has_amateur):
  return _combine(method, num_layers, tied, has_amateur)


def generate(models: dict, tokenizer, prompts, method: str = "base", *,
             max_new_tokens: int = 64, relative_top: float = 0.1,
             chat: bool = False, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_strings=(), progress: bool = False
             ) -> list[str]:
  """Generates with one method of the harness menu (e.g. "lol_prompt").

  Args:
    models: {"main": (cfg, params)} plus "ft" for *_ft methods.
    prompts: strings; with chat=True each is wrapped in the model's chat
      template as one user turn (the stream prefixes - refocus, evil
      prompt - go inside the user turn).
    relative_top: the plausibility alpha (DoLa's default 0.1).
  """
  (m,), streams = harness.build_methods([method], relative_top=relative_top)
  by = {s.name: s for s in streams}
  gen_streams = []
  for name in [m.expert] + ([m.amateur] if m.amateur else []):
    st = by[name]
    if st.model not in models:
      raise KeyError(f"method {method!r} needs model {st.model!r}; got"
                     f" {list(models)}")
    cfg, params = models[st.model]
    texts = [st.prompt_prefix + p for p in prompts]
    if chat:
      texts = [tokenizer.apply_chat_template(
          [{"role": "user", "content": t}], add_generation_prompt=True)
               for t in texts]
    ids = [tokenizer.encode(t) for t in texts]
    layers = m.cfg.exit_layers(cfg.num_hidden_layers, cfg.tie_word_embeddings)
    gen_streams.append(GenStream(cfg, params, ids, tuple(layers)))
  cfg0 = gen_streams[0].cfg
  combine = _cached_combine(m, cfg0.num_hidden_layers,
                            cfg0.tie_word_embeddings, m.amateur is not None)
  out = lm_generate(gen_streams, max_new_tokens=max_new_tokens,
                    combine=combine, temperature=temperature, top_p=top_p,
                    seed=seed, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id or 0, stop_strings=stop_strings,
                    tokenizer=tokenizer, progress=progress)
  return [tokenizer.decode(o, skip_special=True) for o in out]
