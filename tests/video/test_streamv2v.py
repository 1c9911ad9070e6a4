"""StreamV2V core: DyMe merging, bank cadence and memory, the stream batch.

A toy denoiser with two real `Attention` layers (one under `mid_block`, so
feature fusion applies) exercises the same hooks as the UNet; the full UNet
is covered in test_streamv2v_pipeline.py.

Planted-bug checks done while writing these tests (each made a test fail):
merging without the destination's own weight (mean of sources only), one
assignment for K but a fresh one for V, updating the bank every call,
re-noising slot b to its own timestep instead of the next slot's, returning
slot 0 instead of the last slot, an unseeded merge split.
"""

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlib_models.diffusion.attention import Attention, SelfAttnHooks
from jaxlib_models.video.streamv2v import bank as bank_lib
from jaxlib_models.video.streamv2v import stream

pytestmark = pytest.mark.usefixtures("fast_compile")

LAT = (4, 4, 4)  # h, w, c of the toy latents


class _ToyUNet(nn.Module):
  """Tokens -> attn (down_blocks_0) -> attn (mid_block) -> eps."""

  hooks: SelfAttnHooks

  @nn.compact
  def __call__(self, x, t, ctx):
    s, h, w, c = x.shape
    tok = nn.Dense(8, name="proj_in")(x.reshape(s, h * w, c))
    tok = tok + jnp.sin(t.astype(jnp.float32) / 100.0)[:, None, None]
    tok = tok + Attention(8, 2, 4, hooks=self.hooks,
                          name="down_blocks_0")(tok)
    tok = tok + Attention(8, 2, 4, hooks=self.hooks, name="mid_block")(tok)
    return nn.Dense(c, name="proj_out")(tok).reshape(x.shape)


def _toy(bcfg: stream.BankConfig):
  plain = _ToyUNet(SelfAttnHooks(capture=bcfg.enabled))
  banked = _ToyUNet(bcfg.hooks())
  params = plain.init(jax.random.key(0), jnp.zeros((4,) + LAT),
                      jnp.zeros(4, jnp.int32), None)["params"]

  def denoise(p, x, t, ctx, bank):
    if bank is None:
      out, var = plain.apply({"params": p}, x, t, ctx,
                             mutable=["attn_capture"])
    else:
      out, var = banked.apply({"params": p, "attn_extra": bank}, x, t, ctx,
                              mutable=["attn_capture"])
    return out, var.get("attn_capture")

  return denoise, params


def _frames(n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 1) + LAT)


def _run(cfg, frames, denoise=None, params=None, state=None):
  if denoise is None:
    denoise, params = _toy(cfg.bank)
  step = stream.make_step(denoise, cfg)
  state = state or stream.init_state(cfg, LAT)
  outs = []
  ctx = jnp.zeros((1, 2, 8))
  for z in frames:
    y, state = step(params, state, z, ctx)
    outs.append(y)
  return jnp.concatenate(outs), state, step


# --------------------------------------------------------------------------
# DyMe


def test_worked_example_from_the_brief():
  dst = jnp.array([[1.0], [10.0]])
  src = jnp.array([[3.0], [5.0], [7.0]])
  out = bank_lib.merge_assigned(dst, src, jnp.array([0, 0, 1]))
  np.testing.assert_allclose(out[:, 0], [3.0, 8.5])


def test_merge_keeps_token_count_and_uses_one_assignment():
  b, n, c = 4, 6, 8
  ks = jax.random.split(jax.random.key(1), 6)
  bank = {f: jax.random.normal(ks[i], (b, n, c)) for i, f in
          enumerate(bank_lib.FIELDS)}
  cur = {f: jax.random.normal(ks[3 + i], (b, n, c)) for i, f in
         enumerate(bank_lib.FIELDS)}
  # V and O are copies of K: one shared assignment keeps them copies.
  bank = {f: bank["k"] * (i + 1) for i, f in enumerate(bank_lib.FIELDS)}
  cur = {f: cur["k"] * (i + 1) for i, f in enumerate(bank_lib.FIELDS)}
  out = bank_lib.merge_layer(bank, cur, jax.random.key(7))
  assert all(out[f].shape == (b, n, c) for f in bank_lib.FIELDS)
  np.testing.assert_allclose(out["v"], 2 * out["k"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["o"], 3 * out["k"], rtol=1e-6, atol=1e-6)


def test_orthogonal_keys_merge_predictably():
  # Bank tokens 0..3 and current tokens 4..7; token i + 4 has the direction of
  # token i (one-hot keys), so a source whose twin is a destination must go
  # to that twin, and the merged values follow from the split alone.
  n = 4
  basis = jnp.eye(8)[:n]
  keys = jnp.concatenate([basis, 2.0 * basis])[None]
  vals = jnp.arange(2 * n, dtype=jnp.float32)[None, :, None] * jnp.ones(8)
  x = {"k": keys, "v": vals, "o": -vals}
  key = jax.random.key(3)
  src, dst, assign = map(np.asarray, bank_lib.bipartite_assign(
      keys[0], jax.random.split(key, 1)[0], n))
  out = bank_lib.merge_layer({f: a[:, :n] for f, a in x.items()},
                             {f: a[:, n:] for f, a in x.items()}, key)
  twin = lambda i: (i + n) % (2 * n)
  for s_tok, a in zip(src, assign):
    if twin(s_tok) in dst:
      assert dst[a] == twin(s_tok)
  v = np.asarray(vals[0, :, 0])
  for d_pos, d in enumerate(dst):
    mates = [s_tok for s_tok, a in zip(src, assign) if a == d_pos]
    want = (v[d] + sum(v[m] for m in mates)) / (1 + len(mates))
    assert float(out["v"][0, d_pos, 0]) == pytest.approx(want)
    assert float(out["o"][0, d_pos, 0]) == pytest.approx(-want)


def test_same_key_same_bank_other_key_other_split():
  b, n, c = 2, 8, 4
  ks = jax.random.split(jax.random.key(2), 2)
  bank = {f: jax.random.normal(ks[0], (b, n, c)) for f in bank_lib.FIELDS}
  cur = {f: jax.random.normal(ks[1], (b, n, c)) for f in bank_lib.FIELDS}
  a = bank_lib.merge_layer(bank, cur, jax.random.key(11))
  a2 = bank_lib.merge_layer(bank, cur, jax.random.key(11))
  b2 = bank_lib.merge_layer(bank, cur, jax.random.key(12))
  np.testing.assert_array_equal(a["k"], a2["k"])
  assert float(jnp.abs(a["k"] - b2["k"]).max()) > 1e-3


# --------------------------------------------------------------------------
# Stream batch


def test_slot_timesteps_are_the_reference_ones():
  cfg = stream.StreamConfig()
  np.testing.assert_array_equal(cfg.timesteps(), [399, 299, 199, 99])
  assert cfg.latency == 3


def test_output_k_is_input_k_minus_latency_with_an_exact_denoiser():
  # A denoiser returning eps = 0 on noise-free slots predicts x0 = x/a_t,
  # i.e. exactly the clean latent, so the output is that latent up to the
  # LCM boundary terms (c_out ~ 1 - 1e-7, c_skip ~ 1e-7).
  cfg = stream.StreamConfig(bank=stream.BankConfig(enabled=False))
  zero = lambda p, x, t, ctx, bank: (jnp.zeros_like(x), None)
  state = stream.init_state(cfg, LAT)
  state = state.replace(noise=jnp.zeros_like(state.noise))
  frames = _frames(10)
  out, _, _ = _run(cfg, frames, zero, {}, state)
  np.testing.assert_allclose(out[3:], frames[:-3, 0], atol=2e-6)
  assert float(jnp.abs(out[3:] - frames[1:-2, 0]).max()) > 0.1
  # Priming: the first outputs are frame 0.
  np.testing.assert_allclose(out[:3], jnp.repeat(frames[:1, 0], 3, 0),
                             atol=2e-6)


def test_each_slot_is_renoised_to_the_next_timestep():
  cfg = stream.StreamConfig(bank=stream.BankConfig(enabled=False))
  seen = []

  def spy(p, x, t, ctx, bank):
    jax.debug.callback(lambda xx: seen.append(np.asarray(xx)), x)
    return jnp.zeros_like(x), None

  frames = _frames(6)
  _run(cfg, frames, spy, {})
  st = stream.init_state(cfg, LAT)
  ac = np.asarray(stream.schedulers.make_alphas_cumprod(cfg.scheduler),
                  np.float64)
  ts = cfg.timesteps()
  a, sg = np.sqrt(ac[ts]), np.sqrt(1 - ac[ts])
  c_skip, c_out = (np.asarray(c, np.float64) for c in
                   stream.schedulers.lcm_scalings(cfg.scheduler, ts))
  eps = np.asarray(st.noise, np.float64)
  r = lambda v: v[:, None, None, None]
  pending = None
  for i, z in enumerate(np.asarray(frames, np.float64)):
    if i == 0:  # priming: every slot holds frame 0 at its timestep
      x = r(a) * z + r(sg) * eps
    else:
      x = np.concatenate([a[0] * z + sg[0] * eps[:1], pending])
    np.testing.assert_allclose(seen[i], x, atol=1e-5)
    den = r(c_out) * x / r(a) + r(c_skip) * x  # eps = 0
    pending = r(a[1:]) * den[:3] + r(sg[1:]) * eps[1:]


def test_bank_updates_only_every_interval_calls():
  cfg = stream.StreamConfig(bank=stream.BankConfig(interval=4))
  denoise, params = _toy(cfg.bank)
  step = stream.make_step(denoise, cfg)
  state = stream.init_state(cfg, LAT)
  ctx = jnp.zeros((1, 2, 8))
  changes = []
  prev = None
  for i, z in enumerate(_frames(13)):
    _, state = step(params, state, z, ctx)
    cur = np.asarray(state.bank["mid_block"]["k"])
    if prev is not None:
      changes.append(not np.array_equal(cur, prev))
    prev = cur
  # Call 0 seeds; calls 4, 8, 12 update (frame_id % 4 == 0).
  assert [i + 1 for i, c in enumerate(changes) if c] == [4, 8, 12]


def test_long_run_compiles_once_with_constant_bank_memory():
  cfg = stream.StreamConfig(bank=stream.BankConfig(interval=1))
  denoise, params = _toy(cfg.bank)
  step = stream.make_step(denoise, cfg)
  state = stream.init_state(cfg, LAT)
  ctx = jnp.zeros((1, 2, 8))
  frames = _frames(1000, seed=4)
  sizes = set()
  for i in range(1000):
    y, state = step(params, state, frames[i], ctx)
    if i % 100 == 1:
      sizes.add(bank_lib.bank_bytes(state.bank))
  assert bool(jnp.isfinite(y).all())
  assert len(sizes) == 1
  assert step.seed_fn._cache_size() == 1
  assert step.run_fn._cache_size() == 1
  assert int(state.frame_id) == 1000


def test_identical_frames_bank_equals_per_frame_pipeline():
  # FIFO bank (no merge): on identical frames the stream reaches a fixed
  # point where the bank holds each slot's own k/v/o, so extended attention
  # and fusion change nothing. Before it, slot b's input changes during its
  # first b calls (priming) and a wrong bank entry needs one call per layer
  # to wash out (measured: 2e-5 from call 9 without fusion, call 12 with it;
  # outputs are of size ~10).
  frames = jnp.repeat(_frames(1), 18, axis=0)
  banked = stream.StreamConfig(bank=stream.BankConfig(merge=False,
                                                      interval=1))
  plain = stream.StreamConfig(bank=stream.BankConfig(enabled=False))
  denoise, params = _toy(banked.bank)
  plain_fn, _ = _toy(plain.bank)
  out_b, _, _ = _run(banked, frames, denoise, params)
  out_p, _, _ = _run(plain, frames, plain_fn, params)
  assert float(jnp.abs(out_b[14:] - out_p[14:]).max()) < 1e-4
  assert float(jnp.abs(out_b[:4] - out_p[:4]).max()) > 1e-2  # transient
  # ... while on a moving video the bank does change the output.
  moving = _frames(18, seed=8)
  mb, _, _ = _run(banked, moving, denoise, params)
  mp, _, _ = _run(plain, moving, plain_fn, params)
  assert float(jnp.abs(mb[14:] - mp[14:]).max()) > 1e-2


def test_runs_are_reproducible_for_a_seed():
  cfg = stream.StreamConfig(bank=stream.BankConfig(interval=1))
  frames = _frames(8, seed=9)
  a, _, _ = _run(cfg, frames)
  b, _, _ = _run(cfg, frames)
  np.testing.assert_array_equal(a, b)
  c, _, _ = _run(stream.StreamConfig(seed=3, bank=cfg.bank), frames)
  assert float(jnp.abs(a[3:] - c[3:]).max()) > 1e-4


def test_bad_settings_are_refused_with_the_reason():
  with pytest.raises(ValueError, match="guidance"):
    stream.StreamConfig(guidance_scale=7.5)
  with pytest.raises(ValueError, match="interval"):
    stream.BankConfig(interval=0)
  with pytest.raises(ValueError, match="steps"):
    stream.StreamConfig(num_inference_steps=40)
  cfg = stream.StreamConfig()
  denoise, params = _toy(cfg.bank)
  step = stream.make_step(denoise, cfg)
  with pytest.raises(ValueError, match="does not fit"):
    step(params, stream.init_state(cfg, LAT), jnp.zeros((1, 8, 8, 4)),
         jnp.zeros((1, 2, 8)))
