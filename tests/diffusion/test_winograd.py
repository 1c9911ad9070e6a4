"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution (`diffusion.winograd`).

The prepared-kernel route is compared with XLA's direct convolution on
non-square maps whose sizes are not multiples of the tile (the cropped last
tiles), with padding 0, 1 and 2 and non-symmetric kernels. Planted bugs
caught: tile rows and columns swapped in the output interleave (non-square
maps), G applied on one side only (kernel transform), a dropped last tile
(sizes not multiples of m), padding applied after tiling.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import unet_blocks, winograd

pytestmark = pytest.mark.usefixtures("fast_compile")

# Relative to the output's largest magnitude (module docstring: ~2e-6 for
# m = 2, ~3e-5 for m = 4 in float32).
TOL = {2: 1e-5, 4: 1e-4}


def _direct(x, k, p):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), ((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("h,w,p", [(8, 12, 1), (7, 5, 1), (9, 6, 0),
                                   (5, 11, 2), (1, 3, 1)])
def test_conv3x3_equals_direct_convolution(m, h, w, p):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  want = _direct(x, k, p)
  got = winograd.conv3x3(x, jnp.asarray(winograd.transform_kernel(k, m)),
                         ((p, p), (p, p)))
  assert got.shape == want.shape == (2, h + 2 * p - 2, w + 2 * p - 2, 7)
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(got - want).max()) <= TOL[m] * scale


@pytest.mark.parametrize("m", winograd.TILES)
def test_kernel_transform_is_g_k_gt(m):
  rng = np.random.default_rng(1)
  k = rng.normal(size=(3, 3, 4, 3))
  _, g, _ = winograd.matrices(m)
  want = np.einsum("ai,ijcf,bj->abcf", g, k, g)
  got = winograd.transform_kernel(k, m)
  assert got.shape == (m + 2, m + 2, 4, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", winograd.TILES)
def test_matrices_give_exact_1d_convolution(m):
  """A^T [(G g) * (B^T d)] = the m outputs of a valid 1-D correlation."""
  bt, g, at = winograd.matrices(m)
  rng = np.random.default_rng(2)
  d, f = rng.normal(size=m + 2), rng.normal(size=3)
  want = np.array([d[i:i + 3] @ f for i in range(m)])
  np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), want, atol=1e-12)


@pytest.mark.parametrize("upsample", [False, True])
def test_conv2d_module_takes_the_prepared_route(upsample):
  """Conv2D with KEY in its parameters (and no 3x3 kernel) computes the
  same function as with the kernel, bias included."""
  mod = unet_blocks.conv(6, 3, "c", "float32", upsample=upsample)
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 4))
  params = mod.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1, params)  # nonzero bias
  want = mod.apply({"params": params}, x)
  for m in winograd.TILES:
    prepared = {"bias": params["bias"],
                winograd.KEY: winograd.transform_kernel(params["kernel"], m)}
    jaxpr = str(jax.make_jaxpr(
        lambda p: mod.apply({"params": p}, x))(prepared))
    assert "conv_general_dilated" not in jaxpr
    got = mod.apply({"params": prepared}, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL[m] * float(
        jnp.abs(want).max()))


def test_prepare_params_converts_only_stride1_3x3_convolutions():
  tree = {
      "down_blocks_0": {
          "resnets_0": {"conv1": {"kernel": np.ones((3, 3, 4, 8)),
                                  "bias": np.zeros(8)},
                        "conv_shortcut": {"kernel": np.ones((1, 1, 4, 8)),
                                          "bias": np.zeros(8)}},
          "downsamplers_0": {"conv": {"kernel": np.ones((3, 3, 8, 8)),
                                      "bias": np.zeros(8)}}},
      "up_blocks_0": {
          "upsamplers_0": {"conv": {"kernel": np.ones((3, 3, 8, 8)),
                                    "bias": np.zeros(8)}},
          "resnets_0": {"conv2": {"kernel": np.ones((3, 3, 8, 1280)),
                                  "bias": np.zeros(1280)}}},
      "time_embedding": {"linear_1": {"kernel": np.ones((4, 8))}},
  }
  out = winograd.prepare_params(tree)
  assert winograd.prepared_count(out) == 2
  conv1 = out["down_blocks_0"]["resnets_0"]["conv1"]
  assert set(conv1) == {"bias", winograd.KEY}
  assert conv1[winograd.KEY].shape == (6, 6, 4, 8)  # auto: F(4) at <= 640
  wide = out["up_blocks_0"]["resnets_0"]["conv2"][winograd.KEY]
  assert wide.shape == (4, 4, 8, 1280)  # auto: F(2) above 640 outputs
  for kept in (out["down_blocks_0"]["resnets_0"]["conv_shortcut"],
               out["down_blocks_0"]["downsamplers_0"]["conv"],
               out["up_blocks_0"]["upsamplers_0"]["conv"]):
    assert set(kept) == {"kernel", "bias"}
  assert winograd.prepare_params(tree, 2)["down_blocks_0"]["resnets_0"][
      "conv1"][winograd.KEY].shape == (4, 4, 4, 8)
  assert "kernel" in tree["down_blocks_0"]["resnets_0"]["conv1"]  # copy


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="tile=3"):
    winograd.prepare_params({}, 3)
  with pytest.raises(ValueError, match=r"\(3, 3, C, F\)"):
    winograd.transform_kernel(np.ones((5, 5, 2, 2)), 2)
  with pytest.raises(ValueError, match="channels"):
    winograd.conv3x3(jnp.ones((1, 4, 4, 3)),
                     jnp.ones((4, 4, 2, 5)))
  strided = unet_blocks.conv(4, 3, "down", "float32", stride=2)
  prepared = {"bias": jnp.zeros(4),
              winograd.KEY: jnp.zeros((4, 4, 3, 4))}
  with pytest.raises(ValueError, match="down.*stride-1 3x3"):
    strided.apply({"params": prepared}, jnp.ones((1, 8, 8, 3)))


def test_plain_nn_conv_params_are_unchanged_by_the_route():
  """Unprepared parameters still take nn.Conv's function (no KEY)."""
  mod = unet_blocks.conv(3, 3, "c", "float32")
  ref = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))
  x = jax.random.normal(jax.random.key(2), (1, 6, 6, 2))
  params = ref.init(jax.random.key(3), x)
  np.testing.assert_allclose(mod.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)
