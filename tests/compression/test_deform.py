"""Deformable convolution and the DRM (brief learned_image_compression.md §8
test 6). Oracles: lax.conv_general_dilated, a shifted convolution, a NumPy
loop with hand-written bilinear interpolation, finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import deform

DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1, padding=((1, 1), (1, 1)), dilation=1):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
      dimension_numbers=DN, precision="highest")


def _data(key, b=2, h=9, w=7, c=3, o=4, k=3):
  kx, kw, kb = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(kx, (b, h, w, c)),
          jax.random.normal(kw, (k, k, c, o)),
          jax.random.normal(kb, (o,)))


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_zero_offsets_unit_mask_is_conv(stride, dilation):
  """Planted bug caught: a wrong tap order or padding (e.g. pad = K-1)."""
  x, w, bias = _data(0)
  b = x.shape[0]
  pad = dilation
  ref = _conv(x, w, stride, ((pad, pad), (pad, pad)), dilation) + bias
  ho, wo = ref.shape[1:3]
  off = jnp.zeros((b, ho, wo, 9, 2))
  got = deform.deform_conv(x, w, bias, off, jnp.ones((b, ho, wo, 9)),
                           stride=stride, dilation=dilation)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_fresh_module_is_conv():
  """Zero-init offset conv and 2*sigmoid(0) = 1: a fresh DeformConv equals
  the regular conv with its own kernel (fails with plain sigmoid)."""
  x, _, _ = _data(1, c=4)
  mod = deform.DeformConv(5)
  params = mod.init(jax.random.key(2), x)["params"]
  assert set(params) == {"conv_offset", "kernel", "bias"}
  params = jax.tree.map(lambda p: p, params)
  params["bias"] = jnp.arange(5.0)
  ref = _conv(x, params["kernel"]) + params["bias"]
  np.testing.assert_allclose(mod.apply({"params": params}, x), ref,
                             atol=1e-5, rtol=1e-5)
  half = deform.DeformConv(5, modulation="sigmoid")
  got = half.apply({"params": params}, x)
  np.testing.assert_allclose(got, 0.5 * _conv(x, params["kernel"])
                             + params["bias"], atol=1e-5, rtol=1e-5)


def test_integer_offset_is_shifted_conv():
  """(dy, dx) = (+1, 0) on every tap reads x[i + a] for a in 0..2: the conv
  with padding rows (0, 2); a sign error gives padding (2, 0)."""
  x, w, bias = _data(3)
  b, h, wd, _ = x.shape
  off = jnp.zeros((b, h, wd, 9, 2)).at[..., 0].set(1.0)
  got = deform.deform_conv(x, w, bias, off, None)
  ref = _conv(x, w, padding=((0, 2), (1, 1))) + bias
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  # And (0, -1): columns shifted the other way.
  off = jnp.zeros((b, h, wd, 9, 2)).at[..., 1].set(-1.0)
  got = deform.deform_conv(x, w, bias, off, None)
  ref = _conv(x, w, padding=((1, 1), (2, 0))) + bias
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _numpy_deform(x, w, bias, off, mask):
  """Loop oracle: bilinear interpolation written out per sample."""
  b, h, wd, c = x.shape
  k = w.shape[0]
  out = np.zeros((b, h, wd, w.shape[-1]))

  def pix(n, r, s):
    if 0 <= r < h and 0 <= s < wd:
      return x[n, r, s]
    return np.zeros(c)

  for n in range(b):
    for i in range(h):
      for j in range(wd):
        acc = bias.astype(np.float64).copy()
        for a in range(k):
          for bb in range(k):
            t = a * k + bb
            py = i - 1 + a + off[n, i, j, t, 0]
            px = j - 1 + bb + off[n, i, j, t, 1]
            r0, s0 = int(np.floor(py)), int(np.floor(px))
            fy, fx = py - r0, px - s0
            v = ((1 - fy) * (1 - fx) * pix(n, r0, s0)
                 + (1 - fy) * fx * pix(n, r0, s0 + 1)
                 + fy * (1 - fx) * pix(n, r0 + 1, s0)
                 + fy * fx * pix(n, r0 + 1, s0 + 1))
            acc += mask[n, i, j, t] * v @ w[a, bb]
        out[n, i, j] = acc
  return out


def test_fractional_offsets_match_numpy_bilinear():
  """Random offsets up to +-2.5 px (many samples leave the image) and random
  modulation; a corner weight swap or a missing zero pad fails."""
  x, w, bias = _data(4, b=1, h=5, w=6, c=2, o=3)
  rng = np.random.default_rng(0)
  off = rng.uniform(-2.5, 2.5, (1, 5, 6, 9, 2)).astype(np.float32)
  mask = rng.uniform(0, 2, (1, 5, 6, 9)).astype(np.float32)
  got = deform.deform_conv(x, w, bias, jnp.asarray(off), jnp.asarray(mask))
  ref = _numpy_deform(*map(np.asarray, (x, w, bias)), off, mask)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_finite_differences():
  """d/d(x, weights, offsets, mask) in float64; offsets kept >= 0.05 px from
  integers, where the bilinear sample is smooth. A dropped gradient path
  through the fractional part (e.g. stop_gradient on ly) fails."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 4, 5, 2)))
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 2)))
    bias = jnp.asarray(rng.normal(size=(2,)))
    frac = rng.uniform(0.05, 0.95, (1, 4, 5, 9, 2))
    off = jnp.asarray(rng.integers(-2, 2, frac.shape) + frac)
    mask = jnp.asarray(rng.uniform(0.2, 1.8, (1, 4, 5, 9)))
    probe = jnp.asarray(rng.normal(size=(1, 4, 5, 2)))

    def f(x, w, off, mask):
      return jnp.sum(probe * deform.deform_conv(x, w, bias, off, mask))

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(x, w, off, mask)
    eps = 1e-6
    for i, arg in enumerate((x, w, off, mask)):
      flat = np.asarray(arg).ravel()
      idx = rng.choice(flat.size, size=min(12, flat.size), replace=False)
      for j in idx:
        d = np.zeros_like(flat)
        d[j] = eps
        args = [x, w, off, mask]
        args[i] = jnp.asarray((flat + d).reshape(arg.shape))
        up = f(*args)
        args[i] = jnp.asarray((flat - d).reshape(arg.shape))
        dn = f(*args)
        fd = (up - dn) / (2 * eps)
        g = np.asarray(grads[i]).ravel()[j]
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8,
                                   err_msg=f"arg {i} index {j}")


def test_drm_is_identity_plus_residual():
  """Shape kept; out - x equals conv(leaky(conv_deformkernel(x))) computed
  with lax at init (zero offsets); with trained-like non-zero offsets it
  equals the functional composition. Fails if the skip is dropped."""
  x, _, _ = _data(5, b=2, h=8, w=8, c=4)
  drm = deform.DeformResidualModule()
  params = drm.init(jax.random.key(6), x)["params"]
  y = drm.apply({"params": params}, x)
  assert y.shape == x.shape
  d, cv = params["deform"], params["conv"]
  inner = _conv(x, d["kernel"]) + d["bias"]
  ref = _conv(jax.nn.leaky_relu(inner, 0.01), cv["kernel"]) + cv["bias"]
  np.testing.assert_allclose(y - x, ref, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(ref).max()) > 1e-2  # A real residual, not zero.
  # Non-zero offset predictor: compare with the functional core.
  params = jax.tree.map(lambda p: p, params)
  k = jax.random.normal(jax.random.key(7), d["conv_offset"]["kernel"].shape)
  params["deform"] = dict(d, conv_offset=dict(d["conv_offset"],
                                              kernel=0.3 * k))
  y = drm.apply({"params": params}, x)
  pred = _conv(x, 0.3 * k)
  off = pred[..., :18].reshape(2, 8, 8, 9, 2)
  mask = 2 * jax.nn.sigmoid(pred[..., 18:])
  inner = deform.deform_conv(x, d["kernel"], d["bias"], off, mask)
  ref = _conv(jax.nn.leaky_relu(inner, 0.01), cv["kernel"]) + cv["bias"]
  np.testing.assert_allclose(y - x, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", deform.DRM_LAYOUTS)
def test_drm_layouts_keep_shape(layout):
  """Smoke: each layout keeps the shape; unknown layouts are refused."""
  x = jnp.ones((1, 8, 8, 4))
  drm = deform.DeformResidualModule(layout=layout)
  p = drm.init(jax.random.key(0), x)
  assert drm.apply(p, x).shape == x.shape
  with pytest.raises(ValueError, match="layout"):
    deform.DeformResidualModule(layout="nope").init(jax.random.key(0), x)
