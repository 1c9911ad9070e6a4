"""CLIP text/vision towers, conversion and tokenizer vs transformers (PyTorch).

Parity tolerance: max abs diff <= 1e-5 in float32 (small modules, STYLE §11;
observed ~1e-6). Weights always travel through files: transformers
`save_pretrained` -> our `convert.load_clip_*`, and our `save_clip_*` ->
transformers `from_pretrained`.

Planted-bug checks done while writing these tests (each made a test fail):
dropping the causal mask, using gelu for quick_gelu, swapping the two EOS
rules, leaving out pre_layrnorm, transposing a conv kernel as (3, 2, 1, 0),
Python `re` whitespace in the tokenizer (U+001C), applying the highest-ranked
BPE merge first.
"""

import collections
import itertools
import json
import os

import numpy as np
import pytest

import jax

from jaxlib_models.diffusion import clip, clip_tokenizer, convert

pytestmark = pytest.mark.usefixtures("fast_compile")

V, BOS_ID, EOS_ID = 99, 96, 97
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=BOS_ID, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)


def _torch():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  return torch, transformers


def _ids(rng, b=3, l=16):
  """Rows where the first EOS is not the largest id (the rules differ)."""
  ids = rng.randint(3, 90, (b, l))
  ids[:, 0] = BOS_ID
  ids[0, 4], ids[0, 5:] = 98, EOS_ID  # 98 before EOS: argmax -> 4, EOS -> 5
  ids[1, 9], ids[1, 10:] = EOS_ID, 1
  ids[2, 15] = EOS_ID
  return ids


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.oracle
@pytest.mark.parametrize("eos", [EOS_ID, 2])
def test_text_model_matches_transformers_from_its_folder(tmp_path, eos):
  """eos=97: first-EOS pooling; eos=2: legacy argmax-of-ids pooling."""
  torch, transformers = _torch()
  ref = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**TEXT, eos_token_id=eos)).eval()
  ref.save_pretrained(tmp_path)
  cfg, params = convert.load_clip_text(tmp_path)
  assert cfg.eos_token_id == eos and cfg.projection_dim is None
  ids = _ids(np.random.RandomState(0))
  if eos == 2:
    ids[1, 3] = 2  # a first "2" that the argmax rule must not pick
  mask = (np.arange(16)[None] < np.array([[16], [11], [16]])).astype(np.int64)
  for attention_mask in (None, mask):
    with torch.no_grad():
      want = ref(torch.tensor(ids), attention_mask=None if attention_mask is
                 None else torch.tensor(attention_mask))
    got = clip.encode_text(params, cfg, ids, attention_mask=attention_mask)
    assert _max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    assert _max_diff(got.pooler_output, want.pooler_output) <= 1e-5
  pooled_at = 4 if eos == 2 else 5
  np.testing.assert_allclose(got.pooler_output[0],
                             got.last_hidden_state[0, pooled_at], atol=0)


@pytest.mark.oracle
def test_vision_model_with_projection_matches_transformers(tmp_path):
  torch, transformers = _torch()
  ref = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION, projection_dim=24)).eval()
  ref.save_pretrained(tmp_path)
  cfg, params = convert.load_clip_vision(tmp_path)
  x_nchw = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.tensor(x_nchw))
  got = clip.encode_image(params, cfg, x_nchw, data_format="NCHW")
  assert _max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-5
  assert _max_diff(got.image_embeds, want.image_embeds) <= 1e-5
  got_nhwc = clip.encode_image(params, cfg, x_nchw.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(got_nhwc.image_embeds, got.image_embeds)
  from transformers import image_utils
  assert clip.CLIP_MEAN == tuple(image_utils.OPENAI_CLIP_MEAN)
  assert clip.CLIP_STD == tuple(image_utils.OPENAI_CLIP_STD)
  with pytest.raises(ValueError, match="image_size=32"):
    clip.encode_image(params, cfg, np.zeros((1, 3, 64, 64)), data_format="NCHW")


@pytest.mark.oracle
def test_both_towers_of_a_clip_model_folder(tmp_path):
  """CLIPModel folder (the CLIP-score model): projected text/image features."""
  torch, transformers = _torch()
  ref = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(TEXT, eos_token_id=EOS_ID), vision_config=VISION,
      projection_dim=24)).eval()
  ref.save_pretrained(tmp_path)
  tcfg, tparams = convert.load_clip_text(tmp_path)
  vcfg, vparams = convert.load_clip_vision(tmp_path)
  ids = _ids(np.random.RandomState(2))
  x = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    t_ref = ref.get_text_features(torch.tensor(ids))
    i_ref = ref.get_image_features(torch.tensor(x))
  t_ref = getattr(t_ref, "pooler_output", t_ref)  # transformers 5 wraps it
  i_ref = getattr(i_ref, "pooler_output", i_ref)
  t = clip.encode_text(tparams, tcfg, ids).text_embeds
  i = clip.encode_image(vparams, vcfg, x, data_format="NCHW").image_embeds
  assert _max_diff(t, t_ref) <= 1e-5 and _max_diff(i, i_ref) <= 1e-5
  _, plain = convert.load_clip_text(tmp_path, with_projection=False)
  assert "text_projection" not in plain


@pytest.mark.oracle
@pytest.mark.parametrize("projection_dim", [None, 24])
def test_round_trip_through_a_transformers_folder(tmp_path, projection_dim):
  """Our params -> folder -> transformers (no missing/unexpected keys, same
  outputs) -> our loader (bit-identical params)."""
  torch, transformers = _torch()
  tcfg = clip.CLIPTextConfig(**TEXT, eos_token_id=EOS_ID,
                             projection_dim=projection_dim)
  tparams = clip.init_text_params(tcfg, jax.random.key(0))
  convert.save_clip_text(tmp_path / "text", tcfg, tparams)
  cls = (transformers.CLIPTextModel if projection_dim is None
         else transformers.CLIPTextModelWithProjection)
  model, info = cls.from_pretrained(tmp_path / "text",
                                    output_loading_info=True)
  assert not any(info.values()), info
  ids = _ids(np.random.RandomState(4))
  with torch.no_grad():
    want = model.eval()(torch.tensor(ids))
  got = clip.encode_text(tparams, tcfg, ids)
  assert _max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-5
  if projection_dim:
    assert _max_diff(got.text_embeds, want.text_embeds) <= 1e-5
  cfg2, back = convert.load_clip_text(tmp_path / "text")
  assert cfg2 == tcfg
  jax.tree.map(np.testing.assert_array_equal, back, tparams)

  vcfg = clip.CLIPVisionConfig(**VISION, projection_dim=projection_dim)
  vparams = clip.init_vision_params(vcfg, jax.random.key(1))
  convert.save_clip_vision(tmp_path / "vision", vcfg, vparams)
  cls = (transformers.CLIPVisionModel if projection_dim is None
         else transformers.CLIPVisionModelWithProjection)
  model, info = cls.from_pretrained(tmp_path / "vision",
                                    output_loading_info=True)
  assert not any(info.values()), info
  x = np.random.RandomState(5).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    want = model.eval()(torch.tensor(x))
  got = clip.encode_image(vparams, vcfg, x, data_format="NCHW")
  assert _max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-5
  if projection_dim:
    assert _max_diff(got.image_embeds, want.image_embeds) <= 1e-5
  else:
    assert _max_diff(got.pooler_output, want.pooler_output) <= 1e-5


def test_key_mapping_is_bijective_on_clip_keys():
  cfg = clip.CLIPVisionConfig(**VISION)
  params = clip.init_vision_params(cfg, jax.random.key(0))
  state = convert.torch_state_from_params(params)
  assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in state
  assert "vision_model.pre_layrnorm.weight" in state  # LayerNorm scale
  assert state["vision_model.embeddings.patch_embedding.weight"].shape == (
      32, 3, 8, 8)
  for key in state:
    path = convert.torch_key_to_path(key)
    assert ".".join(path[:-1]).count(".") == key.count(".") - 1 - sum(
        s.isdigit() for s in key.split("."))
  assert convert.torch_key_to_path("a.layers.3.fc1.weight") == (
      "a", "layers_3", "fc1", "weight")
  assert convert.path_to_torch_key(("a", "layers_3", "fc1", "kernel")) == (
      "a.layers.3.fc1.weight")
  assert convert.path_to_torch_key(
      ("time_embedding", "linear_1", "kernel"),
      literal=frozenset({"linear_1"})) == "time_embedding.linear_1.weight"
  back = convert.params_from_torch_state(state.__getitem__, state, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_wrong_architecture_names_the_tensor(tmp_path):
  cfg = clip.CLIPTextConfig(**TEXT, eos_token_id=EOS_ID)
  params = clip.init_text_params(cfg, jax.random.key(0))
  convert.save_clip_text(tmp_path, cfg, params)
  cfg_path = tmp_path / "config.json"
  good = json.loads(cfg_path.read_text())

  cfg_path.write_text(json.dumps(dict(good, num_hidden_layers=3)))
  with pytest.raises(convert.ConversionError,
                     match=r"'text_model\.encoder\.layers\.2\..*' is missing"):
    convert.load_clip_text(tmp_path)
  cfg_path.write_text(json.dumps(dict(good, intermediate_size=40)))
  with pytest.raises(convert.ConversionError,
                     match=r"layers\.0\.mlp\.fc1\.(bias|weight)' has shape"
                     r" \(37,( 32)?\), the config needs \(40,( 32)?\)"):
    convert.load_clip_text(tmp_path)
  cfg_path.write_text(json.dumps(dict(good, num_hidden_layers=1)))
  with pytest.raises(convert.ConversionError, match="unexpected tensor"):
    convert.load_clip_text(tmp_path)
  cfg_path.write_text(json.dumps(dict(good, model_type="llama")))
  with pytest.raises(ValueError, match="not a CLIP text model"):
    convert.load_clip_text(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  cfg_path.write_text(json.dumps(good))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    convert.load_clip_text(tmp_path)


def test_text_encoder_is_causal_and_config_checks():
  """Changing token j leaves positions < j unchanged (and changes j)."""
  cfg = clip.CLIPTextConfig(**TEXT, eos_token_id=EOS_ID)
  params = clip.init_text_params(cfg, jax.random.key(0))
  ids = _ids(np.random.RandomState(6))
  ids2 = ids.copy()
  ids2[:, 7] = 11
  a = clip.encode_text(params, cfg, ids).last_hidden_state
  b = clip.encode_text(params, cfg, ids2).last_hidden_state
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert _max_diff(a[:, 7:], b[:, 7:]) > 1e-3
  with pytest.raises(ValueError, match="max_position_embeddings"):
    clip.encode_text(params, cfg, np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    clip.CLIPTextConfig(**TEXT)  # default eos 49407 with a 99-token vocab
  with pytest.raises(ValueError, match="hidden_act"):
    clip.CLIPTextConfig(**dict(TEXT, eos_token_id=EOS_ID), hidden_act="relu")
  with pytest.raises(ValueError, match="multiple of patch_size"):
    clip.CLIPVisionConfig(**dict(VISION, image_size=30))


# --------------------------------------------------------------------------
# Tokenizer.

_CORPUS = ("a photo of a cat sitting on the mat . the quick brown fox jumps"
           " over the lazy dog a painting of a dog in the style of van gogh ,"
           " highly detailed , 4k ; it's a cat's toy photograph photos")
LONG = "a photograph of the highly detailed style " * 20  # > 75 tokens
TEXTS = [
    "a photo of a cat",
    "a hot shot photo, hotter",
    "A  Photo\tof\nthe CAT's toy!!",
    "Ünïcödé café naïve 東京 🐱 emoji",
    "e\u0301 vs é İstanbul ß ﬁ",
    "4k 1234 3.14 -- ... it'll we've",
    "x <|endoftext|> y <|startoftext|>z",
    "",
    "   ",
    LONG,
    "The\u00a0quick\u3000fox\u2028line \x1c sep",
]


def _bpe_folder(path) -> tuple[dict, list]:
  """A tiny CLIP-layout vocab: 512 byte symbols, ~80 merges, BOS, EOS.

  The byte alphabet comes from `tokenizers` (not from our table), and the
  merges from a plain frequency count over a small corpus.
  """
  from tokenizers.pre_tokenizers import ByteLevel

  alphabet = sorted(ByteLevel.alphabet())
  counts = collections.Counter(_CORPUS.split())
  words = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}
  merges = []
  for _ in range(80):
    pairs = collections.Counter()
    for w, s in words.items():
      for p in itertools.pairwise(s):
        pairs[p] += counts[w]
    if not pairs:
      break
    best = max(sorted(pairs), key=pairs.__getitem__)
    merges.append(best)
    for w, s in words.items():
      out, i = [], 0
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      words[w] = out
  # Two overlapping merges ahead of the learned ones, so merge priority
  # matters: "hot" is h + ot</w> by rank, not ho + t</w>.
  hand = [("o", "t</w>"), ("h", "o")]
  merges = hand + [m for m in merges if "".join(m) not in ("ot</w>", "ho")]
  tokens = alphabet + [c + "</w>" for c in alphabet]
  tokens += ["".join(m) for m in merges] + ["<|startoftext|>",
                                           "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  assert len(vocab) == len(tokens)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab, merges


@pytest.mark.oracle
def test_tokenizer_ids_match_transformers(tmp_path):
  """SD call: padding="max_length", max_length=77, truncation=True; both our
  backends (Python BPE over vocab/merges, `tokenizers` over tokenizer.json)."""
  transformers = pytest.importorskip("transformers")
  vocab, _ = _bpe_folder(tmp_path / "vm")
  ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "vm")
  ref.save_pretrained(tmp_path / "tj")
  assert os.path.exists(tmp_path / "tj" / "tokenizer.json")
  ours = clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path / "vm")
  assert ours.backend is None
  ours_tj = clip_tokenizer.CLIPTokenizer.from_pretrained(
      tmp_path / "tj", backend="tokenizers")
  want = ref(TEXTS, padding="max_length", max_length=77, truncation=True)
  for tok in (ours, ours_tj):
    got = tok(TEXTS)
    assert got["input_ids"].shape == (len(TEXTS), 77)
    for i, t in enumerate(TEXTS):
      assert got["input_ids"][i].tolist() == want["input_ids"][i], t
      assert got["attention_mask"][i].tolist() == want["attention_mask"][i]
  ids = ours("a photo of a cat")["input_ids"][0]
  assert ids.max() < len(vocab) and (ids[1:6] >= 512).any()  # merges used
  assert ids[0] == vocab["<|startoftext|>"]
  assert len(ours.encode(LONG)) > 77
  long_ids = ours(LONG)["input_ids"][0]
  assert long_ids[-1] == vocab["<|endoftext|>"] and (
      ours(LONG)["attention_mask"].sum() == 77)
  assert ours.decode(ids) == "a photo of a cat"
  assert ours.tokenize("hot") == ["h", "ot</w>"]


@pytest.mark.oracle
def test_tokenizer_longest_padding_and_custom_pad_token(tmp_path):
  """padding="longest" and an SD-2 style pad token "!" read from the folder."""
  transformers = pytest.importorskip("transformers")
  _bpe_folder(tmp_path)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"pad_token": "!", "model_max_length": 77}, f)
  ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
  ours = clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path)
  assert ours.pad_id == ref.pad_token_id != ours.eos_id
  texts = TEXTS[:5]
  want = ref(texts, padding="longest")
  got = ours(texts, padding="longest")
  assert got["input_ids"].tolist() == want["input_ids"]
  assert got["attention_mask"].tolist() == want["attention_mask"]
  want = ref(texts, padding="max_length", max_length=12, truncation=True)
  got = ours(texts, max_length=12)
  assert got["input_ids"].tolist() == want["input_ids"]


def test_openai_bpe_file_layout_and_errors(tmp_path):
  """bpe_simple_vocab layout: bytes, bytes+</w>, merges, BOS, EOS."""
  import gzip  # pylint: disable=g-import-not-at-top

  path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\nc a\nca t</w>\n"
            "t h\nth e</w>\n")
  tok = clip_tokenizer.CLIPTokenizer.from_openai_bpe(path)
  assert tok.vocab_size == 512 + 4 + 2
  assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256
  assert tok.vocab["ca"] == 512 and tok.vocab["cat</w>"] == 513
  assert (tok.bos_id, tok.eos_id) == (516, 517)
  assert tok.encode("The CAT") == [516, 515, 513, 517]
  assert tok.tokenize("cats") == ["ca", "t", "s</w>"]
  with pytest.raises(ValueError, match="truncation is off"):
    tok(["cat " * 80], truncation=False)
  with pytest.raises(ValueError, match="max_length=1"):
    tok("cat", max_length=1)
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path, backend="python")
