"""TAESD (AutoencoderTiny) vs diffusers 0.39.0 (PyTorch), conversion, API.

Parity tolerance: max abs diff <= 1e-4 in float32 (brief §8; observed
~1e-6). Weights travel through files: diffusers `save_pretrained` ->
`safetensors.numpy.load_file` -> `convert.params_from_torch_state`.

Planted-bug checks done while writing these tests (each made a test fail):
no decoder input clamp, latent_magnitude in the clamp instead of 3, no
[-1, 1] -> [0, 1] input map, no final 2 y - 1, stride-2 conv with bias,
dropping the block's final relu, bilinear upsampling in the nearest config.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import convert, loaders, taesd

pytestmark = pytest.mark.usefixtures("fast_compile")

TOL = 1e-4
SMALL = dict(encoder_block_out_channels=(16,) * 4,
             decoder_block_out_channels=(16,) * 4)
# Three stages (factor 4), other activation/upsampling, 3 latent channels,
# pipeline scaling on: exercises every config field the port reads.
VARIANT = dict(encoder_block_out_channels=(8,) * 3,
               decoder_block_out_channels=(12,) * 3,
               num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1),
               act_fn="silu", upsample_fn="bilinear", latent_channels=3,
               latent_magnitude=2.5, scaling_factor=0.5, shift_factor=0.25)


@pytest.fixture(scope="module")
def small():
  cfg = taesd.TAESDConfig(**SMALL)
  return cfg, taesd.init_taesd_params(cfg, jax.random.key(0))


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


def _liven(torch, ref):
  """The default init nearly kills the signal: perturb every tensor, then
  rescale the encoder's last conv so that latents have unit spread (they
  then span many of the uint8 storage levels of `forward`)."""
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    std = ref.encode(x).latents.std()
    ref.encoder.layers[-1].weight.div_(std)
    ref.encoder.layers[-1].bias.div_(std)


@pytest.mark.oracle
@pytest.mark.parametrize("kw", [SMALL, VARIANT], ids=["default", "variant"])
def test_matches_diffusers_encode_decode_forward(tmp_path, kw):
  from safetensors.numpy import load_file
  torch, diffusers = _torch()
  torch.manual_seed(0)
  ref = diffusers.AutoencoderTiny(**kw).eval()
  _liven(torch, ref)
  ref.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as fh:
    cfg = taesd.TAESDConfig.from_diffusers_dict(json.load(fh))
  assert cfg == taesd.TAESDConfig(**kw)
  state = load_file(tmp_path / taesd.DIFFUSERS_WEIGHTS_NAME)
  params = convert.params_from_torch_state(
      state.__getitem__, state.keys(), taesd.abstract_taesd_params(cfg),
      source=str(tmp_path))
  f = cfg.downsample_factor
  x = np.random.RandomState(0).uniform(-1, 1, (2, 8 * f, 6 * f, 3))
  x = x.astype("f4")
  # N(0, 3^2) latents reach the tanh clamp's non-linear range.
  z = 3 * np.random.RandomState(1).randn(2, 4, 3, cfg.latent_channels)
  z = z.astype("f4")
  with torch.no_grad():
    lat = ref.encode(torch.tensor(_nchw(x))).latents
    dec = ref.decode(torch.tensor(_nchw(z))).sample
    fwd = ref(torch.tensor(_nchw(x))).sample
  model = taesd.AutoencoderTiny(cfg)
  p = {"params": params}
  got = model.apply(p, x, method="encode")
  assert got.shape == (2, 8, 6, cfg.latent_channels)
  assert _max_diff(got, _nhwc(lat)) <= TOL
  assert float(np.std(_nhwc(lat))) > 0.5  # a live signal, not ~0
  assert _max_diff(model.apply(p, z, method="decode"), _nhwc(dec)) <= TOL
  assert _max_diff(model.apply(p, x), _nhwc(fwd)) <= TOL  # uint8 round trip
  # Pipeline helpers: (z - shift) * scale, and the inverse before decode.
  s, b = cfg.scaling_factor, cfg.shift_factor
  lat_s = taesd.encode_latents(params, x, cfg)
  assert _max_diff(lat_s, (_nhwc(lat) - b) * s) <= TOL
  assert _max_diff(taesd.decode_latents(params, (z - b) * s, cfg),
                   _nhwc(dec)) <= TOL
  cfg2, params2 = loaders.load_taesd(str(tmp_path), dtype="float16")
  assert cfg2 == dataclasses.replace(cfg, dtype="float16")
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.oracle
def test_full_size_tree_matches_diffusers_taesd_keys_and_shapes():
  """madebyollin/taesd structure (meta tensors): same keys and shapes."""
  torch, diffusers = _torch()
  with torch.device("meta"):
    ref = diffusers.AutoencoderTiny()
  cfg = taesd.TAESDConfig.from_diffusers_dict(dict(ref.config))
  assert cfg == taesd.TAESDConfig()
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  state = convert.torch_state_from_params(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                   taesd.abstract_taesd_params(cfg)))
  assert {k: v.shape for k, v in state.items()} == want
  assert "decoder.layers.1.weight" not in want  # activations take indices


def test_decoder_clamps_its_input_at_three(small):
  """tanh(z / 3) * 3: huge latents decode like saturated ones."""
  cfg, params = small
  params = {"params": params}
  dec = jax.jit(lambda z: taesd.AutoencoderTiny(cfg).apply(
      params, z, method="decode"))
  z = jnp.sign(jax.random.normal(jax.random.key(1), (1, 2, 2, 4)))
  np.testing.assert_array_equal(dec(1e3 * z), dec(1e4 * z))
  assert dec(z).shape == (1, 16, 16, 3)


def test_round_trip_flax_torch_flax_is_identity(small):
  cfg, params = small
  state = convert.torch_state_from_params(params)
  for key in ("encoder.layers.0.bias", "encoder.layers.1.conv.4.weight",
              "encoder.layers.2.weight", "decoder.layers.2.conv.0.weight",
              "decoder.layers.11.weight", "decoder.layers.18.bias"):
    assert key in state, key
  # Stride-2 and inner decoder convs have no bias; indices 1 (activation)
  # and 5 (upsampling) hold no tensors.
  for key in ("encoder.layers.2.bias", "decoder.layers.11.bias",
              "decoder.layers.1.weight", "decoder.layers.5.weight"):
    assert key not in state, key
  back = convert.params_from_torch_state(state.__getitem__, state.keys(),
                                         taesd.abstract_taesd_params(cfg))
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_misshapen_or_extra_tensor_raises_naming_it(small):
  cfg, params = small
  abstract = taesd.abstract_taesd_params(cfg)
  state = convert.torch_state_from_params(params)
  key = "decoder.layers.7.conv.2.weight"
  bad = dict(state, **{key: np.zeros((16, 16, 1, 1), np.float32)})
  with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.")):
    convert.params_from_torch_state(bad.__getitem__, bad.keys(), abstract)
  extra = dict(state, **{"encoder.layers.2.bias": np.zeros(16, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"layers\.2\.bias"):
    convert.params_from_torch_state(extra.__getitem__, extra.keys(),
                                    abstract)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_tracks_float32(small, dtype):
  """Smoke + accuracy of 16-bit compute with float32 params."""
  cfg, params = small
  low = dataclasses.replace(cfg, dtype=dtype)
  x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3), minval=-1,
                         maxval=1)

  def run(c):
    m = taesd.AutoencoderTiny(c)
    p = {"params": params}
    z = m.apply(p, x, method="encode")
    return z, m.apply(p, z, method="decode")

  (z32, y32), (z16, y16) = jax.jit(run, static_argnums=0)(cfg), jax.jit(
      run, static_argnums=0)(low)
  assert z16.dtype == y16.dtype == jnp.float32
  assert bool(jnp.isfinite(y16).all())
  assert 0 < _max_diff(z16, z32) <= 0.05 * float(jnp.abs(z32).max()) + 1e-3
  assert _max_diff(y16, y32) <= 0.05 * float(jnp.abs(y32).max()) + 1e-3


def test_config_validation_and_unsupported_diffusers_keys():
  with pytest.raises(ValueError, match="all entries must be"):
    taesd.TAESDConfig(encoder_block_out_channels=(32, 64, 64, 64))
  with pytest.raises(ValueError, match="equal length"):
    taesd.TAESDConfig(num_decoder_blocks=(3, 3, 1))
  with pytest.raises(ValueError, match="upsample_fn"):
    taesd.TAESDConfig(upsample_fn="bicubic")
  with pytest.raises(ValueError, match="act_fn"):
    taesd.TAESDConfig(act_fn="tanh")
  with pytest.raises(ValueError, match=r"t\.json.*'use_tiling_magic'"):
    taesd.TAESDConfig.from_diffusers_dict({"use_tiling_magic": True},
                                          source="t.json")
  with pytest.raises(ValueError, match="AutoencoderTiny"):
    taesd.TAESDConfig.from_diffusers_dict({"_class_name": "AutoencoderKL"})
  cfg = taesd.TAESDConfig.from_diffusers_dict(
      {"_class_name": "AutoencoderTiny", "block_out_channels": [64] * 4,
       "shift_factor": None, "latent_magnitude": 3}, dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and cfg.shift_factor == 0.0
  assert cfg.downsample_factor == 8 and cfg.upsample_factor == 8
