"""compress/decompress on a tiny random-weight hyperprior: bit-exact round
trips on odd sizes, real files, and clear errors for bad files (wiring and
format; trained-model RD numbers are issue 6's open part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import codec, hyperprior

CFG = hyperprior.HyperpriorConfig(N=8, M=12)


@pytest.fixture(scope="module")
def tiny():
  model = hyperprior.Hyperprior(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  return codec.Codec.from_params(CFG, params)


def _img(h, w, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = 128 + 60 * np.sin(xx / 7.0)[..., None] + 40 * np.cos(yy / 5.0)[..., None]
  return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


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
  with pytest.raises(codec.FormatError, match="version 9"):
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
