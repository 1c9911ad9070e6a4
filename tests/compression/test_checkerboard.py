"""Checkerboard utilities (brief §8.4), mixture coding rows (§2.4 rule 2),
Fu et al.'s improved checkerboard codec: bit-exact round trips for both
families, parameter-path determinism (§8.3), channel skipping (§8.7),
context causality and training through the trainer (smoke)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlib_models.compression import (checkerboard, codec, coder, entropy,
                                       hyperprior, train)
from jaxlib_models.core import trainer
from tests.compression import images

pytestmark = pytest.mark.usefixtures("fast_compile")
N, M = 8, 12


_img = images.smooth_noisy


def calibrate(params, cfg):
  """Random weights give |y| < 1 and scales at the 0.11 floor; widen y
  (g_a3 x 10) and lift every predicted scale by 3 so that the tests code
  thousands of non-zero symbols under varied models."""
  p = jax.tree.map(np.array, params)
  p["g_a3"]["kernel"] *= 10.0
  k = cfg.mixture_components
  for name, fam in (("ep_anchor", cfg.anchor_family),
                    ("ep_nonanchor", cfg.nonanchor_family)):
    n_scales = k * M if entropy.is_mixture(fam) else M
    p["ckbd"][name]["conv2"]["bias"][:n_scales] += 3.0
  return p


def plant_zero_channels(params, cfg, chans):
  """y_c = 0 exactly (g_a3 column and bias zeroed) and mu_c = 0 for the
  single-kind sets (EP output rows of the means zeroed), so q_c = 0 in
  both sets."""
  p = jax.tree.map(np.array, params)
  p["g_a3"]["kernel"][..., chans] = 0.0
  p["g_a3"]["bias"][chans] = 0.0
  for name, fam in (("ep_anchor", cfg.anchor_family),
                    ("ep_nonanchor", cfg.nonanchor_family)):
    if not entropy.is_mixture(fam):
      conv = p["ckbd"][name]["conv2"]
      conv["kernel"][..., [M + c for c in chans]] = 0.0
      conv["bias"][[M + c for c in chans]] = 0.0
  return p


def make_codec(seed=0, **kw):
  cfg = hyperprior.HyperpriorConfig(N=N, M=M, context="checkerboard", **kw)
  params = hyperprior.Hyperprior(cfg).init(
      jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))["params"]
  params = calibrate(params, cfg)
  return cfg, params, codec.Codec.from_params(cfg, params)


# --- utilities (brief §8.4) --------------------------------------------------


def test_anchor_mask_is_r_plus_c_odd_and_masks_partition():
  a, n = checkerboard.anchor_mask(5, 6), checkerboard.nonanchor_mask(5, 6)
  for r in range(5):
    for c in range(6):
      assert a[r, c] == ((r + c) % 2 == 1)
  assert not (a & n).any() and (a | n).all()


@pytest.mark.parametrize("xp", [np, jnp])
@pytest.mark.parametrize("anchor", [True, False])
def test_squeeze_unsqueeze(xp, anchor):
  """squeeze keeps row by row (in column order) exactly the set's
  positions (oracle: explicit loops); unsqueeze(squeeze(x)) = x on the set
  and 0 elsewhere; the two sets rebuild x."""
  x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
  s = np.asarray(checkerboard.squeeze(xp.asarray(x), anchor))
  assert s.shape == (2, 6, 4, 3)
  for r in range(6):
    cols = [c for c in range(8) if ((r + c) % 2 == 1) == anchor]
    np.testing.assert_array_equal(s[:, r], x[:, r, cols])
  back = np.asarray(checkerboard.unsqueeze(xp.asarray(s), anchor))
  mask = checkerboard.anchor_mask(6, 8) if anchor else \
      checkerboard.nonanchor_mask(6, 8)
  np.testing.assert_array_equal(back, x * mask[None, :, :, None])
  other = np.asarray(checkerboard.unsqueeze(
      checkerboard.squeeze(xp.asarray(x), not anchor), not anchor))
  np.testing.assert_array_equal(back + other, x)
  with pytest.raises(ValueError, match="even width"):
    checkerboard.squeeze(xp.asarray(x[:, :, :7]), anchor)


# --- mixture coding (brief §2.4 rule 2) --------------------------------------


def _mixture_case(n, k, seed, outliers):
  rng = np.random.default_rng(seed)
  grid = entropy.MixtureGrid()
  table = entropy.default_scale_table()
  wq = rng.integers(0, grid.weight_levels + 1, (n, k))
  wq[:, 0] = np.maximum(wq[:, 0], 1)
  mq = rng.integers(-400, 400, (n, k))
  sq = rng.integers(0, 40, (n, k))
  w = wq / wq.sum(1, keepdims=True)
  comp = np.array([rng.choice(k, p=row) for row in w])
  rows = np.arange(n)
  q = np.round(mq[rows, comp] * grid.mean_step + rng.normal(size=n)
               * table[sq[rows, comp]]).astype(np.int64)
  if outliers:
    q[[1, 7]] = [100_000, -77_777]  # Outside every window: escapes.
  return q, wq, mq, sq, grid, table


@pytest.mark.parametrize("family", ["gmm", "gllmm"])
def test_mixture_rows_round_trip_and_rate(family):
  """Per-symbol mixture rows decode q exactly (escapes included) and the
  real size is within 0.5 % (+ header) of -sum log2 P(q) under an
  independent scipy evaluation of the snapped mixture; a wrong mean grid or
  window in the rows would break either."""
  k = 3
  kinds = entropy.mixture_kinds(family, k)
  for outliers in (True, False):
    q, wq, mq, sq, grid, table = _mixture_case(6000, k, 0, outliers)
    enc = coder.StreamEncoder()
    enc.mixture(q, wq, mq, sq, kinds, table, grid)
    data = enc.finish()
    dec = coder.StreamDecoder(data)
    np.testing.assert_array_equal(
        dec.mixture(wq, mq, sq, kinds, table, grid), q)
    dec.finish()
  dist = {"gaussian": stats.norm, "laplace": stats.laplace,
          "logistic": stats.logistic}
  w = wq / wq.sum(1, keepdims=True)
  p = np.zeros(q.size)
  for c in range(k):
    mu, s = mq[:, c] * grid.mean_step, table[sq[:, c]]
    d = dist[kinds[c]]
    p += w[:, c] * (d.cdf((q + 0.5 - mu) / s) - d.cdf((q - 0.5 - mu) / s))
  oracle = -np.log2(p).sum()
  ideal = coder.mixture_ideal_bits(q, wq, mq, sq, kinds, table, grid)
  assert abs(ideal - oracle) / oracle < 2e-3
  assert abs(8 * (len(data) - 12) - ideal) / ideal < 5e-3


# --- the codec ---------------------------------------------------------------

FAMILIES = [("gmm", "gaussian"), ("gaussian", "gaussian"), ("gllmm", "gmm")]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: "-".join(f))
def ckbd(request):
  fa, fn = request.param
  return make_codec(anchor_family=fa, nonanchor_family=fn)


@pytest.mark.parametrize("shape", [(64, 64), (70, 45)])
def test_round_trip_is_bit_exact(ckbd, shape):
  """decompress(compress(x)) equals the encoder's reconstruction exactly
  for both families per set, odd sizes padded and cropped."""
  _, _, cod = ckbd
  img = _img(*shape)
  data, recon = codec.compress(cod, img)
  assert data[4] == codec.VERSION_CONTEXT
  out = codec.decompress(cod, data)
  assert out.shape == img.shape
  np.testing.assert_array_equal(out, recon)


def test_parameter_path_is_deterministic(ckbd):
  """Brief §8.3: compress twice -> identical bytes; the coding parameters of
  both passes computed twice have the same CRC32; the decoder's y^ equals
  the encoder's (so its q does), and the symbols are not trivial."""
  _, params, cod = ckbd
  img = _img(64, 64, seed=3)
  a, _ = codec.compress(cod, img)
  b, _ = codec.compress(cod, img)
  assert a == b
  x = jnp.asarray(img[None].astype(np.float32) / 255.0)
  enc, _, _ = cod._fns
  y, z = (np.asarray(t) for t in enc(cod.params, x))
  z_hat = (np.round(z - cod.z_medians) + cod.z_medians).astype(np.float32)
  psi = cod._psi(z_hat)
  yc = cod.y_coder
  anchors, nonanchors = yc.fns
  crc = lambda out: zlib.crc32(b"".join(np.asarray(t).tobytes()
                                        for t in jax.tree.leaves(out)))
  p = cod._ctx_params()
  assert crc(anchors(p, psi)) == crc(anchors(p, jnp.asarray(psi)))
  data, occ, y_hat = yc.encode_y(p, y, psi)
  assert occ is None
  np.testing.assert_array_equal(yc.decode_y(p, data, psi), y_hat)
  yh_a = checkerboard.squeeze(y_hat[0], True)
  assert crc(nonanchors(p, psi, yh_a)) == crc(nonanchors(p, psi, yh_a))
  sa = yc._set(anchors(p, psi), cod.model.cfg.anchor_family)
  assert np.count_nonzero(sa.symbols(checkerboard.squeeze(y[0], True))) > 50


def test_codec_matches_the_model_inference_path(ckbd):
  """Brief §8.8: the y^ the codec codes and decodes (squeezed two-pass
  path) equals the model's batched test-mode forward (full maps, merged by
  masks) to 1e-5, and so does x^; at most 0.5 % of the elements may differ
  by a rounding flip (float paths differ in the last bit). Planted bug: the
  non-anchors coded with EP_n's outputs at anchor positions (squeeze with
  the wrong set) fails here."""
  cfg, params, cod = ckbd
  img = _img(128, 128, seed=6)
  x = jnp.asarray(img[None].astype(np.float32) / 255.0)
  out = cod.model.apply({"params": params}, x)
  enc, _, gs = cod._fns
  y, z = (np.asarray(t) for t in enc(cod.params, x))
  z_hat = (np.round(z - cod.z_medians) + cod.z_medians).astype(np.float32)
  _, _, y_hat = cod.y_coder.encode_y(cod._ctx_params(), y, cod._psi(z_hat))
  ref = np.asarray(out["y_hat"])
  close = np.abs(y_hat - ref) <= 1e-5
  assert close.mean() >= 0.995, close.mean()
  if close.all():
    np.testing.assert_allclose(np.asarray(gs(cod.params, y_hat)),
                               np.asarray(out["x_hat"]), atol=1e-4)


def test_coding_parameters_sit_at_their_positions(ckbd):
  """The integers the coder receives for each set (scale indexes or snapped
  mixture parameters) are those of the batched full-map parameter networks
  at that set's positions, listed by an explicit loop over (r, c) (oracle
  independent of `squeeze`); 1 % of the entries may differ by a snapping
  flip. Planted bug: squeezing EP_n's output with the anchor set fails, also
  for mixture non-anchors whose y^ = round(y) does not depend on it."""
  _, _, cod = ckbd
  img = _img(128, 128, seed=7)
  x = jnp.asarray(img[None].astype(np.float32) / 255.0)
  enc, _, _ = cod._fns
  y, z = (np.asarray(t) for t in enc(cod.params, x))
  z_hat = (np.round(z - cod.z_medians) + cod.z_medians).astype(np.float32)
  psi = cod._psi(z_hat)
  yc, p = cod.y_coder, cod._ctx_params()
  _, _, y_hat = yc.encode_y(p, y, psi)
  mod = yc.module
  anchors, nonanchors = yc.fns
  yh_a = checkerboard.squeeze(y_hat[0], True)
  full = {True: mod.apply({"params": p}, psi, method="anchor_raw")[0],
          False: mod.apply({"params": p}, psi, y_hat,
                           method="nonanchor_raw")[0]}
  got = {True: anchors(p, psi), False: nonanchors(p, psi, yh_a)}
  h, w = y_hat.shape[1:3]
  for anchor, fam in ((True, mod.anchor_family),
                      (False, mod.nonanchor_family)):
    rows = [np.asarray(full[anchor])[r, c] for r in range(h)
            for c in range(w) if ((r + c) % 2 == 1) == anchor]
    ref = yc._coding(jnp.asarray(np.stack(rows).reshape(h, w // 2, -1)),
                     fam)
    for a, b in zip(jax.tree.leaves(got[anchor]), jax.tree.leaves(ref)):
      a, b = np.asarray(a), np.asarray(b)
      if a.dtype.kind == "f":
        assert np.mean(np.abs(a - b) <= 1e-5) >= 0.99
      else:
        assert np.mean(a == b) >= 0.99, (anchor, np.mean(a == b))


def test_real_bits_match_the_model_estimate(ckbd):
  """The y section's size is close to the model's own test-mode estimate
  -sum log2 P(y^) (both sets): 3 % covers the scale-table and mixture-grid
  snapping on ~1500 symbols; a set coded under the wrong parameters (e.g.
  the anchors' model used for the non-anchors) costs far more."""
  cfg, params, cod = ckbd
  img = _img(128, 128, seed=4)
  data, _ = codec.compress(cod, img)
  x = jnp.asarray(img[None].astype(np.float32) / 255.0)
  out = cod.model.apply({"params": params}, x)
  est = -np.log2(np.asarray(out["y_lik"], np.float64)).sum()
  real = 8 * (_section_lengths(data, M, False)[1] - 12)
  assert abs(real - est) / est < 0.03, (real, est)


def _section_lengths(data, m, bitmap):
  off = codec._HEAD2.size + ((m + 7) // 8 if bitmap else 0)
  return codec._LENS.unpack(data[off:off + codec._LENS.size])


def test_channel_skipping():
  """Brief §8.7: planted all-zero channels are left out (bitmap of M bits
  marks exactly them), decoding reproduces the image and y^, and the y
  stream is shorter than with skipping off."""
  cfg, params, _ = make_codec(skip_channels=True)
  planted = [1, 4, 5, 11]
  params = plant_zero_channels(params, cfg, planted)
  cod = codec.Codec.from_params(cfg, params)
  img = _img(128, 128, seed=5)
  on, recon_on = codec.compress(cod, img)
  off, recon_off = codec.compress(cod, img, skip_channels=False)
  np.testing.assert_array_equal(recon_on, recon_off)
  assert on[codec._HEAD2.size - 1] == 1 and off[codec._HEAD2.size - 1] == 0
  nb = (M + 7) // 8
  bits = np.unpackbits(np.frombuffer(on[codec._HEAD2.size:
                                        codec._HEAD2.size + nb], np.uint8),
                       bitorder="little")
  assert bits.size == 8 * nb and not bits[M:].any()
  assert sorted(np.flatnonzero(bits[:M] == 0)) == planted
  occ = codec.occupancy(cod, on)
  assert occ.shape == (M,) and sorted(np.flatnonzero(~occ)) == planted
  assert codec.occupancy(cod, off) is None
  np.testing.assert_array_equal(codec.decompress(cod, on), recon_on)
  np.testing.assert_array_equal(codec.decompress(cod, off), recon_off)
  ly_on = _section_lengths(on, M, True)[1]
  ly_off = _section_lengths(off, M, False)[1]
  assert ly_on < ly_off
  # A corrupt bitmap (a planted channel marked occupied) fails or differs,
  # never silently yields the same image.
  bad = bytearray(on)
  bad[codec._HEAD2.size + nb - 1] |= 0xF0
  with pytest.raises(codec.FormatError, match="beyond M"):
    codec.decompress(cod, bytes(bad))


def test_format_errors():
  _, _, cod = make_codec()
  data, _ = codec.compress(cod, _img(40, 40))
  with pytest.raises(codec.FormatError, match="truncated"):
    codec.decompress(cod, data[:-3])
  bad = bytearray(data)
  bad[codec._HEAD2.size - 2] = 2  # Context code: serial.
  with pytest.raises(codec.FormatError, match="serial context model"):
    codec.decompress(cod, bytes(bad))
  bad = bytearray(data)
  bad[codec._HEAD2.size - 1] = 0x80
  with pytest.raises(codec.FormatError, match="unknown header flags"):
    codec.decompress(cod, bytes(bad))
  plain_cfg = hyperprior.HyperpriorConfig(N=N, M=M)
  plain = codec.Codec.from_params(plain_cfg, hyperprior.Hyperprior(
      plain_cfg).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
  with pytest.raises(codec.FormatError, match="loaded model uses context"):
    codec.decompress(plain, data)
  v1, _ = codec.compress(plain, _img(40, 40))
  with pytest.raises(codec.FormatError, match="plain hyperprior"):
    codec.decompress(cod, v1)


# --- training ----------------------------------------------------------------


def test_context_sees_only_decoded_anchors():
  """Anchors' parameters do not depend on y at all (hyperprior only); the
  non-anchors' parameters depend on y^ at anchors only. Planted bug: drop
  the anchor mask in `nonanchor_raw` and the gradient at non-anchors is
  non-zero."""
  mod = checkerboard.CheckerboardContext(4, "gmm", "gaussian", 2)
  psi = jax.random.normal(jax.random.key(1), (1, 6, 6, 8))
  y = jax.random.normal(jax.random.key(2), (1, 6, 6, 4))
  p = mod.init(jax.random.key(0), y, psi)["params"]
  g = jax.grad(lambda y: mod.apply({"params": p}, psi, y,
                                   method="nonanchor_raw").sum())(y)
  amask = checkerboard.anchor_mask(6, 6)
  assert np.abs(np.asarray(g)[0][~amask]).max() == 0
  assert np.abs(np.asarray(g)[0][amask]).max() > 0


def test_training_forward_and_l1(tmp_path):
  """Smoke: shapes of the training forward; the L1 term adds exactly
  alpha_1 * sum|y^| / (B H W) (oracle: the forward's y^); the trainer runs
  2 steps with finite losses."""
  cfg = hyperprior.HyperpriorConfig(N=N, M=M, context="checkerboard",
                                    l1_weight=50.0)
  model = hyperprior.Hyperprior(cfg)
  imgs = [_img(80, 80, s) for s in range(2)]
  tc = trainer.TrainConfig(num_steps=2, batch_size=8, learning_rate=1e-3,
                           log_every=1, checkpoint_every=2, progress=False,
                           console=False)
  task = train.make_task(cfg, imgs, 0.01, tc, 64)
  params = task.init_params(jax.random.key(0))
  assert set(params["ckbd"]) == {"context_prediction", "ep_anchor",
                                 "ep_nonanchor"}
  assert params["ckbd"]["ep_anchor"]["conv2"]["kernel"].shape[-1] == 9 * M
  batch = next(task.batches(0))
  rng = jax.random.key(1)
  out = model.apply({"params": params}, batch["x"], rng, True)
  for k in ("x_hat", "y_hat", "y_lik"):
    assert out[k].shape[0] == 8
  assert out["y_lik"].shape == out["y_hat"].shape == (8, 4, 4, M)
  loss, aux = task.loss_fn(params, batch, rng, 0)
  task0 = train.make_task(hyperprior.HyperpriorConfig(
      N=N, M=M, context="checkerboard"), imgs, 0.01, tc, 64)
  loss0, aux0 = task0.loss_fn(params, batch, rng, 0)
  assert "train/l1" not in aux0
  l1 = float(jnp.sum(jnp.abs(out["y_hat"]))) / (8 * 64 * 64)
  np.testing.assert_allclose(float(aux["train/l1"]), l1, rtol=1e-5)
  # float32 loss ~ 1e2: compare the difference to 1e-3 relative.
  np.testing.assert_allclose(float(loss - loss0), 50.0 * l1, rtol=1e-3)
  state = trainer.train(task, tc, str(tmp_path / "run"))
  assert int(state.step) == 2
  assert all(np.isfinite(np.asarray(v)).all()
             for v in jax.tree.leaves(state.params))
