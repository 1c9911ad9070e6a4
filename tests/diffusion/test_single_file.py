"""Single-file LDM checkpoints (`diffusion.single_file`) vs diffusers.

Oracle tests write tiny diffusers models in LDM layout with our inverse
mapping and read them back with our forward mapping AND with diffusers'
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`; all three
must equal the original state dicts exactly (pure renames and reshapes).
The SD 1.5 test does the same on the full-size key sets, with a one-element
placeholder per tensor. Known LDM names of SD 1.5 are checked by hand.

Planted-bug checks done while writing these tests (each made a test fail):
numbering decoder levels top-down, upsampler at `.1` in attention blocks,
swapping in_layers.0/in_layers.2, no 1x1-conv reshape of VAE attention.
"""

import numpy as np
import pytest

from jaxlib_models.diffusion import convert
from jaxlib_models.diffusion import single_file as sf
from jaxlib_models.diffusion.convert import ConversionError

UNET_CFGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1,
         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    dict(block_out_channels=(16, 32, 32), layers_per_block=2,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                           "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                         "CrossAttnUpBlock2D")),
]
VAE_CFGS = [
    dict(block_out_channels=(8, 16), layers_per_block=1,
         down_block_types=("DownEncoderBlock2D",) * 2,
         up_block_types=("UpDecoderBlock2D",) * 2),
    dict(block_out_channels=(8, 8, 16), layers_per_block=2,
         down_block_types=("DownEncoderBlock2D",) * 3,
         up_block_types=("UpDecoderBlock2D",) * 3),
]
TEXT_CFG = dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=96, eos_token_id=97)


def _torch():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  return torch, diffusers


def _np(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    g = np.asarray(got[k])
    assert g.shape == want[k].shape, k
    np.testing.assert_array_equal(g, want[k], err_msg=k)


@pytest.mark.oracle
@pytest.mark.parametrize("i", [0, 1])
def test_ldm_round_trip_matches_diffusers_converter(tmp_path, i):
  torch, diffusers = _torch()
  transformers = pytest.importorskip("transformers")
  from diffusers.loaders import single_file_utils as sfu
  ucfg, vcfg = UNET_CFGS[i], VAE_CFGS[i]
  unet = diffusers.UNet2DConditionModel(
      **ucfg, cross_attention_dim=32, attention_head_dim=8,
      norm_num_groups=8, sample_size=8)
  vae = diffusers.AutoencoderKL(**vcfg, norm_num_groups=4, latent_channels=4)
  te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CFG))
  u, v, t = _np(unet), _np(vae), _np(te)
  ldm = sf.ldm_checkpoint_from_components(
      {"unet": u, "vae": v, "text_encoder": t}, ucfg, vcfg)
  assert not any(k.endswith("position_ids") for k in ldm)
  for k, x in ldm.items():  # LDM stores VAE attention as 1x1 convs
    if ".mid.attn_1." in k and k.endswith(("q.weight", "proj_out.weight")):
      assert x.ndim == 4 and x.shape[2:] == (1, 1), k
  ldm["alphas_cumprod"] = np.ones(10, np.float32)  # schedule buffer
  ldm["model_ema.decay"] = np.ones((), np.float32)
  ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (
      np.arange(16)[None])
  path = str(tmp_path / "sd.safetensors")
  convert.write_safetensors(path, ldm)

  ours = sf.read_single_file(path, ucfg, vcfg)
  _assert_same(ours["unet"], u)
  _assert_same(ours["vae"], v)
  _assert_same(ours["text_encoder"],
               {"text_model." + k: x for k, x in t.items()
                if not k.endswith("position_ids")})

  tl = {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in ldm.items()}
  theirs_u = sfu.convert_ldm_unet_checkpoint(tl, dict(unet.config))
  theirs_v = sfu.convert_ldm_vae_checkpoint(tl, dict(vae.config))
  theirs_t = sfu.convert_ldm_clip_checkpoint(tl)
  _assert_same({k: x.numpy() for k, x in theirs_u.items()}, u)
  _assert_same({k: x.numpy() for k, x in theirs_v.items()}, v)
  theirs_t = {k: x.numpy() for k, x in theirs_t.items()
              if not k.endswith("position_ids")}
  _assert_same(ours["text_encoder"], theirs_t)


@pytest.mark.oracle
def test_sd15_key_sets_match_diffusers_converter():
  """Full SD 1.5 UNet and VAE key sets (meta tensors, no memory): our
  LDM names, read back by diffusers' converter, give the original keys."""
  torch, diffusers = _torch()
  from diffusers.loaders import single_file_utils as sfu
  with torch.device("meta"):
    unet = diffusers.UNet2DConditionModel(
        **sf.SD15_UNET_CONFIG, cross_attention_dim=768, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(**sf.SD15_VAE_CONFIG, latent_channels=4)
  u = {k: np.full((1, 1), i, np.float32)
       for i, k in enumerate(unet.state_dict())}
  v = {k: np.full((1, 1), -i, np.float32)
       for i, k in enumerate(vae.state_dict())}
  assert len(u) == 686 and len(v) == 248
  ldm = sf.ldm_checkpoint_from_components({"unet": u, "vae": v})
  tl = {k: torch.from_numpy(x) for k, x in ldm.items()}
  theirs_u = sfu.convert_ldm_unet_checkpoint(tl, dict(unet.config))
  theirs_v = sfu.convert_ldm_vae_checkpoint(tl, dict(vae.config))
  _assert_same({k: x.numpy() for k, x in theirs_u.items()}, u)
  _assert_same({k: x.numpy().reshape(1, 1) for k, x in theirs_v.items()}, v)
  back = sf.split_ldm_checkpoint(ldm)
  _assert_same(back["unet"], u)
  _assert_same({k: x.reshape(1, 1) for k, x in back["vae"].items()}, v)


def test_sd15_unet_names_by_hand():
  table = {d: l for d, l, _ in sf.unet_module_table(sf.SD15_UNET_CONFIG)}
  want = {
      "conv_in": "input_blocks.0.0",
      "down_blocks.0.attentions.1": "input_blocks.2.1",
      "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
      "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
      "down_blocks.3.resnets.1": "input_blocks.11.0",
      "mid_block.attentions.0": "middle_block.1",
      "mid_block.resnets.1": "middle_block.2",
      "up_blocks.0.resnets.2": "output_blocks.2.0",
      "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
      "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
      "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
      "up_blocks.3.attentions.2": "output_blocks.11.1",
      "time_embedding.linear_2": "time_embed.2",
      "conv_norm_out": "out.0",
      "conv_out": "out.2",
  }
  for d, l in want.items():
    assert table[d] == l, d
  assert "up_blocks.3.upsamplers.0.conv" not in table
  assert "down_blocks.3.downsamplers.0.conv" not in table
  vae = {d: l for d, l, _ in sf.vae_module_table(sf.SD15_VAE_CONFIG)}
  assert vae["decoder.up_blocks.0.resnets.2"] == "decoder.up.3.block.2"
  assert vae["decoder.up_blocks.0.upsamplers.0.conv"] == (
      "decoder.up.3.upsample.conv")
  assert vae["encoder.mid_block.attentions.0"] == "encoder.mid.attn_1"


def _tiny_ldm(rng):
  """A tiny LDM dict written by hand (config UNET_CFGS[0] / VAE_CFGS[0])."""
  names = [
      "input_blocks.0.0", "time_embed.0", "time_embed.2",
      "input_blocks.1.0.in_layers.0", "input_blocks.1.0.in_layers.2",
      "input_blocks.1.0.emb_layers.1", "input_blocks.1.0.out_layers.0",
      "input_blocks.1.0.out_layers.3", "input_blocks.1.1.proj_in",
      "input_blocks.2.0.op", "input_blocks.3.0.in_layers.2",
      "input_blocks.3.0.skip_connection", "middle_block.0.in_layers.2",
      "middle_block.1.transformer_blocks.0.attn1.to_q",
      "middle_block.2.in_layers.2",
      "output_blocks.0.0.in_layers.2", "output_blocks.1.0.in_layers.2",
      "output_blocks.1.1.conv", "output_blocks.2.0.in_layers.2",
      "output_blocks.2.1.proj_out", "output_blocks.3.0.in_layers.2",
      "output_blocks.3.1.norm", "out.0", "out.2",
  ]
  state = {f"model.diffusion_model.{n}.weight": rng.randn(2, 2)
           for n in names}
  state["cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"] = (
      rng.randn(3, 3))  # transformers 4 layout: no text_model level
  return state


def test_forward_mapping_by_hand():
  rng = np.random.RandomState(0)
  state = _tiny_ldm(rng)
  out = sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0])
  u = out["unet"]
  pairs = {
      "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
      "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
      "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
      "input_blocks.3.0.skip_connection":
          "down_blocks.1.resnets.0.conv_shortcut",
      "middle_block.1.transformer_blocks.0.attn1.to_q":
          "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
      "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
      "output_blocks.3.1.norm": "up_blocks.1.attentions.1.norm",
      "out.2": "conv_out",
  }
  for l, d in pairs.items():
    np.testing.assert_array_equal(
        u[d + ".weight"], state[f"model.diffusion_model.{l}.weight"])
  assert len(u) == 24 and out["vae"] == {}
  assert list(out["text_encoder"]) == [
      "text_model.encoder.layers.0.mlp.fc1.weight"]


def test_leftover_keys_raise_naming_them():
  rng = np.random.RandomState(1)
  state = _tiny_ldm(rng)
  state["something_else.weight"] = rng.randn(2)
  with pytest.raises(ConversionError, match="something_else.weight"):
    sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0])
  # ...unless asked to ignore them.
  sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0],
                          ignore_prefixes=("something_else.",))
  state = _tiny_ldm(rng)
  bad = "model.diffusion_model.input_blocks.1.0.in_layers.1.weight"
  state[bad] = rng.randn(2)  # in_layers.1 is the SiLU: no parameters
  with pytest.raises(ConversionError, match="input_blocks.1.0.in_layers.1"):
    sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0])


def test_wrong_config_raises():
  rng = np.random.RandomState(2)
  state = _tiny_ldm(rng)
  with pytest.raises(ConversionError, match="fit no module"):
    sf.split_ldm_checkpoint(state, UNET_CFGS[1], VAE_CFGS[0])
  del state["model.diffusion_model.input_blocks.2.0.op.weight"]
  with pytest.raises(ConversionError,
                     match="no tensors.*down_blocks.0.downsamplers.0.conv"):
    sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0])


def test_ema_weights():
  rng = np.random.RandomState(3)
  state = _tiny_ldm(rng)
  ema = {}
  for k in state:
    if k.startswith("model.diffusion_model."):
      ema["model_ema." + k[len("model."):].replace(".", "")] = (
          state[k] + 1.0)
  state.update(ema)
  plain = sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0])
  with_ema = sf.split_ldm_checkpoint(state, UNET_CFGS[0], VAE_CFGS[0],
                                     use_ema=True)
  np.testing.assert_array_equal(with_ema["unet"]["conv_out.weight"],
                                plain["unet"]["conv_out.weight"] + 1.0)


def test_vae_attention_1x1_conv_to_linear():
  cfg = dict(layers_per_block=1, down_block_types=("D",),
             up_block_types=("U",))
  vae = {d + ".weight": np.zeros((2, 2), np.float32)
         for d, _, subs in sf.vae_module_table(cfg) if not subs}
  for part in ("encoder", "decoder"):
    for i in (0, 1):
      for s in ("norm1", "conv1", "norm2", "conv2"):
        vae[f"{part}.mid_block.resnets.{i}.{s}.weight"] = np.zeros(2)
    for s in ("group_norm", "to_q", "to_k", "to_v", "to_out.0"):
      vae[f"{part}.mid_block.attentions.0.{s}.weight"] = np.eye(2)
  for s in ("norm1", "conv1", "norm2", "conv2"):
    vae[f"encoder.down_blocks.0.resnets.0.{s}.weight"] = np.zeros(2)
    vae[f"decoder.up_blocks.0.resnets.0.{s}.weight"] = np.zeros(2)
    vae[f"decoder.up_blocks.0.resnets.1.{s}.weight"] = np.zeros(2)
  ldm = sf.ldm_checkpoint_from_components({"vae": vae}, vae_config=cfg)
  q = ldm["first_stage_model.decoder.mid.attn_1.q.weight"]
  assert q.shape == (2, 2, 1, 1)
  assert ldm["first_stage_model.encoder.mid.attn_1.norm.weight"].shape == (
      2, 2)
  back = sf.split_ldm_checkpoint(ldm, vae_config=cfg)["vae"]
  _assert_same(back, vae)


def test_pickle_checkpoint_gives_a_clear_error(tmp_path):
  with pytest.raises(ConversionError, match="safetensors"):
    sf.read_single_file(str(tmp_path / "model.ckpt"))


def test_unet_config_from_state():
  keys = [d + ".weight" for d, _, _ in sf.unet_module_table(UNET_CFGS[1])]
  cfg = sf.unet_config_from_state(keys)
  assert cfg["layers_per_block"] == 2
  assert cfg["down_block_types"] == UNET_CFGS[1]["down_block_types"]
  assert cfg["up_block_types"] == UNET_CFGS[1]["up_block_types"]
  assert cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn"
