"""Shared-prefix multiple-choice scoring for every decoding method at once.

A *stream* is one model reading one version of the prompt: the expert on the
plain prompt, the expert on the refocused prompt, the same weights behind an
evil prompt (ICD's prompt amateur), a fine-tuned amateur on the plain prompt.
A *method* names an expert stream, an optional amateur stream and a
`DecodingConfig`. For one question the engine

1. tokenizes every stream's prompt P_s and P_s + C for each candidate C,
   asserts the prefix property and that all streams see the same
   continuation ids c (so rows line up token by token, brief §2.2–2.3);
2. reuses a KV cache of the prefix shared by the whole dataset (the few-shot
   block), prefills the question-specific rest once per stream, and
3. runs all candidates of the question as one padded batch per stream
   against that read-only cache, with the union of the exit layers its
   methods need, then computes every method's scores inside the same jit.

Candidates are packed into one row (segment ids keep them apart) and shapes are
bucketed (packed length to a multiple of `flat_bucket`,
lengths to multiples of `len_bucket`) so a whole dataset compiles a handful
of programs.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.decoding import contrast
from jaxlib_models.decoding.config import DecodingConfig
from jaxlib_models.lm.config import LlamaConfig
from jaxlib_models.lm.model import KVCache, forward, head_logits, init_cache


class TokenizationError(ValueError):
  """The prompt/continuation boundary or stream alignment is broken."""


@dataclasses.dataclass(frozen=True)
class Stream:
  """One model reading one version of the prompt."""

  name: str
  model: str  # key of `models` passed to the engine
  prompt_prefix: str = ""  # text prepended to every prompt (refocus, evil)


@dataclasses.dataclass(frozen=True)
class Method:
  """A scored method: expert stream, optional amateur stream, its config."""

  name: str
  cfg: DecodingConfig
  expert: str
  amateur: str | None = None


def _round_up(n: int, m: int) -> int:
  return max(m, int(math.ceil(n / m)) * m)


def _bucket(n: int, m: int) -> int:
  """Padded length: multiples of m up to 8m, then of 4m (fewer compiles)."""
  return _round_up(n, m) if n <= 8 * m else _round_up(n, 4 * m)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
  first = seqs[0]
  n = len(first)
  for s in seqs[1:]:
    m = min(n, len(s))
    k = 0
    while k < m and s[k] == first[k]:
      k += 1
    n = k
  return n


class ScoringEngine:
  """Scores candidates of many prompts under many methods in one pass."""

  def __init__(
      self,
      models: Mapping[str, tuple[LlamaConfig, dict]],
      tokenizer,
      streams: Sequence[Stream],
      methods: Sequence[Method],
      *,
      shared_text: str = "",
      max_len: int | None = None,
      len_bucket: int = 16,
      truncate_left: int | None = None,
      mode: str = "mc",
      boundary: str = "assert",
      flat_bucket: int = 32,
      max_tokens: int = 512,
  ):
    # flat_bucket: packed candidate length rounds up to this multiple.
    # max_tokens: most candidate tokens per device call (memory bound).
    """Builds the engine.

    Args:
      models: name -> (config, params); all must share the tokenizer.
      tokenizer: an `lm.tokenizer.Tokenizer`.
      streams: the streams; each method's expert/amateur must name one.
      methods: what to score.
      shared_text: text every prompt starts with (the few-shot block); its
        KV cache is computed once per stream.
      max_len: longest prompt+continuation in tokens; default the smallest
        model context. Longer inputs raise (or are cut, see truncate_left).
      len_bucket: padding granularity of prompt prefills (bounds
        recompiles).
      truncate_left: if set, prompts longer than this many tokens are cut
        from the left (FACTOR's official protocol uses 1024).
      mode: "mc" (brief §2.2 scores) - passed to the method logits.
      boundary: "assert": continuation ids = tok(P + C)[len(tok(P)):] and a
        BPE merge across the boundary raises (TruthfulQA); "separate":
        tok(C) on its own (FACTOR's reference); "joint_or_separate": joint
        where the prefix property holds, else separate.
    """
    if boundary not in ("assert", "separate", "joint_or_separate"):
      raise ValueError(
          f"boundary={boundary!r}: choose assert, separate or"
          " joint_or_separate"
      )
    self.boundary = boundary
    self.flat_bucket = flat_bucket
    self.max_tokens = max_tokens
    self.models = dict(models)
    self.tok = tokenizer
    self.streams = {s.name: s for s in streams}
    if len(self.streams) != len(streams):
      raise ValueError("stream names must be unique")
    for s in streams:
      if s.model not in self.models:
        raise KeyError(
            f"stream {s.name!r} uses unknown model {s.model!r};"
            f" models: {list(self.models)}"
        )
    vocab = {c.vocab_size for c, _ in self.models.values()}
    if len(vocab) != 1:
      raise ValueError(
          f"models disagree on vocab size {vocab}; contrastive"
          " methods need one tokenizer"
      )
    self.methods = list(methods)
    for m in self.methods:
      for role, s in (("expert", m.expert), ("amateur", m.amateur)):
        if s is not None and s not in self.streams:
          raise KeyError(
              f"method {m.name!r}: {role} stream {s!r} is not"
              f" defined; streams: {list(self.streams)}"
          )
      if m.cfg.needs_amateur and m.amateur is None:
        raise ValueError(
            f"method {m.name!r} ({m.cfg.method}) needs an" " amateur stream"
        )
    self.used_streams = sorted(
        {m.expert for m in self.methods}
        | {m.amateur for m in self.methods if m.amateur}
    )
    self.exits = {}
    for s in self.used_streams:
      cfg = self.models[self.streams[s].model][0]
      layers = set()
      for m in self.methods:
        if s in (m.expert, m.amateur):
          layers |= set(
              m.cfg.exit_layers(cfg.num_hidden_layers, cfg.tie_word_embeddings)
          )
      self.exits[s] = tuple(sorted(layers))
    ctx = min(c.max_position_embeddings for c, _ in self.models.values())
    self.max_len = min(max_len or 2048, ctx)
    self.len_bucket = len_bucket
    self.truncate_left = truncate_left
    self.mode = mode
    self._shared = {}
    self._shared_text = shared_text
    for s in self.used_streams:
      st = self.streams[s]
      ids = (
          self.tok.encode(st.prompt_prefix + shared_text)
          if (st.prompt_prefix + shared_text)
          else []
      )
      # Drop the last tokens: a BPE merge across the boundary can change them.
      ids = ids[: max(0, len(ids) - 2)]
      self._shared[s] = ids
    self._prefix_cache = {}
    self._cache_len = _round_up(self.max_len + 8 * len_bucket, 64)
    self._prefill = jax.jit(self._prefill_impl, static_argnums=(0,))
    self._score = jax.jit(self._score_impl, static_argnums=(0,))

  # -- tokenization ---------------------------------------------------------

  def _ids(self, stream: str, prompt: str, candidates: Sequence[str]):
    st = self.streams[stream]
    p_text = st.prompt_prefix + prompt
    ids_p = self.tok.encode(p_text)
    conts = []
    for c in candidates:
      if self.boundary == "separate":
        conts.append(self.tok.encode(c))
        continue
      full = self.tok.encode(p_text + c)
      if full[: len(ids_p)] != ids_p and self.boundary == "joint_or_separate":
        conts.append(self.tok.encode(c))
        continue
      if full[: len(ids_p)] != ids_p:
        raise TokenizationError(
            f"stream {stream!r}: tokens of prompt+continuation do not start"
            f" with the prompt's tokens (a BPE merge across the boundary)."
            f" Prompt ends {p_text[-40:]!r}, continuation {c[:40]!r}. Start"
            " continuations with a space or end the prompt with one."
        )
      conts.append(full[len(ids_p) :])
    return ids_p, conts

  # -- device programs ------------------------------------------------------

  def _prefill_impl(self, model_name, params, cache, tokens, mask, positions):
    cfg = self.models[model_name][0]
    out = forward(
        params,
        cfg,
        tokens,
        token_mask=mask,
        positions=positions,
        cache=cache,
        logits_for=None,
    )
    return out.cache

  def _score_impl(
      self, key, params_by_model, prefixes, tokens, positions, mask, flat
  ):
    """All streams' passes and all methods' scores for one candidate pack.

    Candidates are packed into one row of K tokens (segment ids keep them
    apart; each also attends to the read-only prompt cache), so neither the
    trunk nor the heads (V = 49k, up to L exits) spend work on padding.
    `flat = (target id, valid, candidate index)` per packed position.
    """
    streams, exits_by_stream = key
    targets, valid, seg = flat
    b = targets.shape[0]
    outs = {}
    for s, exits in zip(streams, exits_by_stream):
      model_name = self.streams[s].model
      cfg = self.models[model_name][0]
      params = params_by_model[model_name]
      o = forward(
          params,
          cfg,
          tokens[s],
          positions=positions[s],
          token_mask=mask,
          prefix=prefixes[s],
          segment_ids=seg[None],
          logits_for=None,
          return_hidden=True,
      )
      h = o.hidden[jnp.asarray(exits), 0]  # (E, K, D)
      logits = head_logits(params, cfg, h)  # (E, K, V) float32
      outs[s] = {j: logits[i][None] for i, j in enumerate(exits)}
    scores = {}
    for m in self.methods:
      cfg = self.models[self.streams[m.expert].model][0]
      am_cfg = (self.models[self.streams[m.amateur].model][0]
                if m.amateur else None)
      f = contrast.method_logits(
          m.cfg,
          outs[m.expert],
          outs[m.amateur] if m.amateur else None,
          cfg.num_hidden_layers,
          self.mode,
          tied=cfg.tie_word_embeddings,
          amateur_num_layers=(am_cfg.num_hidden_layers if am_cfg else None),
      )[0]
      lp = jnp.take_along_axis(f, targets[:, None], -1)[:, 0]
      lp = jnp.where(valid, lp, 0.0)
      scores[m.name] = jax.ops.segment_sum(lp, seg, num_segments=b)
    return scores

  def _shared_cache(self, stream: str) -> tuple[KVCache, int]:
    if stream not in self._prefix_cache:
      st = self.streams[stream]
      cfg, params = self.models[st.model]
      ids = self._shared[stream]
      cache = init_cache(cfg, 1, self._cache_len)
      if ids:
        n = _round_up(len(ids), self.len_bucket)
        tok = np.zeros((1, n), np.int32)
        tok[0, : len(ids)] = ids
        mask = np.arange(n)[None] < len(ids)
        pos = np.arange(n, dtype=np.int32)[None]
        cache = self._prefill(st.model, params, cache, tok, mask, pos)
      self._prefix_cache[stream] = (cache, len(ids))
    return self._prefix_cache[stream]

  # -- public ---------------------------------------------------------------

  def score(self, prompt: str, candidates: Sequence[str]) -> dict:
    """Scores every candidate under every method.

    Returns:
      {method: (sum_scores (n,), num_tokens (n,))} as numpy float64/int.
    """
    if not candidates:
      raise ValueError("no candidates to score")
    ids, conts = {}, None
    for s in self.used_streams:
      ids_p, c = self._ids(s, prompt, candidates)
      if conts is None:
        conts = c
      elif c != conts:
        bad = next(i for i in range(len(c)) if c[i] != conts[i])
        raise TokenizationError(
            f"stream {s!r} tokenizes candidate {bad} ({candidates[bad]!r})"
            f" differently from stream {self.used_streams[0]!r}: {c[bad]} vs"
            f" {conts[bad]}; the streams cannot be aligned token by token"
        )
      ids[s] = ids_p
    if any(len(c) == 0 for c in conts):
      raise ValueError("a candidate tokenizes to zero tokens")
    t_max = max(len(c) for c in conts)
    # Cut or refuse over-long inputs.
    for s in self.used_streams:
      total = len(ids[s]) + t_max
      limit = self.truncate_left or self.max_len
      if total > self.max_len or (
          self.truncate_left and len(ids[s]) > self.truncate_left
      ):
        if self.truncate_left is None:
          raise ValueError(
              f"prompt of {len(ids[s])} tokens + continuation of {t_max}"
              f" exceeds the context of {self.max_len} tokens (stream {s!r});"
              " shorten the prompt or set truncate_left"
          )
        keep = min(limit, self.max_len - t_max)
        ids[s] = ids[s][-keep:]
    # Per-stream question prefill after the dataset-wide shared prefix.
    prefixes, last_tok, next_pos = {}, {}, {}
    for s in self.used_streams:
      st = self.streams[s]
      cache, k = self._shared_cache(s)
      shared = self._shared[s]
      if k and ids[s][:k] != shared:
        k = 0
        cache = init_cache(self.models[st.model][0], 1, self._cache_len)
      rest = ids[s][k:-1]
      if rest:
        n = _bucket(len(rest), self.len_bucket)
        start = int(cache.index)  # slots used by the shared prefix (padded)
        if start + n > self._cache_len:
          n = len(rest)
        if start + n > self._cache_len:
          raise ValueError(
              f"prompt of {len(ids[s])} tokens does not fit the engine's"
              f" cache of {self._cache_len} slots; raise max_len")
        tok = np.zeros((1, n), np.int32)
        tok[0, : len(rest)] = rest
        mask = np.arange(n)[None] < len(rest)
        pos = (k + np.arange(n, dtype=np.int32))[None]
        cache = self._prefill(
            st.model, self.models[st.model][1], cache, tok, mask, pos
        )
      prefixes[s] = cache
      last_tok[s] = ids[s][-1]
      next_pos[s] = len(ids[s]) - 1
    n_c = len(conts)
    out_sum = {m.name: np.zeros(n_c) for m in self.methods}
    out_len = np.array([len(c) for c in conts])
    chunks, cur, cur_len = [], [], 0
    for i, c in enumerate(conts):
      if cur and cur_len + len(c) > self.max_tokens:
        chunks.append(cur)
        cur, cur_len = [], 0
      cur.append(i)
      cur_len += len(c)
    chunks.append(cur)
    for chunk in chunks:
      total = sum(len(conts[i]) for i in chunk)
      k = _bucket(total, self.flat_bucket)
      body = np.zeros(k, np.int32)
      rel = np.zeros(k, np.int32)
      f_tgt = np.zeros(k, np.int32)
      f_valid = np.zeros(k, bool)
      f_seg = np.full(k, len(chunk), np.int32)  # padding: its own segment
      first = np.zeros(k, bool)
      pos = 0
      for j, i in enumerate(chunk):
        c = conts[i]
        n = len(c)
        body[pos + 1 : pos + n] = c[:-1]
        first[pos] = True
        rel[pos : pos + n] = np.arange(n)
        f_tgt[pos : pos + n] = c
        f_valid[pos : pos + n] = True
        f_seg[pos : pos + n] = j
        pos += n
      tokens, positions = {}, {}
      for s in self.used_streams:
        tokens[s] = np.where(first, last_tok[s], body)[None]
        positions[s] = (next_pos[s] + rel)[None].astype(np.int32)
      key = (
          tuple(self.used_streams),
          tuple(self.exits[s] for s in self.used_streams),
      )
      params = {
          self.streams[s].model: self.models[self.streams[s].model][1]
          for s in self.used_streams
      }
      res = self._score(key, params, prefixes, tokens, positions,
                        f_valid[None], (f_tgt, f_valid, f_seg))
      for name, sm in res.items():
        out_sum[name][chunk] = np.asarray(sm)[: len(chunk)]
    return {name: (out_sum[name], out_len) for name in out_sum}
