"""The shared attention primitive and feature fusion (brief §2.2, §8 items 5-6).

Planted-bug checks done while writing these tests (each made a test fail):
softmax over the query axis, dropping the extra keys when include_self is
on, ignoring `extra_valid`, fusing where the cosine is below the threshold,
taking argmin instead of argmax in fusion.
"""

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlib_models.diffusion.attention import (Attention, SelfAttnHooks,
                                               attend, fuse_features)

pytestmark = pytest.mark.usefixtures("fast_compile")


def _qkv(b=2, n=6, c=8, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(kk, (b, n, c)) for kk in k)


def _numpy_attention(q, k, v, heads):
  b, n, c = q.shape
  d = c // heads
  q, k, v = (np.asarray(x, np.float64).reshape(b, -1, heads, d)
             for x in (q, k, v))
  s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(d)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhnm,bmhd->bnhd", p, v).reshape(b, n, c)


@pytest.mark.parametrize("impl", ["reference", "xla", "auto", "blocked",
                                  "pallas"])
def test_attend_matches_numpy(impl):
  q, k, v = _qkv()
  out = attend(q, k, v, heads=2, impl=impl)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, 2), atol=2e-6)


def test_blocked_path_pads_queries_and_masks_keys(monkeypatch):
  from jaxlib_models.diffusion import attention
  monkeypatch.setattr(attention, "Q_BLOCK", 4)
  q, k, v = _qkv(n=10)  # 10 queries: blocks of 4, the last one padded
  _, k2, v2 = _qkv(n=10, seed=4)
  valid = jnp.arange(10) % 3 != 0
  want = attend(q, k, v, k2, v2, heads=2, extra_valid=valid,
                impl="reference")
  got = attention._blocked(*(x.reshape(2, -1, 2, 4) for x in (
      q, jnp.concatenate([k, k2], 1), jnp.concatenate([v, v2], 1))),
      jnp.concatenate([jnp.ones((2, 10), bool),
                       jnp.broadcast_to(valid, (2, 10))], 1), q_block=4)
  np.testing.assert_allclose(got.reshape(2, 10, 8), want, atol=2e-6)
  # Gradients flow through the blocked path.
  g = jax.grad(lambda x: attend(x, k, v, heads=2, impl="blocked").sum())(q)
  g_ref = jax.grad(lambda x: attend(x, k, v, heads=2,
                                    impl="reference").sum())(q)
  np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_duplicate_keys_and_values_change_nothing():
  q, k, v = _qkv()
  plain = attend(q, k, v, heads=2)
  dup = attend(q, k, v, k, v, heads=2, include_self=True)
  only_extra = attend(q, k, v, k, v, heads=2, include_self=False)
  assert float(jnp.abs(plain - dup).max()) < 1e-6
  assert float(jnp.abs(plain - only_extra).max()) < 1e-6
  # A different bank does change the output (the test can fail).
  _, k2, v2 = _qkv(seed=1)
  assert float(jnp.abs(plain - attend(q, k, v, k2, v2, heads=2)).max()) > 1e-2


def test_extended_attention_is_attention_over_the_concatenation():
  q, k, v = _qkv()
  _, k2, v2 = _qkv(seed=3)
  out = attend(q, k, v, k2, v2, heads=4)
  want = _numpy_attention(q, np.concatenate([k, k2], 1),
                          np.concatenate([v, v2], 1), 4)
  np.testing.assert_allclose(out, want, atol=2e-6)


@pytest.mark.parametrize("impl", ["auto", "blocked", "pallas"])
def test_invalid_extra_slots_are_ignored(impl):
  q, k, v = _qkv()
  _, k2, v2 = _qkv(seed=5)
  valid = jnp.array([True, False, True, False, False, True])
  out = attend(q, k, v, k2, v2, heads=2, extra_valid=valid, impl=impl)
  keep = np.asarray(valid)
  want = _numpy_attention(q, np.concatenate([k, k2[:, keep]], 1),
                          np.concatenate([v, v2[:, keep]], 1), 2)
  np.testing.assert_allclose(out, want, atol=2e-6)
  none = attend(q, k, v, k2, v2, heads=2, extra_valid=jnp.zeros(6, bool))
  np.testing.assert_allclose(none, attend(q, k, v, heads=2), atol=2e-6)


def test_sixteen_bit_inputs_keep_float32_softmax():
  q, k, v = _qkv(n=64, c=16)
  out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), heads=2)
  assert out.dtype == jnp.bfloat16
  ref = _numpy_attention(*(np.asarray(x.astype(jnp.bfloat16), np.float32)
                           for x in (q, k, v)), 2)
  assert float(np.abs(np.asarray(out, np.float32) - ref).max()) < 2e-2


def test_bad_inputs_name_the_problem():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="nothing to attend"):
    attend(q, k, v, heads=2, include_self=False)
  with pytest.raises(ValueError, match="do not fit"):
    attend(q, k, v, k[:, :, :4], v[:, :, :4], heads=2)
  with pytest.raises(ValueError, match="multiple of heads"):
    attend(q, k, v, heads=3)
  with pytest.raises(ValueError, match="impl"):
    attend(q, k, v, heads=2, impl="flash")
  with pytest.raises(ValueError, match="include_self=False needs extra"):
    SelfAttnHooks(include_self=False)


def test_fusion_threshold_above_one_is_identity():
  o, ob, _ = _qkv()
  out = fuse_features(o, ob, None, threshold=1.01, strength=0.8)
  np.testing.assert_array_equal(out, o)


def test_fusion_minus_one_threshold_full_strength_copies_nearest():
  o, ob, _ = _qkv()
  out = np.asarray(fuse_features(o, ob, None, threshold=-1.0, strength=1.0))
  on = np.asarray(o) / np.linalg.norm(o, axis=-1, keepdims=True)
  bn = np.asarray(ob) / np.linalg.norm(ob, axis=-1, keepdims=True)
  j = np.einsum("bnc,bmc->bnm", on, bn).argmax(-1)
  want = np.take_along_axis(np.asarray(ob), j[..., None], 1)
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_fusion_blends_only_matched_tokens():
  o, ob, _ = _qkv(n=4)
  # Token 0 of the bank is a scaled copy of query token 2 (cosine 1).
  ob = ob.at[:, 0].set(3.0 * o[:, 2])
  out = np.asarray(fuse_features(o, ob, None, threshold=0.98, strength=0.8))
  o, ob = np.asarray(o), np.asarray(ob)
  np.testing.assert_allclose(out[:, 2], 0.2 * o[:, 2] + 0.8 * ob[:, 0],
                             atol=1e-6)
  others = [0, 1, 3]
  sims = np.einsum("bnc,bmc->bnm",
                   o / np.linalg.norm(o, axis=-1, keepdims=True),
                   ob / np.linalg.norm(ob, axis=-1, keepdims=True)).max(-1)
  unmatched = sims[:, others] < 0.98
  np.testing.assert_array_equal(out[:, others][unmatched],
                                o[:, others][unmatched])
  # An invalid bank slot is never matched.
  masked = fuse_features(jnp.asarray(o), jnp.asarray(ob),
                         jnp.array([False, True, True, True]),
                         threshold=0.98, strength=0.8)
  np.testing.assert_allclose(masked[:, 2], o[:, 2], atol=1e-6)


class _Toy(nn.Module):
  hooks: SelfAttnHooks

  @nn.compact
  def __call__(self, x):
    x = Attention(8, 2, 4, hooks=self.hooks, name="down_blocks_0")(x)
    return Attention(8, 2, 4, hooks=self.hooks, name="mid_block")(x)


def test_module_hooks_capture_read_and_fuse():
  x, _, _ = _qkv()
  plain = _Toy(SelfAttnHooks(capture=True))
  params = plain.init(jax.random.key(0), x)["params"]
  y, var = plain.apply({"params": params}, x, mutable=["attn_capture"])
  cap = var["attn_capture"]
  assert set(cap) == {"down_blocks_0", "mid_block"}
  assert set(cap["mid_block"]) == {"k", "v", "o"}
  # Own k/v/o fed back as the bank: duplicate keys, and every token's
  # nearest bank output is itself, so fusion is the identity too.
  banked = _Toy(SelfAttnHooks(extra=True, capture=True,
                              fuse_paths=("mid_block",)))
  y2, var2 = banked.apply({"params": params, "attn_extra": cap}, x,
                          mutable=["attn_capture"])
  assert float(jnp.abs(y - y2).max()) < 1e-5
  # The captured (pre-fusion) outputs equal the plain ones.
  np.testing.assert_allclose(var2["attn_capture"]["mid_block"]["o"],
                             cap["mid_block"]["o"], atol=1e-5)
  # Another bank changes the output.
  other = jax.tree.map(lambda a: a[::-1], cap)
  y3, _ = banked.apply({"params": params, "attn_extra": other}, x,
                       mutable=["attn_capture"])
  assert float(jnp.abs(y - y3).max()) > 1e-3
  with pytest.raises(ValueError, match="attn_extra"):
    banked.apply({"params": params}, x, mutable=["attn_capture"])
