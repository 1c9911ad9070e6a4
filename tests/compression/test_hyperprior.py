"""The synthesis transform's sub-pixel transposed convolution equals
nn.ConvTranspose (values and gradients), with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import hyperprior


@pytest.mark.parametrize("shape", [(2, 7, 9, 6), (1, 1, 1, 3), (1, 4, 5, 1)])
def test_subpixel_conv_transpose_equals_conv_transpose(shape):
  """Planted bugs caught: a phase's taps swapped (a + t even instead of
  odd), depth-to-space interleaving rows and columns the wrong way, the
  bias dropped: each breaks the value equality on the odd shapes."""
  x = jax.random.normal(jax.random.key(1), shape)
  kw = dict(features=5, kernel_size=(5, 5), strides=(2, 2), padding="SAME")
  ref = nn.ConvTranspose(**kw)
  params = ref.init(jax.random.key(0), x)
  params = jax.tree.map(  # a non-zero bias
      lambda a: a + 0.1 if a.ndim == 1 else a, params)
  new = hyperprior.SubpixelConvTranspose(**kw)
  assert jax.tree.map(jnp.shape, new.init(jax.random.key(0), x)) == \
      jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(new.apply(params, x), ref.apply(params, x),
                             atol=2e-6)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ref = jax.grad(loss(ref), (0, 1))(params, x)
  g_new = jax.grad(loss(new), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               g_new, g_ref)


def test_subpixel_refuses_other_geometries():
  m = hyperprior.SubpixelConvTranspose(4, (3, 3), strides=(2, 2),
                                       padding="SAME")
  with pytest.raises(ValueError, match="5x5, stride 2"):
    m.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
