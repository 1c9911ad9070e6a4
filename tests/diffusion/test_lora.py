"""LoRA fusing (`diffusion.lora`) vs NumPy and vs diffusers + PEFT.

NumPy tests recompute W + s*(alpha/r)*B@A by hand on tiny targets. Oracle
tests load the same LoRA into diffusers' `UNet2DConditionModel` (PEFT
format, and kohya format through diffusers' own kohya converter) and into a
transformers `CLIPTextModel`, fuse there, and compare the fused weights with
ours: max abs diff <= 1e-6 (float32 products of size <= 64; observed ~1e-7).

Planted-bug checks done while writing these tests (each made a test fail):
alpha/r replaced by alpha, B@A replaced by A.T@B.T on square weights,
ignoring `.alpha` keys, dropping the rank check, skipping unmatched keys.
"""

import numpy as np
import pytest

from jaxlib_models.diffusion import lora as lora_lib
from jaxlib_models.diffusion.lora import LoRAError, fuse_lora

UNET_CFG = dict(block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8, sample_size=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TEXT_CFG = dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=96, eos_token_id=97)

# diffusers module -> (rank, alpha); linear, 1x1 conv and 3x3 conv targets.
UNET_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": (4, 2.0),
    "down_blocks.0.attentions.0.proj_in": (2, 2.0),  # 1x1 conv
    "down_blocks.0.resnets.0.conv1": (4, 8.0),  # 3x3 conv
    "down_blocks.1.resnets.0.time_emb_proj": (4, 2.0),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (4, 2.0),
    "up_blocks.1.attentions.1.proj_in": (3, 2.0),
    "up_blocks.1.resnets.1.conv_shortcut": (4, 1.0),
    "conv_in": (3, 2.0),
}
# The same modules as kohya-ss names them in LDM (sgm) files, written by hand.
LDM_NAMES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0":
        "input_blocks_1_1_transformer_blocks_0_attn2_to_out_0",
    "down_blocks.0.attentions.0.proj_in": "input_blocks_1_1_proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks_3_0_emb_layers_1",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "up_blocks.1.attentions.1.proj_in": "output_blocks_3_1_proj_in",
    "up_blocks.1.resnets.1.conv_shortcut": "output_blocks_3_0_skip_connection",
    "conv_in": "input_blocks_0_0",
}
TEXT_MODULES = {
    "text_model.encoder.layers.0.self_attn.q_proj": (4, 1.0),
    "text_model.encoder.layers.1.self_attn.out_proj": (4, 1.0),
    "text_model.encoder.layers.1.mlp.fc1": (4, 1.0),
}


def _pair(rng, w, r):
  """(A, B) in PyTorch layout for a weight w; conv B is (O, r, 1, 1).

  Entries ~N(0, 0.3^2) keep fused weights O(1), where a float32 ulp is
  ~1e-7 (real LoRA factors are smaller still).
  """
  a = 0.3 * rng.randn(r, *w.shape[1:]).astype(np.float32)
  b = 0.3 * rng.randn(w.shape[0], r, *([1] * (w.ndim - 2))).astype(np.float32)
  return a, b


def _expected(w, a, b, alpha, r, scale):
  delta = b.reshape(b.shape[0], r).astype(np.float64) @ a.reshape(r, -1)
  return (w + scale * alpha / r * delta.reshape(w.shape)).astype(w.dtype)


def _tiny_state(rng):
  return {
      "blk.attn.to_q.weight": rng.randn(6, 5).astype(np.float32),
      "blk.attn.to_q.bias": rng.randn(6).astype(np.float32),
      "blk.conv.weight": rng.randn(6, 3, 3, 3).astype(np.float32),
      "blk.proj.weight": rng.randn(4, 6, 1, 1).astype(np.float32),
      "blk.norm.weight": rng.randn(6).astype(np.float32),
  }


@pytest.mark.parametrize("layout", ["kohya", "peft", "peft_unprefixed"])
def test_fuse_equals_numpy_formula(layout):
  rng = np.random.RandomState(0)
  state = _tiny_state(rng)
  frozen = {k: v.copy() for k, v in state.items()}
  spec = {"blk.attn.to_q": (3, 6.0), "blk.conv": (2, None),
          "blk.proj": (2, 0.5)}
  lora, want = {}, dict(state)
  for m, (r, alpha) in spec.items():
    a, b = _pair(rng, state[m + ".weight"], r)
    if layout == "kohya":
      n = "lora_unet_" + m.replace(".", "_")
      lora[n + ".lora_down.weight"], lora[n + ".lora_up.weight"] = a, b
      alpha_key = n + ".alpha"
    else:
      n = ("unet." if layout == "peft" else "") + m
      lora[n + ".lora_A.weight"], lora[n + ".lora_B.weight"] = a, b
      alpha_key = n + ".alpha"
    if alpha is not None:
      lora[alpha_key] = np.array(alpha, np.float32)
    want[m + ".weight"] = _expected(state[m + ".weight"], a, b,
                                    r if alpha is None else alpha, r, 0.8)
  lora_frozen = {k: v.copy() for k, v in lora.items()}
  got = fuse_lora(state, lora, scale=0.8)
  assert got.keys() == state.keys()
  for k in state:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)
    assert got[k].dtype == state[k].dtype
  for k in state:  # inputs untouched
    assert np.array_equal(state[k], frozen[k])
  for k, v in lora.items():
    assert np.array_equal(v, lora_frozen[k])
  assert not np.array_equal(got["blk.conv.weight"], state["blk.conv.weight"])


def test_keeps_target_dtype_and_computes_in_wide_precision():
  rng = np.random.RandomState(1)
  w = rng.randn(4, 4).astype(np.float16)
  a, b = _pair(rng, w, 2)
  got = fuse_lora({"l.weight": w}, {"l.lora_A.weight": a,
                                    "l.lora_B.weight": b})
  assert got["l.weight"].dtype == np.float16
  np.testing.assert_array_equal(got["l.weight"], _expected(w, a, b, 2, 2, 1))


def test_peft_config_alphas_and_patterns():
  rng = np.random.RandomState(2)
  state = _tiny_state(rng)
  cfg = {"unet.r": 3, "unet.lora_alpha": 6.0,
         "unet.rank_pattern": {"conv": 2}, "unet.alpha_pattern": {"conv": 1.0},
         "text_encoder.r": 99}
  lora, want = {}, dict(state)
  for m, r, alpha in (("blk.attn.to_q", 3, 6.0), ("blk.conv", 2, 1.0)):
    a, b = _pair(rng, state[m + ".weight"], r)
    lora[f"unet.{m}.lora_A.weight"], lora[f"unet.{m}.lora_B.weight"] = a, b
    want[m + ".weight"] = _expected(state[m + ".weight"], a, b, alpha, r, 1.0)
  got = fuse_lora(state, lora, peft_config=cfg)
  for k in state:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)
  # use_rslora: alpha / sqrt(r).
  got = fuse_lora(state, lora, peft_config={"r": 3, "lora_alpha": 6.0,
                                            "rank_pattern": {"conv": 2},
                                            "use_rslora": True})
  a, b = lora["unet.blk.attn.to_q.lora_A.weight"], lora[
      "unet.blk.attn.to_q.lora_B.weight"]
  want_q = _expected(state["blk.attn.to_q.weight"], a, b, 6.0 * np.sqrt(3),
                     3, 1.0)
  np.testing.assert_allclose(got["blk.attn.to_q.weight"], want_q, atol=1e-6)
  with pytest.raises(LoRAError, match="PEFT config says 5"):
    fuse_lora(state, lora, peft_config={"r": 5})


def test_component_selection_and_text_encoder_prefixes():
  rng = np.random.RandomState(3)
  te = {"encoder.layers.0.self_attn.q_proj.weight":
            rng.randn(4, 4).astype(np.float32)}  # bare CLIPTextModel keys
  unet = _tiny_state(rng)
  a1, b1 = _pair(rng, te["encoder.layers.0.self_attn.q_proj.weight"], 2)
  a2, b2 = _pair(rng, unet["blk.proj.weight"], 2)
  lora = {
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
          a1,
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
          b1,
      "lora_unet_blk_proj.lora_down.weight": a2,
      "lora_unet_blk_proj.lora_up.weight": b2,
      "lora_te2_something.lora_down.weight": a1,  # other component: ignored
      "lora_te2_something.lora_up.weight": b1,
  }
  got_te = fuse_lora(te, lora, component="text_encoder", scale=0.5)
  k = "encoder.layers.0.self_attn.q_proj.weight"
  np.testing.assert_allclose(got_te[k], _expected(te[k], a1, b1, 2, 2, 0.5),
                             atol=1e-6)
  got_unet = fuse_lora(unet, lora)
  np.testing.assert_allclose(
      got_unet["blk.proj.weight"],
      _expected(unet["blk.proj.weight"], a2, b2, 2, 2, 1.0), atol=1e-6)
  assert np.array_equal(got_unet["blk.conv.weight"], unet["blk.conv.weight"])
  peft = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
          ".lora_A.weight": a1,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
          ".lora_B.weight": b1}
  got = fuse_lora(te, peft, component="text_encoder", scale=0.5)
  np.testing.assert_array_equal(got[k], got_te[k])


def test_mismatched_rank_raises():
  rng = np.random.RandomState(4)
  state = _tiny_state(rng)
  a = rng.randn(3, 5).astype(np.float32)
  b = rng.randn(6, 2).astype(np.float32)
  with pytest.raises(LoRAError, match=r"rank mismatch.*rank 3.*\(6, 2\)"):
    fuse_lora(state, {"lora_unet_blk_attn_to_q.lora_down.weight": a,
                      "lora_unet_blk_attn_to_q.lora_up.weight": b})


def test_shape_that_does_not_fit_raises_with_shapes():
  rng = np.random.RandomState(5)
  state = _tiny_state(rng)
  a = rng.randn(2, 7).astype(np.float32)
  b = rng.randn(6, 2).astype(np.float32)
  with pytest.raises(LoRAError,
                     match=r"\(6, 7\) does not fit 'blk.attn.to_q.weight' "
                     r"\(6, 5\)"):
    fuse_lora(state, {"blk.attn.to_q.lora_A.weight": a,
                      "blk.attn.to_q.lora_B.weight": b})


@pytest.mark.parametrize("key", [
    "lora_unet_blk_attn_to_k.lora_down.weight",  # no such module
    "unet.blk.attn.to_k.lora_A.weight",
    "lora_unet_blk_attn_to_q.hada_w1_a",  # LoHa: unsupported layout
    "unet.blk.attn.to_q.lora_magnitude_vector",  # DoRA
])
def test_unmatched_or_unknown_key_raises_naming_it(key):
  rng = np.random.RandomState(6)
  state = _tiny_state(rng)
  lora = {key: rng.randn(2, 5).astype(np.float32)}
  partner = (key.replace("lora_down", "lora_up").replace("lora_A", "lora_B"))
  if partner != key:
    lora[partner] = rng.randn(6, 2).astype(np.float32)
  with pytest.raises(LoRAError, match=key.replace(".", r"\.")):
    fuse_lora(state, lora)


def test_missing_up_tensor_raises():
  with pytest.raises(LoRAError, match="needs both"):
    fuse_lora({"l.weight": np.zeros((2, 2), np.float32)},
              {"l.lora_A.weight": np.zeros((1, 2), np.float32)})


def test_ambiguous_kohya_name_raises():
  state = {"a_b.c.weight": np.zeros((2, 2), np.float32),
           "a.b_c.weight": np.zeros((2, 2), np.float32)}
  lora = {"lora_unet_a_b_c.lora_down.weight": np.ones((1, 2), np.float32),
          "lora_unet_a_b_c.lora_up.weight": np.ones((2, 1), np.float32)}
  with pytest.raises(LoRAError, match="several modules"):
    fuse_lora(state, lora)


def test_ldm_named_kohya_equals_diffusers_named():
  """The LDM spelling of each module (hand-written table) fuses into the
  same weight as its diffusers spelling; includes an upsampler conv, which
  sits at output_blocks.K.1 in a block without attention."""
  from jaxlib_models.diffusion import single_file
  rng = np.random.RandomState(7)
  names = dict(LDM_NAMES)
  names["up_blocks.0.upsamplers.0.conv"] = "output_blocks_1_1_conv"
  cfg = {"layers_per_block": 1, "down_block_types": UNET_CFG[
      "down_block_types"], "up_block_types": UNET_CFG["up_block_types"]}
  table = single_file.unet_module_table(cfg)
  shapes = {m: (8, 8, 3, 3) if "conv" in m else (8, 8) for m in names}
  state = {m + ".weight": rng.randn(*s).astype(np.float32)
           for m, s in shapes.items()}
  # Every other module of the layout, so the config inference sees them.
  for d, _, _ in table:
    leaf = (".proj_out.weight" if ".attentions." in d else
            ".conv1.weight" if ".resnets." in d else ".weight")
    state.setdefault(d + leaf, np.zeros((2, 2), np.float32))
  ldm, dif = {}, {}
  for m, n in names.items():
    a, b = _pair(rng, state[m + ".weight"], 2)
    ldm[f"lora_unet_{n}.lora_down.weight"] = a
    ldm[f"lora_unet_{n}.lora_up.weight"] = b
    u = "lora_unet_" + m.replace(".", "_")
    dif[u + ".lora_down.weight"], dif[u + ".lora_up.weight"] = a, b
  got_ldm = fuse_lora(state, ldm)
  got_dif = fuse_lora(state, dif)
  for m in names:
    assert not np.array_equal(got_dif[m + ".weight"], state[m + ".weight"])
    np.testing.assert_array_equal(got_ldm[m + ".weight"],
                                  got_dif[m + ".weight"])
  # Same result with the config given instead of inferred.
  got = fuse_lora(state, ldm, unet_config=cfg)
  np.testing.assert_array_equal(got["conv_in.weight"],
                                got_dif["conv_in.weight"])


def test_read_lora_round_trip(tmp_path):
  from jaxlib_models.diffusion import convert
  x = {"unet.a.lora_A.weight": np.ones((2, 3), np.float32)}
  convert.write_safetensors(str(tmp_path / "l.safetensors"), x)
  state, meta = lora_lib.read_lora(str(tmp_path / "l.safetensors"),
                                   with_metadata=True)
  assert meta is None
  np.testing.assert_array_equal(state["unet.a.lora_A.weight"], x[
      "unet.a.lora_A.weight"])


# --------------------------------------------------------------------------
# Oracles: diffusers 0.39 + PEFT, transformers 5.


def _torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  return torch, diffusers


def _np_state(module):
  """Plain weights after a PEFT merge (drops adapters, `base_layer.`)."""
  return {k.replace(".base_layer.", "."): v.detach().numpy().copy()
          for k, v in module.state_dict().items() if ".lora_" not in k}


def _unet_lora(rng, base, prefix="unet."):
  peft, kohya, ldm = {}, {}, {}
  for m, (r, alpha) in UNET_MODULES.items():
    a, b = _pair(rng, base[m + ".weight"], r)
    peft[f"{prefix}{m}.lora_A.weight"] = a
    peft[f"{prefix}{m}.lora_B.weight"] = b
    for d, name in ((kohya, m.replace(".", "_")), (ldm, LDM_NAMES[m])):
      d[f"lora_unet_{name}.lora_down.weight"] = a
      d[f"lora_unet_{name}.lora_up.weight"] = b
      d[f"lora_unet_{name}.alpha"] = np.array(alpha, np.float32)
  return peft, kohya, ldm


def _max_diff(a, b):
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.oracle
def test_peft_unet_lora_matches_diffusers_fuse():
  torch, diffusers = _torch()
  unet = diffusers.UNet2DConditionModel(**UNET_CFG)
  base = _np_state(unet)
  peft, _, _ = _unet_lora(np.random.RandomState(8), base)
  alphas = {f"unet.{m}.alpha": a for m, (_, a) in UNET_MODULES.items()}
  unet.load_lora_adapter({k: torch.from_numpy(v) for k, v in peft.items()},
                         prefix="unet", adapter_name="a",
                         network_alphas=alphas)
  unet.fuse_lora(lora_scale=0.7)
  unet.unload_lora()
  want = _np_state(unet)
  ours_in = dict(peft)
  ours_in.update({k: np.array(a, np.float32) for k, a in alphas.items()})
  got = fuse_lora(base, ours_in, scale=0.7)
  assert _max_diff(got, want) <= 1e-6
  changed = [k for k in base if not np.array_equal(got[k], base[k])]
  assert len(changed) == len(UNET_MODULES)


@pytest.mark.oracle
def test_peft_metadata_config_matches_diffusers_fuse():
  """Alphas from a PEFT config (diffusers' `lora_adapter_metadata`)."""
  torch, diffusers = _torch()
  unet = diffusers.UNet2DConditionModel(**UNET_CFG)
  base = _np_state(unet)
  peft, _, _ = _unet_lora(np.random.RandomState(9), base)
  meta = {"unet.r": 4, "unet.lora_alpha": 3.0,
          # PEFT takes the first matching pattern: specific ones first.
          "unet.rank_pattern": {"up_blocks.1.attentions.1.proj_in": 3,
                                "proj_in": 2, "^conv_in": 3},
          "unet.alpha_pattern": {"conv1": 12.0},
          "unet.target_modules": sorted(UNET_MODULES)}
  unet.load_lora_adapter({k: torch.from_numpy(v) for k, v in peft.items()},
                         prefix="unet", adapter_name="m", metadata=meta)
  unet.fuse_lora(lora_scale=1.3)
  unet.unload_lora()
  got = fuse_lora(base, peft, scale=1.3, peft_config=meta)
  assert _max_diff(got, _np_state(unet)) <= 1e-6


@pytest.mark.oracle
@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_kohya_unet_lora_matches_diffusers_converter(naming):
  """diffusers' kohya converter (`lora_state_dict`, with its sgm/LDM block
  remapping) + PEFT fuse vs ours on the raw kohya dict."""
  torch, diffusers = _torch()
  unet = diffusers.UNet2DConditionModel(**UNET_CFG)
  base = _np_state(unet)
  _, kohya, ldm = _unet_lora(np.random.RandomState(10), base)
  raw = kohya if naming == "diffusers" else ldm
  sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(
      {k: torch.from_numpy(v) for k, v in raw.items()},
      unet_config=unet.config)
  unet.load_lora_adapter(sd, prefix="unet", adapter_name="k",
                         network_alphas=alphas)
  unet.fuse_lora(lora_scale=0.6)
  unet.unload_lora()
  got = fuse_lora(base, raw, scale=0.6)
  assert _max_diff(got, _np_state(unet)) <= 1e-6


@pytest.mark.oracle
def test_kohya_text_encoder_lora_matches_diffusers():
  torch, diffusers = _torch()
  transformers = pytest.importorskip("transformers")
  from diffusers.loaders.lora_base import fuse_text_encoder_lora
  te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CFG))
  base = _np_state(te)
  rng = np.random.RandomState(11)
  kohya = {}
  for m, (r, alpha) in TEXT_MODULES.items():
    key = m if m + ".weight" in base else m[len("text_model."):]
    a, b = _pair(rng, base[key + ".weight"], r)
    n = "lora_te_" + m.replace(".", "_")
    kohya[n + ".lora_down.weight"], kohya[n + ".lora_up.weight"] = a, b
    kohya[n + ".alpha"] = np.array(alpha * r / 2, np.float32)
  sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(
      {k: torch.from_numpy(v) for k, v in kohya.items()})
  # transformers 5's CLIPTextModel has no `text_model.` level, which
  # diffusers 0.39's loader expects; drop it from the converted names.
  bare = lambda k: k.replace("text_encoder.text_model.", "text_encoder.")
  sd = {bare(k): v for k, v in sd.items()}
  alphas = {bare(k): v for k, v in alphas.items()}
  diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(
      sd, alphas, te, prefix="text_encoder", adapter_name="t")
  fuse_text_encoder_lora(te, lora_scale=0.9)
  want = _np_state(te)
  got = fuse_lora(base, kohya, component="text_encoder", scale=0.9)
  assert _max_diff(got, want) <= 1e-6
  assert sum(not np.array_equal(got[k], base[k]) for k in base) == len(
      TEXT_MODULES)
