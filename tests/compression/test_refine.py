"""Encoder-side latent refinement: a better file for the same decoder.

Refined files decode bit-exactly with the unchanged decoder; the kept
latents never score worse than the amortized ones on the model's own
objective; on a random model refinement lowers it (a shipped trained model:
test_refine_shipped.py); the padding carries no distortion; bad settings
fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import codec, hyperprior, refine
from tests.compression import images

pytestmark = pytest.mark.usefixtures("fast_compile")


def _codec(**kw):
  cfg = hyperprior.HyperpriorConfig(N=8, M=12, **kw)
  params = hyperprior.Hyperprior(cfg).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  return codec.Codec.from_params(cfg, params)


_img = images.smooth_noisy


@pytest.mark.parametrize("context, relax", [("none", "sga"),
                                            ("none", "noise"),
                                            ("checkerboard", "noise"),
                                            ("checkerboard", "sga")])
def test_refined_file_decodes_exactly_and_scores_better(context, relax):
  cod = _codec(context=context)
  img = _img(50, 70)
  cfg = refine.RefineConfig(lam=0.01, steps=30, lr=0.05, relax=relax)
  plain, r0 = codec.compress(cod, img)
  info = {}
  data1, r1 = codec.compress(cod, img, refine=cfg, info=info)
  np.testing.assert_array_equal(codec.decompress(cod, data1), r1)
  assert data1[:5] == plain[:5]  # Same format and version.
  ri = info["refine"]
  assert ri["kept"] == "refined"
  j0, j1 = ri["objective"]
  assert j1 < 0.97 * j0, ri  # Random g_a: a large amortization gap.
  # The real files agree: the refined one costs less on the objective.
  assert (images.file_objective(len(data1), r1, img, cfg.lam)
          < images.file_objective(len(plain), r0, img, cfg.lam))
  again, _ = codec.compress(cod, img, refine=cfg)
  assert again == data1  # Deterministic encode (fixed noise keys).


def test_amortized_latents_kept_when_refinement_does_not_help():
  """A learning rate so large that Adam's first steps wreck the latents:
  the test-time score says so and the plain encoder's file is written."""
  cod = _codec()
  img = _img(64, 64)
  info = {}
  plain, _ = codec.compress(cod, img)
  out, _ = codec.compress(cod, img, info=info,
                          refine=refine.RefineConfig(0.01, steps=2, lr=1e4))
  assert info["refine"]["kept"] == "amortized"
  assert out == plain


def test_padding_carries_no_distortion():
  cod = _codec()
  x = np.asarray(_img(64, 64), np.float32)[None] / 255.0
  y = cod.model.apply({"params": cod.params}, jnp.asarray(x),
                      method="analysis")
  z = cod.model.apply({"params": cod.params}, y, method="hyper_analysis")
  mask = np.zeros((1, 64, 64, 1), np.float32)
  mask[:, :40, :50] = 1.0
  x2 = x.copy()
  x2[:, 40:, :, :] = 0.0  # Change only pixels outside the mask.
  x2[:, :, 50:, :] = 1.0
  a = refine._objective(cod.model, cod.params, jnp.asarray(x), y, z, mask,
                        0.01)
  b = refine._objective(cod.model, cod.params, jnp.asarray(x2), y, z, mask,
                        0.01)
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(lam=0.0), "lambda > 0"),
    (dict(lam=0.01, steps=0), "steps must be >= 1"),
    (dict(lam=0.01, lr=-1.0), "lr must be > 0"),
    (dict(lam=0.01, relax="gumbel"), "unknown relaxation 'gumbel'"),
    (dict(lam=0.01, tau_min=0.0), "tau_min"),
])
def test_bad_settings_fail_clearly(kw, match):
  with pytest.raises(ValueError, match=match):
    refine.RefineConfig(**kw)


def test_sga_on_the_serial_context_names_the_fix():
  cod = _codec(context="serial")
  with pytest.raises(ValueError, match="use relax='noise'"):
    codec.compress(cod, _img(20, 20), refine=refine.RefineConfig(0.01))


def test_checkerboard_sga_at_low_temperature_is_the_test_path():
  """At tau -> 0 SGA rounds to the nearest integer (around each set's
  mean, the non-anchors' means from the rounded anchors), so the relaxed
  objective of the checkerboard path equals the test-time one (before the
  8-bit rounding of x_hat, which `_test_latents` adds)."""
  cod = _codec(context="checkerboard")
  x = np.asarray(_img(64, 64), np.float32)[None] / 255.0
  y = cod.model.apply({"params": cod.params}, jnp.asarray(x),
                      method="analysis")
  z = cod.model.apply({"params": cod.params}, y, method="hyper_analysis")
  sga = cod.model.apply({"params": cod.params}, y, z, jax.random.key(1),
                        1e-6, method=refine._sga_checkerboard_latents)
  test = cod.model.apply({"params": cod.params}, y, z, None, False,
                         method="from_latents")
  np.testing.assert_allclose(np.asarray(sga[0]), np.asarray(test["y_lik"]),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sga[1]), np.asarray(test["z_lik"]),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sga[2]), np.asarray(test["x_hat"]),
                             atol=1e-4)
