"""The CPU fast paths of `unet_blocks.Conv2D` compute nn.Conv's function.

Conv2D takes three routes on CPU for 3x3 stride-1 convolutions: an im2col
matmul on small maps, a sum of convolutions over input-channel chunks for
wide inputs, and nn.Conv otherwise; 1x1 convolutions run as a matmul. Each is compared with nn.Conv on the
same parameters (the thresholds are lowered so that tiny shapes take them).
Planted bugs caught: chunk kernel sliced on the output axis, a dropped last
chunk when channels are not a multiple of the chunk, bias added per chunk,
im2col taps in (j, i) order.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import unet_blocks

pytestmark = pytest.mark.usefixtures("fast_compile")


def _compare(monkeypatch, *, pixels_im2col, chunks, h, c, f, padding=1):
  monkeypatch.setattr(unet_blocks, "IM2COL_MAX_PIXELS", pixels_im2col)
  monkeypatch.setattr(unet_blocks, "SPLIT_CHUNKS", chunks)
  ours = unet_blocks.conv(f, 3, "c", "float32", padding=padding)
  ref = nn.Conv(f, (3, 3), padding=((padding, padding),) * 2)
  x = jax.random.normal(jax.random.key(0), (2, h, h + 1, c))
  params = ref.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # Nonzero bias.
  want = ref.apply(params, x)
  got = ours.apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [8, 11])
def test_channel_chunks_equal_one_convolution(monkeypatch, c):
  # 11 channels in chunks of 4: 4 + 4 + 3, the last one short.
  _compare(monkeypatch, pixels_im2col=0, chunks=(4, 4), h=6, c=c, f=5)


def test_im2col_equals_convolution(monkeypatch):
  _compare(monkeypatch, pixels_im2col=10_000, chunks=(0, 0), h=5, c=6, f=7)


def test_valid_padding_and_plain_route(monkeypatch):
  _compare(monkeypatch, pixels_im2col=0, chunks=(4, 4), h=6, c=9, f=3,
           padding=0)
  _compare(monkeypatch, pixels_im2col=0, chunks=(0, 0), h=6, c=9, f=3)


def test_pointwise_matmul_equals_1x1_convolution():
  """1x1 stride-1 convolutions run as a matmul on CPU (no conv op)."""
  ours = unet_blocks.conv(5, 1, "c", "float32")
  ref = nn.Conv(5, (1, 1), padding=((0, 0), (0, 0)))
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 7))
  params = jax.tree.map(lambda p: p + 0.1, ref.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(ours.apply)(params, x))
  assert "conv_general_dilated" not in jaxpr
  assert "dot_general" in jaxpr


def test_chunk_route_is_taken(monkeypatch):
  """The chunked route really runs: the jaxpr holds one conv per chunk."""
  monkeypatch.setattr(unet_blocks, "IM2COL_MAX_PIXELS", 0)
  monkeypatch.setattr(unet_blocks, "SPLIT_CHUNKS", (4, 4))
  m = unet_blocks.conv(5, 3, "c", "float32")
  x = jnp.zeros((1, 6, 6, 12))
  params = m.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(m.apply)(params, x))
  assert jaxpr.count("conv_general_dilated") == 3


@pytest.mark.parametrize("route", ["conv", "im2col"])
@pytest.mark.parametrize("h,w", [(4, 6), (5, 3)])
def test_subpixel_upsample_equals_nearest_then_conv(monkeypatch, h, w,
                                                    route):
  """Upsample2D's phase route (2x2 convolution of the small map, as a
  convolution or as one im2col matmul) equals nearest x2 then nn.Conv 3x3,
  borders included; planted bugs caught: phase kernels swapped between
  (0, 1) and (1, 0), taps summed on the wrong side (w1 + w2 for odd rows),
  interleave with rows and columns exchanged."""
  im2col = route == "im2col"
  monkeypatch.setattr(unet_blocks, "SUBPIXEL_MIN_PIXELS",
                      10**9 if im2col else 1)
  monkeypatch.setattr(unet_blocks, "SUBPIXEL_IM2COL_MAX_PIXELS",
                      10**9 if im2col else 0)
  monkeypatch.setattr(unet_blocks, "IM2COL_MAX_PIXELS", 0)
  monkeypatch.setattr(unet_blocks, "SPLIT_CHUNKS", (0, 0))
  ours = unet_blocks.Upsample2D(5)
  x = jax.random.normal(jax.random.key(0), (2, h, w, 6))
  params = ours.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)
  ref = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)))
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  want = ref.apply({"params": params["params"]["conv"]}, up)
  got = ours.apply(params, x)
  assert got.shape == (2, 2 * h, 2 * w, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(ours.apply)(params, x))
  assert jaxpr.count("conv_general_dilated") == (0 if im2col else 1)
  assert ("dot_general" in jaxpr) == im2col
  # An explicit odd output size takes the resize route, same parameters.
  odd = ours.apply(params, x, output_size=(2 * h - 1, 2 * w - 1))
  assert odd.shape == (2, 2 * h - 1, 2 * w - 1, 5)
