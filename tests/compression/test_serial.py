"""Serial autoregressive context model (Minnen 2018): causality of the
masked convolution, the per-position decode step against the batched
training path, bit-exact position-by-position round trips, determinism,
channel skipping and training through the trainer (smoke)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import codec, hyperprior, serial, train
from jaxlib_models.core import trainer
from tests.compression import images

pytestmark = pytest.mark.usefixtures("fast_compile")
N, M = 8, 12


_img = images.smooth_noisy


def calibrate(params):
  """Wider y and scales lifted by 3 (see test_checkerboard.calibrate)."""
  p = jax.tree.map(np.array, params)
  p["g_a3"]["kernel"] *= 10.0
  p["serial"]["entropy_parameters"]["conv2"]["bias"][:M] += 3.0
  return p


def make_codec(seed=0, **kw):
  cfg = hyperprior.HyperpriorConfig(N=N, M=M, context="serial", **kw)
  params = hyperprior.Hyperprior(cfg).init(
      jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))["params"]
  params = calibrate(params)
  return cfg, params, codec.Codec.from_params(cfg, params)


@pytest.fixture(scope="module")
def ser():
  return make_codec()


def test_causal_mask():
  m = serial.causal_mask()
  assert m.sum() == 12 and m[2, 2] == 0 and m[:2].all() and m[2, :2].all()
  assert not m[2, 2:].any() and not m[3:].any()


def test_masked_conv_is_causal():
  """Output at p has zero gradient w.r.t. inputs at p and after it in
  raster order, non-zero before (planted bug: mask type B, i.e. the centre
  tap kept, fails)."""
  conv = serial.MaskedConv(3)
  x = jax.random.normal(jax.random.key(0), (1, 6, 7, 2))
  p = conv.init(jax.random.key(1), x)["params"]
  for r, c in [(0, 0), (3, 4), (5, 6)]:
    g = np.asarray(jax.grad(
        lambda x: conv.apply({"params": p}, x)[0, r, c].sum())(x))[0]
    flat = np.abs(g).sum(-1).ravel()
    pos = r * 7 + c
    assert flat[pos:].max() == 0
    before = [rr * 7 + cc for rr in range(6) for cc in range(7)
              if abs(rr - r) <= 2 and abs(cc - c) <= 2 and rr * 7 + cc < pos]
    assert all(flat[i] > 0 for i in before)


def test_step_equals_the_batched_path(ser):
  """The decode step (causal taps only, one position) gives the scales and
  means of the full-map masked convolution + EP (the training path) at every
  position, to float32 rounding (1e-5), on the decoded y^ of a real encode;
  the step's window bookkeeping (`_loop`) is covered because the per-position
  means are recorded during that encode."""
  _, params, cod = ser
  rng = np.random.default_rng(0)
  y = rng.normal(0, 3, (1, 4, 6, M)).astype(np.float32)
  psi = rng.normal(0, 1, (1, 4, 6, 2 * M)).astype(np.float32)
  yc = cod.y_coder
  p = cod._ctx_params()
  mus = np.zeros((4, 6, M), np.float32)

  def visit(r, c, i, mu):
    mus[r, c] = mu
    return (np.round(y[0, r, c] - mu) + mu).astype(np.float32)

  y_hat = yc._loop(p, psi, visit)
  mod = serial.SerialContext(M)
  scales, means = mod.apply(
      {"params": p}, jnp.asarray(psi),
      mod.apply({"params": p}, jnp.asarray(y_hat),
                method=lambda m, v: m.context_prediction(v)),
      method="params_from_context")
  np.testing.assert_allclose(mus, np.asarray(means)[0], atol=1e-5)
  padded = np.pad(y_hat, ((0, 0), (2, 2), (2, 2), (0, 0)))
  s_ref, m_ref = mod.apply({"params": p}, jnp.asarray(padded[:, 2:7, 2:7]),
                           jnp.asarray(psi[:, 2:3, 2:3]), method="step")
  np.testing.assert_allclose(m_ref[0, 0, 0], mus[2, 2], atol=1e-5)
  np.testing.assert_allclose(s_ref[0, 0, 0], scales[0, 2, 2], atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (70, 45)])
def test_round_trip_is_bit_exact_and_deterministic(ser, shape):
  """decompress(compress(x)) equals the encoder's reconstruction; compress
  twice gives identical bytes; the decoder's y^ equals the encoder's."""
  _, _, cod = ser
  img = _img(*shape)
  data, recon = codec.compress(cod, img)
  again, _ = codec.compress(cod, img)
  assert data == again and data[4] == codec.VERSION_CONTEXT
  np.testing.assert_array_equal(codec.decompress(cod, data), recon)
  x = np.pad(img, ((0, -shape[0] % 64), (0, -shape[1] % 64), (0, 0)),
             mode="edge")
  enc, _, _ = cod._fns
  y, z = (np.asarray(t) for t in enc(
      cod.params, jnp.asarray(x[None].astype(np.float32) / 255.0)))
  z_hat = (np.round(z - cod.z_medians) + cod.z_medians).astype(np.float32)
  psi = cod._psi(z_hat)
  stream, _, y_hat = cod.y_coder.encode_y(cod._ctx_params(), y, psi)
  np.testing.assert_array_equal(
      cod.y_coder.decode_y(cod._ctx_params(), stream, psi), y_hat)
  assert np.count_nonzero(np.round(y)) > 50


def test_channel_skipping():
  """Planted all-zero channels (y_c = 0, mu_c = 0) are omitted (bitmap
  marks them), decoding reproduces the image, the stream is shorter."""
  cfg, params, _ = make_codec(skip_channels=True)
  planted = [0, 7]
  p = jax.tree.map(np.array, params)
  p["g_a3"]["kernel"][..., planted] = 0.0
  p["g_a3"]["bias"][planted] = 0.0
  conv = p["serial"]["entropy_parameters"]["conv2"]
  conv["kernel"][..., [M + c for c in planted]] = 0.0
  conv["bias"][[M + c for c in planted]] = 0.0
  cod = codec.Codec.from_params(cfg, p)
  img = _img(64, 64, seed=2)
  on, recon = codec.compress(cod, img)
  off, recon_off = codec.compress(cod, img, skip_channels=False)
  np.testing.assert_array_equal(recon, recon_off)
  nb = (M + 7) // 8
  bits = np.unpackbits(np.frombuffer(on[codec._HEAD2.size:
                                        codec._HEAD2.size + nb], np.uint8),
                       bitorder="little")[:M]
  assert sorted(np.flatnonzero(bits == 0)) == planted
  np.testing.assert_array_equal(codec.decompress(cod, on), recon)
  np.testing.assert_array_equal(codec.decompress(cod, off), recon)
  assert len(on) < len(off)


def test_make_task_trains_two_steps(tmp_path):
  """Smoke: the serial model trains through the trainer for 2 steps."""
  cfg = hyperprior.HyperpriorConfig(N=N, M=M, context="serial",
                                    l1_weight=0.01)
  tc = trainer.TrainConfig(num_steps=2, batch_size=8, learning_rate=1e-3,
                           log_every=1, checkpoint_every=2, progress=False,
                           console=False)
  task = train.make_task(cfg, [_img(80, 80, s) for s in range(2)], 0.01, tc,
                         64)
  state = trainer.train(task, tc, str(tmp_path / "run"))
  assert int(state.step) == 2
  assert set(state.params["serial"]) == {"context_prediction",
                                         "entropy_parameters"}
  assert all(np.isfinite(np.asarray(v)).all()
             for v in jax.tree.leaves(state.params))
