"""Contrast, mask, DoLa and SLED units on synthetic logits (brief §8.6-8.9).

Oracles are NumPy float64 re-derivations written here from the brief, or
closed-form cases; no test compares a function with itself.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.decoding import config as config_lib
from jaxlib_models.decoding import contrast, metrics

pytestmark = pytest.mark.usefixtures("fast_compile")

L = 6  # Blocks of the synthetic model; exits 0..6.
V = 32
T = 5
B = 3  # Leading batch dim (answers of one question).


def _logits(seed, shape=(B, T, V), scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * (
      scale
  )


def _stream(seed, layers=range(L + 1)):
  return {j: _logits(1000 * seed + j) for j in layers}


def _np_lsm(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_js(lp, lq):
  p, q = np.exp(lp), np.exp(lq)
  m = 0.5 * (p + q)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl_p = np.where(p > 0, p * (np.log(p) - np.log(m)), 0.0).sum(-1)
    kl_q = np.where(q > 0, q * (np.log(q) - np.log(m)), 0.0).sum(-1)
  return 0.5 * kl_p + 0.5 * kl_q


def _cfg(method, **kw):
  sub = {k: kw.pop(k) for k in ("lol", "dola", "sled", "cd") if k in kw}
  return config_lib.DecodingConfig(method=method, **sub, **kw)


LOL_STATIC = config_lib.LolConfig(layers=(2, 4), weights=(0.5, 0.25))
LOL_JS = config_lib.LolConfig(
    layer_select="js_max", candidate_layers=(1, 3, 5), weights=(0.7,)
)


def _targets(seed=7):
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, V, size=(B, T))
  valid = np.ones((B, T), bool)
  valid[0, 3:] = False  # A shorter answer, right padded.
  valid[2, 4:] = False
  return targets, valid


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg("icd"),
        _cfg("cd"),
        _cfg("lol", lol=LOL_STATIC),
        _cfg("lol", lol=LOL_JS),
    ],
    ids=["icd", "cd_li", "lol_static", "lol_js_max"],
)
def test_expert_equals_amateur_gives_zero_scores_and_chance_mc(cfg):
  """Identical streams => every score 0 => MC1 0, MC3 0, MC2 nT/(nT+nF).

  Planted bug caught: contrasting expert layer L with amateur layer l (or a
  missing fusion sign) leaves non-zero scores.
  """
  expert = _stream(1)
  amateur = {j: x.copy() for j, x in expert.items()}
  f = contrast.method_logits(cfg, expert, amateur, L)
  np.testing.assert_array_equal(np.asarray(f), 0.0)
  targets, valid = _targets()
  scores = np.asarray(contrast.score_continuation(f, targets, valid))
  np.testing.assert_array_equal(scores, 0.0)
  n_true, n_false = 2, 1  # Answers 0, 1 true; 2 false.
  m = metrics.mc_scores(scores[:2], scores[2:], 0, "reference")
  assert m["mc1"] == 0.0 and m["mc3"] == 0.0
  assert m["mc2"] == pytest.approx(n_true / (n_true + n_false), abs=1e-12)


@pytest.mark.parametrize("cfg", [_cfg("icd"), _cfg("lol", lol=LOL_STATIC)])
def test_post_softmax_on_zero_contrast_scores_minus_len_log_v(cfg):
  """post_softmax on F = 0 gives -log V per token: score = -|c| log V.

  Planted bug caught: skipping post_softmax leaves 0; normalising over the
  wrong axis gives -log T.
  """
  cfg = dataclasses.replace(cfg, post_softmax=True)
  expert = _stream(2)
  f = contrast.method_logits(cfg, expert, dict(expert), L)
  targets, valid = _targets()
  scores = np.asarray(contrast.score_continuation(f, targets, valid))
  np.testing.assert_allclose(
      scores, -valid.sum(-1) * math.log(V), rtol=1e-6, atol=1e-5
  )


@pytest.mark.parametrize("post_softmax", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("use_jit", [False, True])
def test_lol_with_zero_weight_equals_icd_bit_for_bit(
    post_softmax, alpha, use_jit
):
  """LOL with lambda = 0 is ICD exactly (brief §8.6).

  Planted bug caught: a fusion that rescales the final contrast, e.g.
  (C^L + lambda C^l) / (1 + lambda) or renormalising before fusing.
  """
  expert, amateur = _stream(3), _stream(4)
  common = {"relative_top": alpha, "post_softmax": post_softmax}
  lol = _cfg(
      "lol", lol=config_lib.LolConfig(layers=(3,), weights=(0.0,)), **common
  )
  icd = _cfg("icd", **common)

  def run(cfg):
    fn = functools.partial(contrast.method_logits, cfg, num_layers=L)
    if use_jit:
      fn = jax.jit(fn)
    return np.asarray(fn(expert, amateur))

  np.testing.assert_array_equal(run(lol), run(icd))


def test_icd_alpha0_equals_difference_of_base_scores():
  """ICD, alpha 0, no post_softmax: score = log p_E(C) - log p_A(C).

  Two independent base calls (amateur logits fed as the expert) and a NumPy
  log-likelihood ratio. Planted bug caught: masking or renormalising at
  alpha = 0, or using amateur log-probs from the wrong layer.
  """
  expert, amateur = _stream(5), _stream(6)
  targets, valid = _targets()
  base = _cfg("base")
  icd = _cfg("icd", relative_top=0.0, post_softmax=False)
  s_icd = contrast.score_continuation(
      contrast.method_logits(icd, expert, amateur, L), targets, valid
  )
  s_e = contrast.score_continuation(
      contrast.method_logits(base, expert, None, L), targets, valid
  )
  s_a = contrast.score_continuation(
      contrast.method_logits(base, amateur, None, L), targets, valid
  )
  np.testing.assert_allclose(s_icd, s_e - s_a, atol=1e-4)
  lp_e, lp_a = _np_lsm(expert[L]), _np_lsm(amateur[L])
  ratio = np.take_along_axis(lp_e - lp_a, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(
      s_icd, np.where(valid, ratio, 0.0).sum(-1), atol=1e-4
  )


def test_lol_static_fusion_matches_numpy():
  """F = C^L + sum_l lambda_l C^l, then mask from the expert's final layer.

  Planted bug caught: weights applied to the wrong layers, or the amateur
  contrast taken at layer L for every term.
  """
  expert, amateur = _stream(7), _stream(8)
  cfg = _cfg("lol", lol=LOL_STATIC, relative_top=0.1)
  f = np.asarray(contrast.method_logits(cfg, expert, amateur, L))
  c = {j: _np_lsm(expert[j]) - _np_lsm(amateur[j]) for j in (2, 4, L)}
  want = c[L] + 0.5 * c[2] + 0.25 * c[4]
  lp = _np_lsm(expert[L])
  mask = lp < lp.max(-1, keepdims=True) + math.log(0.1)
  want = np.where(mask, -1000.0, want)
  np.testing.assert_allclose(f, want, atol=1e-5)


def test_lol_js_max_selects_on_expert_and_reuses_index_for_amateur():
  """js_max: per position, argmax JS on the expert; same index for A.

  Planted bug caught: selecting on the amateur stream or on the contrast.
  """
  expert, amateur = _stream(9), _stream(10)
  cfg = _cfg("lol", lol=LOL_JS)
  f = np.asarray(contrast.method_logits(cfg, expert, amateur, L))
  lp_e = {j: _np_lsm(expert[j]) for j in range(L + 1)}
  lp_a = {j: _np_lsm(amateur[j]) for j in range(L + 1)}
  cands = (1, 3, 5)
  js = np.stack([_np_js(lp_e[L], lp_e[j]) for j in cands])  # (N, B, T)
  pick = np.asarray(cands)[js.argmax(0)]
  want = lp_e[L] - lp_a[L]
  for b in range(B):
    for t in range(T):
      j = pick[b, t]
      want[b, t] += 0.7 * (lp_e[j][b, t] - lp_a[j][b, t])
  np.testing.assert_allclose(f, want, atol=1e-5)
  # The selection must vary, else the test cannot tell positions apart.
  assert len(np.unique(pick)) > 1


def test_cd_obrien_form_in_logit_space():
  """(1 + beta) z_E - beta z_A with the expert alpha mask (O'Brien & Lewis).

  Planted bug caught: using log-probs instead of raw logits (differs by a
  per-position constant) or a beta sign error.
  """
  expert, amateur = _stream(11), _stream(12)
  cfg = _cfg(
      "cd",
      cd=config_lib.CdConfig(beta=0.5, form="obrien"),
      amateur="smaller_model",
      relative_top=0.1,
  )
  # A smaller amateur (3 blocks): its final output is keyed 3.
  small = {3: amateur[L]}
  f = np.asarray(
      contrast.method_logits(cfg, expert, small, L, amateur_num_layers=3)
  )
  want = 1.5 * expert[L].astype(np.float64) - 0.5 * amateur[L]
  lp = _np_lsm(expert[L])
  want = np.where(lp < lp.max(-1, keepdims=True) + math.log(0.1), -1000, want)
  np.testing.assert_allclose(f, want, atol=1e-5)


def test_base_is_final_log_softmax_in_float32():
  """Smoke + value: base F = log_softmax(z_L) in float32 from bf16 input."""
  expert = {L: jnp.asarray(_logits(13), jnp.bfloat16)}
  f = contrast.method_logits(_cfg("base"), expert, None, L)
  assert f.dtype == jnp.float32
  np.testing.assert_allclose(
      f, _np_lsm(np.asarray(expert[L], np.float32)), atol=1e-5
  )


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg("lol", lol=LOL_JS, relative_top=0.1, post_softmax=True),
        _cfg("dola", dola=config_lib.DolaConfig(premature_layers=(1, 2, 3))),
        _cfg("sled", sled=config_lib.SledConfig(k=8, layers=(2, 3, 4))),
    ],
    ids=["lol_js", "dola", "sled"],
)
def test_jit_matches_eager(cfg):
  """method_logits under jit (cfg static) equals the eager result."""
  expert, amateur = _stream(14), _stream(15)
  eager = contrast.method_logits(cfg, expert, amateur, L)
  jitted = jax.jit(
      functools.partial(contrast.method_logits, cfg, num_layers=L)
  )(expert, amateur)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_input_validation():
  expert = _stream(16, layers=(L,))
  with pytest.raises(ValueError, match="amateur"):
    contrast.method_logits(_cfg("icd"), expert, None, L)
  with pytest.raises(KeyError, match=r"\[2, 4\]"):
    contrast.method_logits(_cfg("lol", lol=LOL_STATIC), expert, expert, L)
  with pytest.raises(ValueError, match="tied"):
    contrast.method_logits(_cfg("dola"), _stream(16), None, L)
  with pytest.raises(ValueError, match="same depth|with 6 layers"):
    contrast.method_logits(
        _cfg("lol"), _stream(16), _stream(17), L, amateur_num_layers=3
    )
  with pytest.raises(ValueError, match="mode"):
    contrast.method_logits(_cfg("base"), expert, None, L, mode="beam")


# ---------------------------------------------------------------------- mask


def test_alpha_one_keeps_only_argmax_and_exact_ties():
  """alpha = 1: keep v iff lp[v] == max (brief §8.7).

  Planted bug caught: '<=' instead of '<' masks the argmax itself.
  """
  lp = np.log(
      np.array([[0.4, 0.4, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)
  )
  mask = np.asarray(contrast.plausibility_mask(lp, 1.0))
  np.testing.assert_array_equal(
      mask, [[False, False, True, True], [False, True, True, True]]
  )
  assert not np.asarray(contrast.plausibility_mask(lp, 0.0)).any()


def test_mask_follows_expert_final_layer_and_writes_exact_constant():
  """The mask comes from lp_E^L, not from F nor from an early layer.

  Build a case where the three disagree: the contrast prefers token 2, the
  expert's early layer prefers token 3, the expert's final layer token 0.
  Masked entries equal -1000 exactly even after post_softmax (the mask is
  applied last). Planted bugs caught: mask from F, mask from the amateur,
  mask before post_softmax.
  """
  z_e_final = np.array([5.0, 4.0, 0.0, -3.0], np.float32)
  z_a_final = np.array([5.0, 4.0, -6.0, -3.0], np.float32)
  z_e_early = np.array([-3.0, 0.0, 1.0, 6.0], np.float32)
  z_a_early = np.array([0.0, 0.0, 0.0, 0.0], np.float32)
  shape = (1, 1, 4)
  expert = {L: z_e_final.reshape(shape), 2: z_e_early.reshape(shape)}
  amateur = {L: z_a_final.reshape(shape), 2: z_a_early.reshape(shape)}
  lol = config_lib.LolConfig(layers=(2,), weights=(1.0,))
  for post in (False, True):
    cfg = _cfg("lol", lol=lol, relative_top=0.2, post_softmax=post)
    f = np.asarray(contrast.method_logits(cfg, expert, amateur, L))[0, 0]
    lp = _np_lsm(z_e_final)
    want_mask = lp < lp.max() + math.log(0.2)
    np.testing.assert_array_equal(want_mask, [False, False, True, True])
    np.testing.assert_array_equal(f == contrast.MASK_VALUE, want_mask)
    assert f[2] == -1000.0 and f[3] == -1000.0
    assert f.dtype == np.float32
  # Without the mask the contrast would have picked a masked token.
  f_free = np.asarray(
      contrast.method_logits(
          _cfg("lol", lol=lol, relative_top=0.0), expert, amateur, L
      )
  )[0, 0]
  assert f_free.argmax() in (2, 3)


# --------------------------------------------------------------------- DoLa


def test_js_divergence_properties_and_numpy():
  """JS symmetric, 0 on identical, <= log 2 (= log 2 on disjoint support).

  Planted bug caught: KL(p||q) instead of the mixture, or a missing 1/2.
  """
  lp = _np_lsm(_logits(20, (4, V)))
  lq = _np_lsm(_logits(21, (4, V), scale=6.0))
  js_pq = np.asarray(contrast.js_divergence(lp, lq))
  js_qp = np.asarray(contrast.js_divergence(lq, lp))
  np.testing.assert_allclose(js_pq, js_qp, atol=1e-6)
  np.testing.assert_allclose(js_pq, _np_js(lp, lq), atol=1e-5)
  np.testing.assert_allclose(contrast.js_divergence(lp, lp), 0.0, atol=1e-6)
  assert np.all(js_pq <= math.log(2) + 1e-6) and np.all(js_pq > 0)
  with np.errstate(divide="ignore"):
    lp01 = np.log(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
  disjoint = contrast.js_divergence(lp01[0], lp01[1])
  np.testing.assert_allclose(disjoint, math.log(2), atol=1e-6)


def test_dola_select_finds_planted_layer():
  """A layer planted far from the final one is selected at its positions.

  Planted bug caught: argmin instead of argmax, or JS over the wrong axis.
  """
  final = _logits(22)
  near = [final + 0.05 * _logits(23 + n) for n in range(4)]
  far = _logits(30, scale=8.0)
  planted = np.zeros((B, T), np.int64)
  planted[0, 1], planted[1, 3], planted[2, 0] = 2, 1, 3
  stack = np.stack(near)
  for (b, t), n in np.ndenumerate(planted):
    if n:
      stack[n, b, t] = far[b, t]
  lps = _np_lsm(stack).astype(np.float32)
  pick = np.asarray(contrast.dola_select(_np_lsm(final), lps))
  np.testing.assert_array_equal(pick[planted > 0], planted[planted > 0])
  # And through method_logits: F = lp^L - lp^{j*} at every position.
  layers = (1, 2, 3, 4)
  expert = {L: final, **{j: stack[i] for i, j in enumerate(layers)}}
  cfg = _cfg("dola", dola=config_lib.DolaConfig(premature_layers=layers))
  f = np.asarray(contrast.method_logits(cfg, expert, None, L))
  js = np.stack([_np_js(_np_lsm(final), _np_lsm(s)) for s in stack])
  want = (
      _np_lsm(final)
      - np.take_along_axis(_np_lsm(stack), js.argmax(0)[None, ..., None], 0)[0]
  )
  np.testing.assert_allclose(f, want, atol=1e-5)


def test_dola_static_is_final_minus_premature():
  expert = _stream(31)
  cfg = _cfg(
      "dola",
      dola=config_lib.DolaConfig(mode="static", premature_layers=(2,)),
      relative_top=0.1,
  )
  f = np.asarray(contrast.method_logits(cfg, expert, None, L))
  lp = _np_lsm(expert[L])
  want = np.where(
      lp < lp.max(-1, keepdims=True) + math.log(0.1),
      -1000.0,
      lp - _np_lsm(expert[2]),
  )
  np.testing.assert_allclose(f, want, atol=1e-5)


# --------------------------------------------------------------------- SLED


def _np_sled(z_l, z_n, k, rate, tau, eta):
  """Brute-force SLED for one position with explicit p_n - e_i vectors."""
  z_l = z_l.astype(np.float64)
  top = np.argsort(-z_l, kind="stable")[:k]
  cos = np.zeros((len(z_n), k))
  for n, z in enumerate(z_n.astype(np.float64)):
    d = z - z_l
    p = np.exp(z / tau - np.max(z / tau))
    p /= p.sum()
    for c, i in enumerate(top):
      g = p.copy()
      g[i] -= 1.0
      cos[n, c] = d @ g / (np.linalg.norm(d) * np.linalg.norm(g))
  w = np.maximum(cos, 0.0) ** 2
  p_lat = w.sum(0) / w.sum() if w.sum() > 0 else np.zeros(k)
  q = np.exp(z_l / tau - np.max(z_l / tau))
  q /= q.sum()
  out = np.full_like(z_l, eta)
  out[top] = z_l[top] - (rate / tau) * (q[top] - p_lat)
  return top, cos, p_lat, out


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_sled_cosine_latent_and_evolution_match_brute_force(tau):
  """O(V) cosine = explicit cos(d_n, p_n - e_i) within 1e-6; P_lat sums to 1.

  Planted bug caught: dropping the -2 p_i term of ||p - e_i||^2, or the
  <d, p> term, moves the cosine by far more than 1e-6.
  """
  k, rate, eta = 6, 2.5, -1000.0
  z_l = _logits(40, (B, V))
  z_n = _logits(41, (3, B, V))
  # Peaked early layers (p_i ~ 1 - 1e-6 on a top-k token): the naive float32
  # O(V) formula cancels there (measured error 4e-2, or inf at tau 0.7).
  top1 = z_l.argmax(-1)
  for b in range(B):
    z_n[0, b, top1[b]] += 14.0
    z_n[1, b, np.argsort(-z_l[b])[2]] += 10.0
  top, p_lat = contrast.sled_latent(z_l, z_n, k, tau)
  cos = np.asarray(contrast.sled_cosines(z_l, z_n, top, tau))
  evolved = np.asarray(contrast.sled_evolve(z_l, z_n, k, rate, tau, eta))
  for b in range(B):
    want_top, want_cos, want_lat, want_out = _np_sled(
        z_l[b], z_n[:, b], k, rate, tau, eta
    )
    np.testing.assert_array_equal(np.asarray(top)[b], want_top)
    np.testing.assert_allclose(cos[:, b], want_cos, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_lat)[b], want_lat, atol=1e-6)
    np.testing.assert_allclose(evolved[b], want_out, atol=1e-5)
  np.testing.assert_allclose(np.asarray(p_lat).sum(-1), 1.0, atol=1e-6)


def test_sled_tied_mode_and_layer_list_match_brute_force():
  """A tie at the early layers' maximum (two modes) still matches the explicit
  cosine; a list of early layers gives exactly the stacked array's result.

  Planted bug caught: taking every tied maximum out of the re-centred "rest"
  sums (mode by value, not by first index) shifts a cosine by 0.35.
  """
  k = 5
  z_l = _logits(46, (2, T, V))
  z_n = _logits(47, (3, 2, T, V))
  top = np.argsort(-z_l, axis=-1)
  z_n[0, ..., :] = np.where(
      np.isin(np.arange(V), [7, 11]), z_n[0].max(-1, keepdims=True) + 9.0,
      z_n[0],
  )
  np.put_along_axis(z_n[1], top[..., 1:2], z_n[1].max(-1, keepdims=True), -1)
  cos = np.asarray(contrast.sled_cosines(z_l, z_n, top[..., :k], 1.0))
  cos_list = np.asarray(contrast.sled_cosines(z_l, list(z_n), top[..., :k], 1.0))
  np.testing.assert_array_equal(cos_list, cos)
  for b in range(2):
    for t in range(T):
      _, want_cos, _, _ = _np_sled(z_l[b, t], z_n[:, b, t], k, 2.5, 1.0, -1e9)
      np.testing.assert_allclose(cos[:, b, t], want_cos, atol=1e-6)


def test_sled_rate_zero_and_eta():
  """rate 0 leaves the top-k logits unchanged; the rest equal eta exactly."""
  z_l, z_n = _logits(42, (2, T, V)), _logits(43, (4, 2, T, V))
  out = np.asarray(contrast.sled_evolve(z_l, z_n, 5, 0.0, 1.0, -7.5))
  top = np.argsort(-z_l, axis=-1)[..., :5]
  in_top = np.zeros(z_l.shape, bool)
  np.put_along_axis(in_top, top, True, axis=-1)
  np.testing.assert_array_equal(out[in_top], z_l[in_top])
  np.testing.assert_array_equal(out[~in_top], -7.5)


def test_sled_zero_denominator_guard():
  """Early logits equal to the final ones: cosines 0, P_lat 0, no NaN."""
  z_l = _logits(44, (V,))
  _, p_lat = contrast.sled_latent(z_l, np.stack([z_l, z_l]), 4, 1.0)
  np.testing.assert_array_equal(p_lat, 0.0)
  out = np.asarray(contrast.sled_evolve(z_l, z_l[None], 4, 2.5, 1.0, -1e9))
  assert np.isfinite(out).all()


def test_sled_method_uses_mode_eta_then_log_softmax():
  expert = _stream(45)
  cfg = _cfg("sled", sled=config_lib.SledConfig(k=4, layers=(1, 2, 3)))
  f_mc = np.asarray(contrast.method_logits(cfg, expert, None, L, mode="mc"))
  f_gen = np.asarray(contrast.method_logits(cfg, expert, None, L, "gen"))
  for f, eta in ((f_mc, -1000.0), (f_gen, -1e9)):
    _, _, _, evolved = _np_sled(
        expert[L][1, 2],
        np.stack([expert[j][1, 2] for j in (1, 2, 3)]),
        4,
        2.5,
        1.0,
        eta,
    )
    np.testing.assert_allclose(f[1, 2], _np_lsm(evolved), rtol=1e-6, atol=1e-4)
  assert np.argmax(f_gen, -1).tolist() == np.argmax(f_mc, -1).tolist()


# ------------------------------------------------------------------- scoring


def test_score_and_mean_nll_match_numpy():
  """Sum / mean over valid continuation tokens only, any leading dims."""
  f = _np_lsm(_logits(50, (2, B, T, V))).astype(np.float32)
  rng = np.random.default_rng(51)
  targets = rng.integers(0, V, size=(2, B, T))
  valid = rng.random((2, B, T)) < 0.7
  valid[..., 0] = True
  picked = np.take_along_axis(f, targets[..., None], -1)[..., 0]
  want_sum = np.where(valid, picked, 0.0).sum(-1)
  s = np.asarray(contrast.score_continuation(f, targets, valid))
  nll = np.asarray(contrast.mean_nll_continuation(f, targets, valid))
  np.testing.assert_allclose(s, want_sum, atol=1e-5)
  np.testing.assert_allclose(nll, -want_sum / valid.sum(-1), atol=1e-5)
  assert s.shape == nll.shape == (2, B)
