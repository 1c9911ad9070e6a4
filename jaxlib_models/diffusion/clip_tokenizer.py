"""CLIP byte-level BPE tokenizer, padded and truncated as SD pipelines do.

Behaviour of transformers 5's `CLIPTokenizer` (read, not copied): special
tokens are matched in the raw text; the rest is NFC-normalised, every run of
whitespace becomes one space, and it is lower-cased; it is split by the CLIP
pattern (`<|startoftext|>`, `<|endoftext|>`, the contractions 's 't 're 've 'm
'll 'd, letter runs, single digits, runs of other non-space characters);
each piece is mapped byte-wise to printable characters (the GPT-2 byte
alphabet) and BPE-merged with the end-of-word marker `</w>` on its last
symbol (Radford et al., arXiv 2103.00020; Sennrich et al., arXiv 1508.07909).
SD pipelines call it with `padding="max_length", max_length=77,
truncation=True`: BOS + at most 75 tokens + EOS, then pad ids.

Unlike OpenAI's original tokenizer there is no ftfy / HTML unescaping (neither
does transformers 5). Two sources:

- `vocab.json` + `merges.txt` (SD's `tokenizer/` folder): BPE runs here in
  Python, independent of the `tokenizers` package;
- `tokenizer.json`: pieces come from `tokenizers.Tokenizer` (without its
  post-processor); BOS/EOS/padding are applied here either way.

`from_openai_bpe` reads OpenAI's `bpe_simple_vocab_16e6.txt(.gz)` merges list
(vocabulary: 256 byte symbols, the same with `</w>`, one entry per merge, then
`<|startoftext|>`, `<|endoftext|>`; 49408 ids for the real file).
"""

import functools
import gzip
import itertools
import json
import os
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77
# merges.txt lines of the real OpenAI vocabulary (49408 - 512 - 2).
OPENAI_NUM_MERGES = 48894

_PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+"
    r"|[\p{N}]|[^\s\p{L}\p{N}]+")
# Whitespace as Unicode's White_Space property (Python's \s also matches
# U+001C..U+001F, which the Rust normaliser leaves alone).
_SPACE = regex.compile(r"[\p{White_Space}]+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (byte order of the vocab)."""
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


def normalize(text: str) -> str:
  """NFC, whitespace runs -> one space, lower case (transformers 5)."""
  return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()


def pre_tokenize(text: str) -> list[str]:
  """Normalised text -> CLIP pieces (whitespace dropped)."""
  return _PIECE.findall(text)


class CLIPTokenizer:
  """CLIP BPE with SD's BOS/EOS/pad/truncation conventions.

  Attributes:
    vocab: token -> id.
    bos_id, eos_id, pad_id: special ids (pad defaults to EOS, as in SD 1.5's
      tokenizer; SD 2's uses "!").
    model_max_length: default `max_length` of `__call__` (77).
  """

  def __init__(
      self,
      vocab: Mapping[str, int],
      merges: Sequence[tuple[str, str]] | None,
      *,
      backend=None,
      pad_token: str = EOS,
      model_max_length: int = MODEL_MAX_LENGTH,
  ):
    """Use the `from_*` constructors.

    Args:
      vocab: token -> id.
      merges: ordered BPE merges (None with a `tokenizers` backend).
      backend: a `tokenizers.Tokenizer` producing the pieces, or None for
        the Python BPE over `merges`.
      pad_token: padding token.
      model_max_length: default padded length.
    """
    self.vocab = dict(vocab)
    self.inv_vocab = {i: t for t, i in self.vocab.items()}
    self.ranks = {tuple(m): r for r, m in enumerate(merges or ())}
    self.backend = backend
    for tok in (BOS, EOS, pad_token):
      if tok not in self.vocab:
        raise ValueError(f"special token {tok!r} is not in the vocabulary")
    self.bos_id = self.vocab[BOS]
    self.eos_id = self.vocab[EOS]
    self.pad_id = self.vocab[pad_token]
    self.unk_id = self.eos_id  # transformers' CLIP unk_token is EOS
    self.model_max_length = model_max_length
    # Matched in the raw text before normalisation, as transformers does
    # with its special tokens (SD 2's pad token "!" included).
    self._specials = tuple(sorted({BOS, EOS, pad_token}, key=len,
                                  reverse=True))
    self._byte = bytes_to_unicode()
    self._unbyte = {c: b for b, c in self._byte.items()}
    self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  # ------------------------------------------------------------------ BPE

  def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
    """Merges the lowest-ranked adjacent pair everywhere, until none is left."""
    word = list(piece[:-1]) + [piece[-1] + EOW]
    while len(word) > 1:
      ranked = [(self.ranks[p], p) for p in itertools.pairwise(word)
                if p in self.ranks]
      if not ranked:
        break
      first, second = min(ranked)[1]
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return tuple(word)

  def _pieces(self, text: str) -> list[str]:
    """Byte-mapped pieces of text that holds no special token."""
    return ["".join(self._byte[b] for b in p.encode("utf-8"))
            for p in pre_tokenize(normalize(text))]

  def tokenize(self, text: str) -> list[str]:
    """Text -> BPE tokens (no BOS/EOS); special tokens kept whole."""
    out: list[str] = []
    for seg, special in _split_special(text, self._specials):
      if special:
        out.append(seg)
        continue
      if self.backend is not None:
        enc = self.backend.encode(seg, add_special_tokens=False)
        out += enc.tokens
        continue
      for piece in self._pieces(seg):
        out += self._bpe(piece)
    return out

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Text -> ids, with BOS ... EOS unless add_special_tokens is False."""
    ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]
    if add_special_tokens:
      ids = [self.bos_id] + ids + [self.eos_id]
    return ids

  def __call__(
      self,
      texts: str | Sequence[str],
      *,
      max_length: int | None = None,
      padding: str = "max_length",
      truncation: bool = True,
  ) -> dict[str, np.ndarray]:
    """Batch encoding as SD pipelines request it.

    Args:
      texts: one string or a list.
      max_length: padded / truncated length; default `model_max_length`.
      padding: "max_length" (SD, static shapes) or "longest".
      truncation: keep BOS + the first max_length - 2 tokens + EOS; without
        it an over-long text is an error (shapes must stay static).

    Returns:
      {"input_ids": (B, L) int32, "attention_mask": (B, L) int32}.
    """
    if isinstance(texts, str):
      texts = [texts]
    length = self.model_max_length if max_length is None else max_length
    if length < 2:
      raise ValueError(f"max_length={length} leaves no room for BOS and EOS")
    if padding not in ("max_length", "longest"):
      raise ValueError(f"padding={padding!r}: use 'max_length' or 'longest'")
    rows = []
    for t in texts:
      ids = self.encode(t, add_special_tokens=False)
      if len(ids) > length - 2:
        if not truncation:
          raise ValueError(
              f"text of {len(ids)} tokens exceeds max_length={length} (with"
              " BOS and EOS) and truncation is off")
        ids = ids[:length - 2]
      rows.append([self.bos_id] + ids + [self.eos_id])
    if padding == "longest":
      length = max(len(r) for r in rows)
    ids_BL = np.full((len(rows), length), self.pad_id, np.int32)
    mask_BL = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      ids_BL[i, :len(r)] = r
      mask_BL[i, :len(r)] = 1
    return {"input_ids": ids_BL, "attention_mask": mask_BL}

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True
             ) -> str:
    """Ids -> text; `</w>` becomes a space (lossy: case and whitespace)."""
    special = {self.bos_id, self.eos_id, self.pad_id}
    text = "".join(self.inv_vocab[int(i)] for i in ids
                   if not (skip_special_tokens and int(i) in special))
    raw = bytearray()
    for ch in text.replace(EOW, " "):
      if ch in self._unbyte:
        raw.append(self._unbyte[ch])
      else:
        raw += ch.encode("utf-8")
    return raw.decode("utf-8", errors="replace").strip()

  # ------------------------------------------------------------ loading

  @classmethod
  def from_vocab_merges(cls, vocab_path: str, merges_path: str,
                        **kw) -> "CLIPTokenizer":
    """From `vocab.json` and `merges.txt` (a `#version` header is skipped)."""
    with open(vocab_path, encoding="utf-8") as fh:
      vocab = json.load(fh)
    with open(merges_path, encoding="utf-8") as fh:
      lines = fh.read().split("\n")
    return cls(vocab, _parse_merges(lines, merges_path), **kw)

  @classmethod
  def from_tokenizer_json(cls, path: str, **kw) -> "CLIPTokenizer":
    """From a `tokenizer.json` (pieces by the `tokenizers` package)."""
    import tokenizers  # pylint: disable=g-import-not-at-top

    tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    tok.post_processor = None
    tok.no_padding()
    tok.no_truncation()
    return cls(tok.get_vocab(with_added_tokens=True), None, backend=tok, **kw)

  @classmethod
  def from_openai_bpe(cls, path: str, num_merges: int | None = None,
                      **kw) -> "CLIPTokenizer":
    """From OpenAI's `bpe_simple_vocab_16e6.txt[.gz]` merges list.

    Args:
      path: the file (gzip when it ends in .gz); its first line is a header.
      num_merges: merges used; default min(48894, lines in the file).
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
      lines = fh.read().split("\n")[1:]
    merges = _parse_merges(lines, path)
    merges = merges[:OPENAI_NUM_MERGES if num_merges is None else num_merges]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + EOW for s in symbols]
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    return cls({t: i for i, t in enumerate(tokens)}, merges, **kw)

  @classmethod
  def from_pretrained(cls, folder: str, backend: str = "auto"
                      ) -> "CLIPTokenizer":
    """From a tokenizer folder (SD's `tokenizer/` or a CLIP model folder).

    Args:
      folder: holds `vocab.json` + `merges.txt` and/or `tokenizer.json`, and
        optionally `tokenizer_config.json` / `special_tokens_map.json` (read
        for `pad_token` and `model_max_length`).
      backend: "python" (vocab/merges), "tokenizers" (tokenizer.json) or
        "auto" (python when vocab/merges exist).
    """
    folder = os.fspath(folder)
    kw = _folder_settings(folder)
    vocab = os.path.join(folder, "vocab.json")
    merges = os.path.join(folder, "merges.txt")
    tj = os.path.join(folder, "tokenizer.json")
    have_vm = os.path.exists(vocab) and os.path.exists(merges)
    if backend not in ("auto", "python", "tokenizers"):
      raise ValueError(f"backend={backend!r}: auto, python or tokenizers")
    if backend in ("auto", "python") and have_vm:
      return cls.from_vocab_merges(vocab, merges, **kw)
    if backend in ("auto", "tokenizers") and os.path.exists(tj):
      return cls.from_tokenizer_json(tj, **kw)
    need = "vocab.json + merges.txt" if backend == "python" else (
        "tokenizer.json" if backend == "tokenizers"
        else "vocab.json + merges.txt or tokenizer.json")
    raise FileNotFoundError(f"{folder}: no {need}")

  def save(self, folder: str) -> None:
    """Writes vocab.json, merges.txt and tokenizer_config.json (transformers'
    CLIPTokenizer loads the folder with identical ids)."""
    if self.backend is not None:
      raise ValueError("save() needs the vocab/merges (python) backend")
    os.makedirs(folder, exist_ok=True)
    merges = sorted(self.ranks, key=self.ranks.get)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS,
           "eos_token": EOS, "unk_token": EOS,
           "pad_token": self.inv_vocab[self.pad_id],
           "model_max_length": self.model_max_length}
    with open(os.path.join(folder, "tokenizer_config.json"), "w",
              encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)


def _split_special(text: str, specials: Sequence[str]
                   ) -> list[tuple[str, bool]]:
  """Splits out literal special tokens (longest first)."""
  pattern = "(" + "|".join(regex.escape(s) for s in specials) + ")"
  return [(p, p in specials) for p in regex.split(pattern, text) if p]


def _parse_merges(lines: Sequence[str], where) -> list[tuple[str, str]]:
  merges = []
  for n, line in enumerate(lines):
    if (n == 0 and line.startswith("#version")) or not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{where}: line {n + 1} is not a merge pair: {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def _folder_settings(folder: str) -> dict:
  kw = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    p = os.path.join(folder, name)
    if not os.path.exists(p):
      continue
    with open(p, encoding="utf-8") as fh:
      d = json.load(fh)
    pad = d.get("pad_token")
    if isinstance(pad, dict):
      pad = pad.get("content")
    if pad:
      kw["pad_token"] = pad
    mml = d.get("model_max_length")
    if isinstance(mml, int) and mml < 10**6:
      kw["model_max_length"] = mml
  return kw
