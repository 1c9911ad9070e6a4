"""SD VAE (AutoencoderKL) vs diffusers 0.39.0 (PyTorch), conversion, API.

Parity tolerance: max abs diff <= 1e-4 in float32 (brief §8; outputs reach
|5| because the random weights are perturbed; observed ~1e-5). Weights travel
through files: diffusers `save_pretrained` -> `safetensors.numpy.load_file`
-> `convert.params_from_torch_state` into our abstract tree.

Planted-bug checks done while writing these tests (each made a test fail):
symmetric (1, 1) padding in the downsampler, GroupNorm eps 1e-5 (caught only
by the low-variance mid-block test), dropping the attention residual, no
logvar clip, scaling latents by 1 / scaling_factor, sampling with
std = exp(logvar).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import convert, loaders, vae

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = dict(block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8)
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
  """(cfg, random params) of the tiny config, built once per module."""
  cfg = vae.VAEConfig(**TINY)
  return cfg, vae.init_vae_params(cfg, jax.random.key(0))


def _torch():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  return torch, diffusers


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _diffusers_vae(torch, diffusers, **kw):
  """Random tiny AutoencoderKL; every tensor perturbed so that norm scales
  and biases are not 1 / 0 (a scale/bias swap would otherwise pass)."""
  torch.manual_seed(0)
  n = len(kw["block_out_channels"])
  ref = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return ref


def _load(tmp_path, ref):
  """save_pretrained -> safetensors.numpy -> our tree (the real path)."""
  import json

  from safetensors.numpy import load_file
  ref.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as fh:
    cfg = vae.VAEConfig.from_diffusers_dict(json.load(fh))
  state = load_file(tmp_path / vae.DIFFUSERS_WEIGHTS_NAME)
  params = convert.params_from_torch_state(
      state.__getitem__, state.keys(), vae.abstract_vae_params(cfg),
      source=str(tmp_path))
  return cfg, params


@pytest.mark.oracle
def test_matches_diffusers_encode_decode_reconstruct(tmp_path):
  torch, diffusers = _torch()
  ref = _diffusers_vae(torch, diffusers, **TINY)
  cfg, params = _load(tmp_path, ref)
  assert cfg == vae.VAEConfig(**TINY)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype("f4")
  z = np.random.RandomState(1).randn(2, 16, 16, 4).astype("f4")
  with torch.no_grad():
    post = ref.encode(torch.tensor(_nchw(x))).latent_dist
    dec = ref.decode(torch.tensor(_nchw(z))).sample
    rec = ref(torch.tensor(_nchw(x))).sample  # sample_posterior=False
  model = vae.AutoencoderKL(cfg)
  p = {"params": params}
  mean, logvar = model.apply(p, x, method="encode")
  assert _max_diff(mean, _nhwc(post.mean)) <= TOL
  assert _max_diff(logvar, _nhwc(post.logvar)) <= TOL
  assert _max_diff(model.apply(p, z, method="decode"), _nhwc(dec)) <= TOL
  got_rec = model.apply(p, x)
  assert _max_diff(got_rec, _nhwc(rec)) <= TOL
  assert float(np.abs(_nhwc(rec)).max()) > 1.0  # not a vanishing signal
  # Pipeline helpers: mode() * scaling_factor, and its inverse.
  lat = vae.encode_latents(params, x, cfg)
  want = _nhwc(post.mode()) * cfg.scaling_factor
  assert _max_diff(lat, want) <= TOL
  assert _max_diff(vae.decode_latents(params, z * cfg.scaling_factor, cfg),
                   _nhwc(dec)) <= TOL
  # load_vae reads the same folder into the same tree.
  cfg2, params2 = loaders.load_vae(str(tmp_path), dtype="bfloat16")
  assert cfg2 == dataclasses.replace(cfg, dtype="bfloat16")
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.oracle
def test_logvar_clip_matches_diffusers(tmp_path):
  """A large quant_conv bias on the logvar half saturates the clip at 20."""
  torch, diffusers = _torch()
  ref = _diffusers_vae(torch, diffusers, **TINY)
  with torch.no_grad():
    ref.quant_conv.bias[4:6] += 60.0
    ref.quant_conv.bias[6:] -= 80.0
  cfg, params = _load(tmp_path, ref)
  x = np.random.RandomState(2).uniform(-1, 1, (1, 32, 32, 3)).astype("f4")
  with torch.no_grad():
    post = ref.encode(torch.tensor(_nchw(x))).latent_dist
  _, logvar = vae.AutoencoderKL(cfg).apply({"params": params}, x,
                                           method="encode")
  logvar = np.asarray(logvar)
  assert logvar[..., :2].max() == 20.0 and logvar[..., 2:].min() == -30.0
  assert _max_diff(logvar, _nhwc(post.logvar)) <= TOL


@pytest.mark.oracle
def test_mid_block_on_low_variance_input_matches_diffusers(tmp_path):
  """GroupNorm eps matters only when a group's variance is ~eps: feed the
  mid block (resnet, attention, resnet) activations of std 1e-3."""
  torch, diffusers = _torch()
  ref = _diffusers_vae(torch, diffusers, **TINY)
  cfg, params = _load(tmp_path, ref)
  norms = [m for m in ref.modules() if isinstance(m, torch.nn.GroupNorm)]
  assert len(norms) == 24 and {m.eps for m in norms} == {cfg.norm_eps}
  h = 1e-3 * np.random.RandomState(4).randn(2, 4, 4, 64).astype("f4")
  with torch.no_grad():
    want = ref.decoder.mid_block(torch.tensor(_nchw(h)))
  got = vae.MidBlock(cfg).apply(
      {"params": params["decoder"]["mid_block"]}, h)
  assert _max_diff(got, _nhwc(want)) <= TOL


@pytest.mark.oracle
def test_variant_without_attention_or_quant_convs(tmp_path):
  """Three levels (factor 4), no mid attention, no (post_)quant_conv,
  shift_factor set: encode_latents = (mean - shift) * scale."""
  torch, diffusers = _torch()
  kw = dict(block_out_channels=(16, 32, 32), layers_per_block=1,
            norm_num_groups=4, latent_channels=3, mid_block_add_attention=False,
            use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=0.5, shift_factor=0.1)
  ref = _diffusers_vae(torch, diffusers, **kw)
  cfg, params = _load(tmp_path, ref)
  assert cfg.downsample_factor == 4 and cfg.shift_factor == 0.1
  assert "quant_conv" not in params and "post_quant_conv" not in params
  assert "attentions_0" not in params["encoder"]["mid_block"]
  x = np.random.RandomState(3).uniform(-1, 1, (2, 16, 24, 3)).astype("f4")
  with torch.no_grad():
    post = ref.encode(torch.tensor(_nchw(x))).latent_dist
    rec = ref(torch.tensor(_nchw(x))).sample
  lat = vae.encode_latents(params, x, cfg)
  assert lat.shape == (2, 4, 6, 3)
  assert _max_diff(lat, (_nhwc(post.mean) - 0.1) * 0.5) <= TOL
  out = vae.decode_latents(params, lat, cfg)
  assert _max_diff(out, _nhwc(rec)) <= TOL


@pytest.mark.oracle
def test_full_size_tree_matches_diffusers_sd15_keys_and_shapes():
  """SD 1.5 VAE structure (meta tensors, no weights): same keys and shapes
  through the naming rule, 83,653,863 parameters."""
  torch, diffusers = _torch()
  sd15 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
              norm_num_groups=32, sample_size=512, act_fn="silu",
              in_channels=3, out_channels=3, _class_name="AutoencoderKL",
              _diffusers_version="0.6.0")
  cfg = vae.VAEConfig.from_diffusers_dict(sd15)
  assert cfg == vae.VAEConfig()
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(
        **{k: v for k, v in sd15.items() if not k.startswith("_")})
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  abstract = vae.abstract_vae_params(cfg)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got = {}
  for path, leaf in flat:
    names = tuple(k.key for k in path)
    shape = tuple(leaf.shape)
    if names[-1] == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (
          shape[3], shape[2], shape[0], shape[1])
    got[convert.path_to_torch_key(names)] = shape
  assert got == want
  assert sum(int(np.prod(s)) for s in got.values()) == 83_653_863


def test_round_trip_flax_torch_flax_is_identity(tiny):
  cfg, params = tiny
  state = convert.torch_state_from_params(params)
  for key in ("encoder.mid_block.attentions.0.to_out.0.weight",
              "encoder.mid_block.attentions.0.group_norm.weight",
              "encoder.down_blocks.0.downsamplers.0.conv.weight",
              "decoder.up_blocks.0.upsamplers.0.conv.bias",
              "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
              "quant_conv.weight", "post_quant_conv.bias"):
    assert key in state, key
  assert state["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
  back = convert.params_from_torch_state(state.__getitem__, state.keys(),
                                         vae.abstract_vae_params(cfg))
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_misshapen_or_missing_tensor_raises_naming_it(tiny):
  cfg, params = tiny
  abstract = vae.abstract_vae_params(cfg)
  state = convert.torch_state_from_params(params)
  key = "decoder.mid_block.attentions.0.to_k.weight"
  bad = dict(state, **{key: np.zeros((64, 32), np.float32)})
  with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.")):
    convert.params_from_torch_state(bad.__getitem__, bad.keys(), abstract)
  del bad[key]
  with pytest.raises(convert.ConversionError, match="missing"):
    convert.params_from_torch_state(bad.__getitem__, bad.keys(), abstract)


def test_image_size_not_divisible_raises():
  cfg = vae.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                      norm_num_groups=4)
  assert cfg.downsample_factor == 8
  abstract = vae.abstract_vae_params(cfg)
  x = jax.ShapeDtypeStruct((1, 36, 40, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"36x40.*factor 8"):
    jax.eval_shape(lambda p, x: vae.AutoencoderKL(cfg).apply(
        {"params": p}, x, method="encode"), abstract, x)
  ok = jax.eval_shape(lambda p, x: vae.AutoencoderKL(cfg).apply(
      {"params": p}, x, method="encode"), abstract,
                      jax.ShapeDtypeStruct((1, 40, 48, 3), jnp.float32))
  assert ok[0].shape == (1, 5, 6, 4)


def test_sampled_latents_have_the_posterior_statistics(tiny):
  """sample = (mean + exp(logvar / 2) eps) * scale: standardised residuals
  have mean ~0, std ~1; mode has none; same key -> same sample."""
  cfg, params = tiny
  x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1,
                         maxval=1)
  mode = vae.encode_latents(params, x, cfg)
  mean, logvar = vae.AutoencoderKL(cfg).apply({"params": params}, x,
                                              method="encode")
  # jit vs eager rounding only.
  assert _max_diff(mode, mean * cfg.scaling_factor) <= 1e-5
  s1 = vae.encode_latents(params, x, cfg, key=jax.random.key(3))
  s1b = vae.encode_latents(params, x, cfg, key=jax.random.key(3))
  s2 = vae.encode_latents(params, x, cfg, key=jax.random.key(4))
  np.testing.assert_array_equal(s1, s1b)
  assert not np.allclose(s1, s2)
  std = np.exp(0.5 * np.asarray(logvar)) * cfg.scaling_factor
  r = (np.asarray(s1) - np.asarray(mode)) / std  # 4096 N(0, 1) draws
  assert abs(r.mean()) < 0.1 and abs(r.std() - 1.0) < 0.1
  assert np.corrcoef(r.ravel(), (np.asarray(s2) - mode).ravel() /
                     std.ravel())[0, 1] < 0.1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_tracks_float32(tiny, dtype):
  """Smoke + accuracy: same float32 params, 16-bit compute (GroupNorm and
  softmax in float32) stays within a few percent of float32."""
  cfg, params = tiny
  low = dataclasses.replace(cfg, dtype=dtype)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1,
                         maxval=1)
  run = lambda c: jax.jit(vae.AutoencoderKL(c).apply)({"params": params}, x)
  ref, out = run(cfg), run(low)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  scale = float(jnp.abs(ref).max())
  assert _max_diff(out, ref) <= 0.05 * scale
  assert _max_diff(out, ref) > 0  # really ran in 16 bits
  abstract = vae.abstract_vae_params(low)
  assert {l.dtype for l in jax.tree.leaves(abstract)} == {np.dtype("f4")}


def test_config_validation_and_unsupported_diffusers_keys():
  with pytest.raises(ValueError, match="norm_num_groups=32"):
    vae.VAEConfig(block_out_channels=(48, 64))
  with pytest.raises(ValueError, match="act_fn"):
    vae.VAEConfig(act_fn="tanh")
  with pytest.raises(ValueError, match="dtype"):
    vae.VAEConfig(dtype="float64")
  base = dict(block_out_channels=[32, 64], norm_num_groups=8,
              down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2)
  with pytest.raises(ValueError, match=r"my\.json.*'frobnicate'"):
    vae.VAEConfig.from_diffusers_dict(dict(base, frobnicate=1),
                                      source="my.json")
  with pytest.raises(ValueError, match="latents_mean"):
    vae.VAEConfig.from_diffusers_dict(dict(base, latents_mean=[0.0] * 4))
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    vae.VAEConfig.from_diffusers_dict(dict(
        base, down_block_types=["DownEncoderBlock2D",
                                "AttnDownEncoderBlock2D"]))
  with pytest.raises(ValueError, match="up_block_types has 1"):
    vae.VAEConfig.from_diffusers_dict(dict(
        base, up_block_types=["UpDecoderBlock2D"]))
  with pytest.raises(ValueError, match="AutoencoderKL"):
    vae.VAEConfig.from_diffusers_dict(dict(base, _class_name="VQModel"))
  cfg = vae.VAEConfig.from_diffusers_dict(dict(base, force_upcast=False,
                                               sample_size=64),
                                          dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and cfg.layers_per_block == 1
