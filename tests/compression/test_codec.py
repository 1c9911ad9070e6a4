"""compress/decompress on a tiny random-weight hyperprior: bit-exact round
trips on odd sizes, real files, and clear errors for bad files (wiring and
format; trained-model RD numbers are issue 6's open part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import codec, hyperprior
from tests.compression import images

pytestmark = pytest.mark.usefixtures("fast_compile")

CFG = hyperprior.HyperpriorConfig(N=8, M=12)


@pytest.fixture(scope="module")
def tiny():
  model = hyperprior.Hyperprior(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  return codec.Codec.from_params(CFG, params)


_img = images.smooth_noisy


@pytest.mark.parametrize("shape", [(64, 64), (70, 45), (1, 130), (129, 3)])
def test_round_trip_is_bit_exact(tiny, shape):
  """decompress(compress(x)) equals the encoder's reconstruction exactly,
  padding and cropping included (issue 6 must-show 1, wiring)."""
  img = _img(*shape)
  data, recon = codec.compress(tiny, img)
  out = codec.decompress(tiny, data)
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, recon)
  assert data[:4] == b"JLIC"


def test_bad_files_fail_clearly(tiny):
  img = _img(40, 40)
  data, _ = codec.compress(tiny, img)
  with pytest.raises(codec.FormatError, match="not a .jlic"):
    codec.decompress(tiny, b"\x89PNG" + data[4:])
  with pytest.raises(codec.FormatError, match="truncated"):
    codec.decompress(tiny, data[:-3])
  with pytest.raises(codec.FormatError, match="shorter than"):
    codec.decompress(tiny, data[:10])
  bad = bytearray(data)
  bad[-2] ^= 0x40
  with pytest.raises(codec.FormatError, match="corrupt"):
    codec.decompress(tiny, bytes(bad))
  ver = bytearray(data)
  ver[4] = 9
  with pytest.raises(codec.FormatError,
                     match="version 9; this reader decodes versions 1 and 2"):
    codec.decompress(tiny, bytes(ver))
  other = hyperprior.Hyperprior(CFG).init(
      jax.random.key(1), jnp.zeros((1, 64, 64, 3)))["params"]
  with pytest.raises(codec.FormatError, match="decode with the checkpoint"):
    codec.decompress(codec.Codec.from_params(CFG, other), data)


def test_bad_images_fail_clearly(tiny):
  with pytest.raises(ValueError, match="RGB image"):
    codec.compress(tiny, np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    codec.compress(tiny, np.zeros((8, 8, 3), np.float32))


def test_plain_model_keeps_its_id_tree_and_v1_files(tiny):
  """The context models are opt-in: the default config's model id is the
  pre-context formula sha256(repr((N, M, kind)) + leaves) (so v1 files of
  trained hyperpriors keep decoding), its parameter tree has exactly the
  hyperprior's modules, and its files stay version 1."""
  import hashlib

  h = hashlib.sha256(repr((8, 12, "gaussian")).encode())
  for leaf in jax.tree.leaves(tiny.params):
    h.update(np.asarray(leaf).tobytes())
  assert tiny.model_id == h.digest()[:8]
  assert set(tiny.params) == {
      "entropy_bottleneck", "g_a0", "g_a1", "g_a2", "g_a3", "g_a_gdn0",
      "g_a_gdn1", "g_a_gdn2", "g_s0", "g_s1", "g_s2", "g_s3", "g_s_igdn0",
      "g_s_igdn1", "g_s_igdn2", "h_a0", "h_a1", "h_a2", "h_s0", "h_s1",
      "h_s2"}
  data, _ = codec.compress(tiny, _img(40, 40))
  assert data[4] == 1 and data[5:13] == tiny.model_id
  # Training-only fields do not change the id; coding-relevant ones do.
  assert codec.model_key(hyperprior.HyperpriorConfig(
      N=8, M=12, l1_weight=0.3)) == (8, 12, "gaussian")
  assert codec.model_key(hyperprior.HyperpriorConfig(
      N=8, M=12, N_dec=4)) == (8, 12, "gaussian", ("N_dec", 4))


def test_decoder_width_option():
  """N_dec changes only the synthesis widths (distillation students); the
  codec round-trips with it."""
  cfg = hyperprior.HyperpriorConfig(N=8, M=12, N_dec=4)
  params = hyperprior.Hyperprior(cfg).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  ref = hyperprior.Hyperprior(CFG).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert set(params) == set(ref)
  for name in params:
    same = jax.tree.map(lambda a, b: a.shape == b.shape, params[name],
                        ref[name])
    assert all(jax.tree.leaves(same)) == (not name.startswith("g_s")), name
  assert params["g_s0"]["kernel"].shape == (5, 5, 12, 4)
  cod = codec.Codec.from_params(cfg, params)
  img = _img(64, 64)
  data, recon = codec.compress(cod, img)
  np.testing.assert_array_equal(codec.decompress(cod, data), recon)


def test_config_errors():
  with pytest.raises(ValueError, match="skip_channels needs a context"):
    hyperprior.HyperpriorConfig(skip_channels=True)
  with pytest.raises(ValueError, match="context="):
    hyperprior.HyperpriorConfig(context="channel")
  with pytest.raises(ValueError, match="family 'cauchy'"):
    hyperprior.HyperpriorConfig(context="checkerboard",
                                anchor_family="cauchy")
  with pytest.raises(ValueError, match="N_dec"):
    hyperprior.HyperpriorConfig(N_dec=0)


def test_plain_codec_refuses_channel_skipping(tiny):
  with pytest.raises(ValueError, match="needs a context model"):
    codec.compress(tiny, _img(8, 8), skip_channels=True)
