"""Loading whole SD models: diffusers folders, single files, LoRA, the cache.

A tiny SD pipeline folder is written by diffusers/transformers
(`save_pretrained`), so every tensor takes the real path: safetensors ->
(LoRA fusing) -> strict conversion -> our modules, whose outputs must equal
the PyTorch modules' (max abs 1e-4, float32).

Planted-bug checks done while writing these tests (each made a test fail):
skipping the LoRA on a cached load (stale cache key), fusing the LoRA at
scale 1 whatever `lora_scales` says, loading a VAE folder as a UNet without
a class check.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import missing_asset

from jaxlib_models.diffusion import (cache, clip, convert, loaders, lora,
                                     single_file)
from jaxlib_models.diffusion import unet as unet_lib
from jaxlib_models.diffusion import vae as vae_lib

pytestmark = [pytest.mark.usefixtures("fast_compile"), pytest.mark.oracle]

UNET = dict(block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            sample_size=16)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1,
           norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("sd")
  unet = diffusers.UNet2DConditionModel(**UNET).eval()
  vae = diffusers.AutoencoderKL(**VAE).eval()
  text = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**TEXT)).eval()
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  text.save_pretrained(root / "text_encoder")
  try:
    tok = loaders.default_tokenizer()
  except FileNotFoundError:
    missing_asset("no bundled CLIP BPE vocabulary: pip install --no-deps"
                  " open-clip-torch==3.3.0")
  tok.save(str(root / "tokenizer"))
  (root / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"],
      "vae": ["diffusers", "x"], "text_encoder": ["transformers", "x"],
      "tokenizer": ["transformers", "x"]}))
  return root, torch, unet, vae, text


def _unet_out(torch, unet, params, cfg):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  t = np.array([999, 10])
  c = rng.standard_normal((2, 5, 32)).astype(np.float32)
  with torch.no_grad():
    want = unet(torch.from_numpy(x), torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(c)).sample.numpy()
  got = unet_lib.UNet2DConditionModel(cfg).apply(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
      jnp.asarray(t), jnp.asarray(c))
  return np.asarray(got).transpose(0, 3, 1, 2), want


def test_sd_folder_loads_and_matches_pytorch(sd_folder, tmp_path,
                                             monkeypatch):
  root, torch, unet, vae, text = sd_folder
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
  comps = loaders.load_sd_folder(str(root))
  got, want = _unet_out(torch, unet, comps.unet, comps.unet_config)
  assert np.abs(got - want).max() < 1e-4
  # VAE decode and the text encoder through the same folder.
  z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(
      np.float32)
  with torch.no_grad():
    img = vae.decode(torch.from_numpy(z)).sample.numpy()
  ours = vae_lib.AutoencoderKL(comps.vae_config).apply(
      {"params": comps.vae}, jnp.asarray(z.transpose(0, 2, 3, 1)),
      method="decode")
  assert np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - img).max() < 1e-4
  ids = comps.tokenizer(["a photo of a cat"])["input_ids"]
  with torch.no_grad():
    hid = text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
  mine = clip.encode_text(comps.text, comps.text_config,
                          jnp.asarray(ids)).last_hidden_state
  assert np.abs(np.asarray(mine) - hid.numpy()).max() < 1e-4


def test_second_load_hits_the_cache(sd_folder, tmp_path, monkeypatch):
  root = sd_folder[0]
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
  calls = []
  real = convert.params_from_torch_state
  monkeypatch.setattr(convert, "params_from_torch_state",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  _, p1 = loaders.load_unet(str(root / "unet"))
  _, p2 = loaders.load_unet(str(root / "unet"))
  assert len(calls) == 1
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def _peft_lora(state, rank=2, seed=0):
  """A PEFT-layout LoRA on every attn1 projection of the tiny UNet."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, w in state.items():
    if ".attn1.to_" in k and k.endswith(".weight") and w.ndim == 2:
      mod = k[:-len(".weight")]
      out[f"unet.{mod}.lora_A.weight"] = rng.standard_normal(
          (rank, w.shape[1])).astype(np.float32)
      out[f"unet.{mod}.lora_B.weight"] = rng.standard_normal(
          (w.shape[0], rank)).astype(np.float32)
  return out


def test_lora_is_fused_at_load_time_and_keyed_in_the_cache(
    sd_folder, tmp_path, monkeypatch):
  root = sd_folder[0]
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
  state = convert.read_safetensors_folder(str(root / "unet"))
  ldict = _peft_lora(state)
  path = str(tmp_path / "lora.safetensors")
  convert.write_safetensors(path, ldict)
  cfg, plain = loaders.load_unet(str(root / "unet"))
  _, fused = loaders.load_unet(str(root / "unet"), loras=[path],
                               lora_scales=[0.5])
  want = unet_lib.unet_params_from_state(
      cfg, lora.fuse_lora(state, ldict, scale=0.5))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               fused, want)
  q = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1",
       "to_q", "kernel")
  get = lambda t: t[q[0]][q[1]][q[2]][q[3]][q[4]][q[5]]
  assert np.abs(get(fused) - get(plain)).max() > 1e-3
  # A different scale is a different cache entry.
  _, other = loaders.load_unet(str(root / "unet"), loras=[path],
                               lora_scales=[1.0])
  assert np.abs(get(other) - get(fused)).max() > 1e-3


def test_wrong_folders_give_named_errors(sd_folder, tmp_path):
  root = sd_folder[0]
  with pytest.raises(convert.ConversionError, match="AutoencoderKL"):
    loaders.load_unet(str(root / "vae"), cache=False)
  # A UNet folder whose weights lack one tensor.
  bad = tmp_path / "bad_unet"
  bad.mkdir()
  (bad / "config.json").write_text((root / "unet" / "config.json").read_text())
  state = convert.read_safetensors_folder(str(root / "unet"))
  gone = "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"
  del state[gone]
  convert.write_safetensors(str(bad / "diffusion_pytorch_model.safetensors"),
                            state)
  with pytest.raises(convert.ConversionError, match=gone.replace(".", r"\.")):
    loaders.load_unet(str(bad), cache=False)
  # A config that does not match the tensors: the misshapen one is named.
  d = json.loads((root / "unet" / "config.json").read_text())
  d["cross_attention_dim"] = 48
  (bad / "config.json").write_text(json.dumps(d))
  state[gone] = np.zeros((32, 32), np.float32)
  convert.write_safetensors(str(bad / "diffusion_pytorch_model.safetensors"),
                            state)
  with pytest.raises(convert.ConversionError, match="has shape"):
    loaders.load_unet(str(bad), cache=False)
  with pytest.raises(FileNotFoundError, match="vae/"):
    os.rename(root / "vae", tmp_path / "vae_moved")
    try:
      loaders.load_sd_folder(str(root), cache=False)
    finally:
      os.rename(tmp_path / "vae_moved", root / "vae")
  empty = tmp_path / "pickles"
  empty.mkdir()
  (empty / "config.json").write_text((root / "unet" / "config.json").read_text())
  (empty / "diffusion_pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    loaders.load_unet(str(empty), cache=False)


def test_single_file_checkpoint_loads_like_the_folder(sd_folder, tmp_path):
  root, torch, unet, _, _ = sd_folder
  comps = loaders.load_sd_folder(str(root), cache=False)
  parts = {
      "unet": convert.read_safetensors_folder(str(root / "unet")),
      "vae": convert.read_safetensors_folder(str(root / "vae")),
      "text_encoder": {
          (k if k.startswith("text_model.") else f"text_model.{k}"): v
          for k, v in convert.read_safetensors_folder(
              str(root / "text_encoder")).items()},
  }
  ucfg, vcfg = comps.unet_config, comps.vae_config
  ldm = single_file.ldm_checkpoint_from_components(
      parts, loaders._layout(ucfg), loaders._layout(vcfg))
  path = str(tmp_path / "tiny-sd.safetensors")
  convert.write_safetensors(path, ldm)
  one = loaders.load_single_file(path, unet_config=ucfg, vae_config=vcfg,
                                 text_config=comps.text_config)
  for a, b in ((one.unet, comps.unet), (one.vae, comps.vae),
               (one.text, comps.text)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  got, want = _unet_out(torch, unet, one.unet, one.unet_config)
  assert np.abs(got - want).max() < 1e-4


def test_controlnet_folder_loads_and_matches_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from jaxlib_models.diffusion import controlnet as cn
  torch.manual_seed(0)
  kw = {k: v for k, v in UNET.items() if k not in ("up_block_types",
                                                   "sample_size")}
  net = diffusers.ControlNetModel(conditioning_embedding_out_channels=(8, 16),
                                  **kw).eval()
  with torch.no_grad():  # diffusers zero-inits the output convs
    for p in net.parameters():
      p.add_(0.05 * torch.randn_like(p))
  net.save_pretrained(tmp_path / "cn")
  cfg, params = loaders.load_controlnet(str(tmp_path / "cn"), cache=False)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
  c = rng.standard_normal((1, 5, 32)).astype(np.float32)
  cond = rng.uniform(size=(1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    down, mid = net(torch.from_numpy(x), torch.tensor([500]),
                    encoder_hidden_states=torch.from_numpy(c),
                    controlnet_cond=torch.from_numpy(cond),
                    return_dict=False)
  ours_down, ours_mid = cn.ControlNetModel(cfg).apply(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
      jnp.asarray([500]), jnp.asarray(c),
      jnp.asarray(cond.transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(ours_mid).transpose(0, 3, 1, 2)
                - mid.numpy()).max() < 1e-4
  for a, b in zip(ours_down, down):
    assert np.abs(np.asarray(a).transpose(0, 3, 1, 2) - b.numpy()).max() < 1e-4
  with pytest.raises(convert.ConversionError, match="ControlNetModel"):
    loaders.load_unet(str(tmp_path / "cn"), cache=False)
