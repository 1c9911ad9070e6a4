"""Contrastive next-token scores: base, ICD, LOL, DoLa, CD and SLED.

One scoring primitive for every method (brief §2.2): per-layer contrasts of
log-probs, fusion, optional renormalisation, then a plausibility mask taken
from the expert's final layer. Pure functions, float32, jit-friendly; every
array may carry leading batch dims, written "...".

Shape letters: N: stacked early exits, T: positions, V: vocabulary, K: SLED's
top-k set. Layer keys are exit indices j (0 = embeddings, j = output of block
j, L = the ordinary final output).

Sources (read for behaviour, not copied): ICD (arXiv 2312.15710,
HillZhang1999/ICD), DoLa (arXiv 2309.03883, voidism/DoLa), CD (arXiv
2210.15097; O'Brien & Lewis 2023), SLED (arXiv 2411.02433, JayZhang42/SLED),
LOL (arXiv 2408.08769, no code; composition per brief §2.4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jaxlib_models.decoding import config as config_lib

# Written into masked entries: a constant, not -inf, as in ICD/DoLa [code].
MASK_VALUE = -1000.0


def log_softmax32(logits: jax.typing.ArrayLike) -> jax.Array:
  """log_softmax over the last (vocabulary) axis, in float32."""
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def plausibility_mask(
    expert_final_logprobs: jax.typing.ArrayLike, alpha: float
) -> jax.Array:
  """Tokens outside the adaptive plausibility set (True = masked).

  Li et al. 2023 (arXiv 2210.15097) Eq. 3 / DoLa `relative_top`: mask v where
  lp[v] < max lp + log(alpha). alpha = 0 masks nothing (log 0 guarded).

  Args:
    expert_final_logprobs: (..., V) log-probs of the expert's final layer.
    alpha: relative_top in [0, 1], a Python float.

  Returns:
    (..., V) bool mask.
  """
  lp_V = jnp.asarray(expert_final_logprobs, jnp.float32)
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{alpha=} must lie in [0, 1]")
  if alpha == 0.0:
    return jnp.zeros(lp_V.shape, bool)
  threshold = jnp.max(lp_V, axis=-1, keepdims=True) + math.log(alpha)
  return lp_V < threshold


def js_divergence(
    logp: jax.typing.ArrayLike, logq: jax.typing.ArrayLike
) -> jax.Array:
  """Jensen-Shannon divergence from log-probs, in nats, over the last axis.

  JS(p||q) = KL(p||m)/2 + KL(q||m)/2 with m = (p + q)/2, computed with
  log m = logaddexp(log p, log q) - log 2 (no division of small numbers);
  zero-probability terms contribute 0. DoLa Eq. 4 (arXiv 2309.03883).

  Args:
    logp: (..., V) log-probs.
    logq: (..., V) log-probs, broadcastable against logp.

  Returns:
    (...) divergences in [0, log 2].
  """
  logp = jnp.asarray(logp, jnp.float32)
  logq = jnp.asarray(logq, jnp.float32)
  logm = jnp.logaddexp(logp, logq) - math.log(2.0)

  def kl_to_m(loga):
    a = jnp.exp(loga)
    return jnp.sum(jnp.where(a > 0, a * (loga - logm), 0.0), axis=-1)

  return 0.5 * kl_to_m(logp) + 0.5 * kl_to_m(logq)


def dola_select(
    final_lp: jax.typing.ArrayLike, premature_lps: jax.typing.ArrayLike
) -> jax.Array:
  """Per position, the premature layer most divergent from the final one.

  DoLa dynamic selection (arXiv 2309.03883, Eq. 3): argmax_j JS(q_L || q_j).
  Ties go to the first candidate.

  Args:
    final_lp: (..., T, V) final-layer log-probs.
    premature_lps: (N, ..., T, V) candidate log-probs.

  Returns:
    (..., T) int32 index into the N axis (not the layer number).
  """
  final_lp = jnp.asarray(final_lp, jnp.float32)
  premature_lps = jnp.asarray(premature_lps, jnp.float32)
  if premature_lps.shape[1:] != final_lp.shape:
    raise ValueError(f"{premature_lps.shape=} vs {final_lp.shape=}")
  js_N = js_divergence(final_lp[None], premature_lps)
  return jnp.argmax(js_N, axis=0).astype(jnp.int32)


def _take_layer(stack_N: jax.Array, index: jax.Array) -> jax.Array:
  """stack_N[index[...], ..., :] per position: (N, ..., V), (...) -> (..., V)."""
  return jnp.take_along_axis(stack_N, index[None, ..., None], axis=0)[0]


# Rows per block of sled_cosines' row loop: a few rows keep each block's
# (rows, V) temporaries in cache (measured on 2 CPU cores, V = 49152: 4 rows
# 0.37 s, 8 rows 0.40 s, 128 rows 1.2 s for 29 layers x 128 positions).
_SLED_ROW_BLOCK = 4


def _sled_layer_cosines(
    z_V: jax.Array, zn_V: jax.Array, top_K: jax.Array, tau: float
) -> jax.Array:
  """sled_cosines for one early layer: (..., V), (..., V), (..., K) -> (..., K).

  Per row: the mode m of p_n (the first index of max z_n / tau, as argmax),
  e = exp(z_n / tau - max) once, then the plain sums sum_{v != m} e_v,
  sum_{v != m} e_v^2, sum_{v != m} (d_v - d_m) e_v and ||d||^2, with
  p_n = e / s and s = 1 + sum_{v != m} e_v (e_m = 1 exactly). The top-k
  entries are gathered from the logits. Written for XLA CPU: separate
  single-operand sums (a variadic reduce or jnp.argmax take the slow
  scalar loop emitter, ~10x slower).
  """
  n_v = zn_V.shape[-1]
  y_V = zn_V / tau
  y_mode = jnp.max(y_V, axis=-1, keepdims=True)
  # First index of the maximum (= jnp.argmax); float iota is exact (V < 2^24).
  first = jnp.where(y_V == y_mode, jnp.arange(n_v, dtype=jnp.float32), n_v)
  mode = jnp.minimum(jnp.min(first, axis=-1, keepdims=True), n_v - 1)
  mode = mode.astype(jnp.int32)
  d_mode = jnp.take_along_axis(zn_V, mode, axis=-1) - jnp.take_along_axis(
      z_V, mode, axis=-1
  )
  is_mode_V = jnp.arange(n_v) == mode
  e_V = jnp.exp(y_V - y_mode)
  e_rest_V = jnp.where(is_mode_V, 0.0, e_V)
  d_V = zn_V - z_V
  rest_e = jnp.sum(e_rest_V, axis=-1, keepdims=True)
  rest_sq_e = jnp.sum(e_rest_V * e_rest_V, axis=-1, keepdims=True)
  # The mode's term is 0; the where also keeps XLA off a slow dot pattern.
  dp_e = jnp.sum(
      jnp.where(is_mode_V, 0.0, (d_V - d_mode) * e_V), axis=-1, keepdims=True
  )
  dnorm = jnp.sqrt(jnp.sum(d_V * d_V, axis=-1, keepdims=True))
  s = 1.0 + rest_e
  p_mode = 1.0 / s
  rest_mass = rest_e / s
  rest_sq = rest_sq_e / (s * s)
  dp = dp_e / s

  zn_K = jnp.take_along_axis(zn_V, top_K, axis=-1)
  d_K = zn_K - jnp.take_along_axis(z_V, top_K, axis=-1)
  p_K = jnp.exp(zn_K / tau - y_mode) / s
  at_mode_K = top_K == mode
  num_K = dp - (d_K - d_mode)
  other_sq_K = jnp.where(
      at_mode_K, rest_sq, rest_sq + (p_mode - p_K) * (p_mode + p_K)
  )
  gap_K = jnp.where(at_mode_K, rest_mass, 1.0 - p_K)
  den_K = dnorm * jnp.sqrt(jnp.maximum(other_sq_K, 0.0) + gap_K**2)
  ok = den_K > 0
  return jnp.where(ok, num_K / jnp.where(ok, den_K, 1.0), 0.0)


def _early_list(early_logits) -> list[jax.Array]:
  """The early exits as a list of float32 (..., V) arrays.

  Accepts an (N, ..., V) array or a sequence of N (..., V) arrays; the
  latter lets callers skip stacking N full-vocabulary arrays.
  """
  if isinstance(early_logits, (list, tuple)):
    return [jnp.asarray(z, jnp.float32) for z in early_logits]
  z_NV = jnp.asarray(early_logits, jnp.float32)
  return [z_NV[n] for n in range(z_NV.shape[0])]


def sled_cosines(
    final_logits: jax.typing.ArrayLike,
    early_logits: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
    top_index: jax.typing.ArrayLike,
    tau: float,
) -> jax.Array:
  """cos(d_n, p_n - e_i) for i in the top-k set, in O(V) per layer.

  SLED (arXiv 2411.02433) step 2, brief §2.5: d_n = z_n - z_L,
  p_n = softmax(z_n / tau), c = (<d_n, p_n> - d_{n,i}) /
  (||d_n|| sqrt(||p_n||^2 - 2 p_{n,i} + 1)), never forming p_n - e_i.

  Float32 loses the answer to cancellation when p_n is peaked on i (both
  <d, p> - d_i and ||p - e_i|| are then tiny differences of O(1) numbers),
  so both are re-centred on the mode m of p_n, exactly (sum_v p_v = 1):
  <d, p> - d_i = <d - d_m, p> - (d_i - d_m), and
  ||p - e_i||^2 = R + p_m^2 - p_i^2 + (1 - p_i)^2 with R = sum_{v != m} p_v^2,
  which for i = m is R + (sum_{v != m} p_v)^2. A zero denominator
  (z_n = z_L) gives cosine 0. Computed per block of rows
  (_SLED_ROW_BLOCK) and layer by _sled_layer_cosines; no (N, ..., V) array
  is formed.

  Args:
    final_logits: (..., V) z_L.
    early_logits: (N, ..., V) z_n, or a sequence of N (..., V) arrays.
    top_index: (..., K) vocabulary indices I.
    tau: Temperature.

  Returns:
    (N, ..., K) cosines.
  """
  z_V = jnp.asarray(final_logits, jnp.float32)
  zs = _early_list(early_logits)
  top_K = jnp.asarray(top_index)
  if (
      not zs
      or any(z.shape != z_V.shape for z in zs)
      or top_K.shape[:-1] != z_V.shape[:-1]
  ):
    raise ValueError(
        f"{z_V.shape=} early shapes {[z.shape for z in zs]} {top_K.shape=}"
    )
  # Row blocks: each block's (rows, V) temporaries stay in cache and XLA
  # never materialises (..., V) intermediates of the whole batch.
  lead, n_v, k = z_V.shape[:-1], z_V.shape[-1], top_K.shape[-1]
  rows = math.prod(lead)

  def one_row(xs):
    z_row, top_row, *zs_row = xs
    return jnp.stack(
        [_sled_layer_cosines(z_row, zn, top_row, tau) for zn in zs_row]
    )

  cos_RNK = jax.lax.map(
      one_row,
      (
          z_V.reshape(rows, n_v),
          top_K.reshape(rows, k),
          *(z.reshape(rows, n_v) for z in zs),
      ),
      batch_size=_SLED_ROW_BLOCK,
  )
  return jnp.moveaxis(cos_RNK, 1, 0).reshape((len(zs), *lead, k))


def sled_latent(
    final_logits: jax.typing.ArrayLike,
    early_logits: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
    k: int,
    tau: float,
) -> tuple[jax.Array, jax.Array]:
  """SLED's top-k set and latent distribution P_lat (brief §2.5 steps 1-3).

  w_{n,i} = max(c_{n,i}, 0)^2, P_lat,i = sum_n w_{n,i} / sum_{n,i'} w_{n,i'};
  P_lat = 0 where every weight is 0.

  Args:
    final_logits: (..., V) z_L.
    early_logits: (N, ..., V) z_n, or a sequence of N (..., V) arrays.
    k: Size of the top-k set (clipped to V).
    tau: Temperature.

  Returns:
    top_index (..., K) int32 and p_lat (..., K) float32.
  """
  z_V = jnp.asarray(final_logits, jnp.float32)
  k = min(int(k), z_V.shape[-1])
  _, top_K = jax.lax.top_k(z_V, k)
  cos_NK = sled_cosines(z_V, early_logits, top_K, tau)
  w_K = jnp.sum(jnp.square(jnp.maximum(cos_NK, 0.0)), axis=0)
  total = jnp.sum(w_K, axis=-1, keepdims=True)
  p_lat_K = jnp.where(total > 0, w_K / jnp.where(total > 0, total, 1.0), 0.0)
  return top_K.astype(jnp.int32), p_lat_K


def sled_evolve(
    final_logits: jax.typing.ArrayLike,
    early_logits: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
    k: int,
    rate: float,
    tau: float,
    eta: float,
) -> jax.Array:
  """SLED self-evolved logits (arXiv 2411.02433; brief §2.5 step 4).

  z'_i = z_{L,i} - (rate/tau) (softmax(z_L/tau)_i - P_lat,i) for i in the
  top-k set I; z'_v = eta elsewhere.

  Args:
    final_logits: (..., V) z_L.
    early_logits: (N, ..., V) z_n, or a sequence of N (..., V) arrays.
    k: evolution_scale (clipped to V).
    rate: evolution_rate.
    tau: Temperature.
    eta: Logit for tokens outside I.

  Returns:
    (..., V) evolved logits, float32.
  """
  z_V = jnp.asarray(final_logits, jnp.float32)
  top_K, p_lat_K = sled_latent(z_V, early_logits, k, tau)
  # softmax(z_L / tau) at I only: one max and one sum of exp over V.
  y_V = z_V / tau
  y_max = jnp.max(y_V, axis=-1, keepdims=True)
  y_sum = jnp.sum(jnp.exp(y_V - y_max), axis=-1, keepdims=True)
  z_K = jnp.take_along_axis(z_V, top_K, axis=-1)
  q_K = jnp.exp(z_K / tau - y_max) / y_sum
  new_K = z_K - (rate / tau) * (q_K - p_lat_K)
  flat_BV = jnp.full((math.prod(z_V.shape[:-1]), z_V.shape[-1]), eta, z_V.dtype)
  flat_BV = jax.vmap(lambda row, i, v: row.at[i].set(v))(
      flat_BV,
      top_K.reshape(-1, top_K.shape[-1]),
      new_K.reshape(-1, new_K.shape[-1]),
  )
  return flat_BV.reshape(z_V.shape)


def _stack(lps: Mapping[int, jax.Array], layers: Sequence[int]) -> jax.Array:
  return jnp.stack([lps[j] for j in layers], axis=0)


def method_logits(
    cfg: config_lib.DecodingConfig,
    expert: Mapping[int, jax.typing.ArrayLike],
    amateur: Mapping[int, jax.typing.ArrayLike] | None,
    num_layers: int,
    mode: Literal["mc", "gen"] = "mc",
    *,
    tied: bool | None = None,
    amateur_num_layers: int | None = None,
) -> jax.Array:
  """The fused, renormalised and masked score F of brief §2.2, any method.

  Steps: (1) per-layer contrasts C^j = lp_E^j - lp_A^j; (2) fusion
  F = C^L + sum_l lambda_l C^l; (3) F <- log_softmax(F) if post_softmax;
  (4) F[v] = MASK_VALUE where the expert's final log-prob is below
  max + log(relative_top). Special cases: base F = lp_E^L; ICD / CD-li
  F = lp_E^L - lp_A^L; LOL static or js_max fusion (JS on the expert stream,
  same index for the amateur); DoLa F = lp^L - lp^j (static) or lp^L -
  lp^{j*(t)} (dynamic); SLED log_softmax(evolved logits); CD-obrien
  (1 + beta) z_E^L - beta z_A^L in raw-logit space.

  Use under jit with cfg, num_layers, mode and tied static (the configs are
  frozen and hashable).

  Args:
    cfg: Decoding configuration.
    expert: {exit j: (..., T, V) raw logits} of the expert stream; must hold
      cfg.exit_layers(num_layers, tied).
    amateur: Same for the amateur stream (rows aligned to the same
      continuation tokens), or None for single-stream methods.
    num_layers: L; the key of the final output.
    mode: "mc" (scoring; SLED eta_mc) or "gen" (generation; SLED eta_gen).
    tied: Tied embeddings; needed only when cfg leaves a layer choice to the
      DoLa buckets or SLED's default (cfg.needs_tied).
    amateur_num_layers: Key of the amateur's final output when it is a model
      of another depth (CD's smaller model); None = num_layers. LOL needs an
      amateur of the same depth (its lower exits share the expert's index).

  Returns:
    (..., T, V) float32 scores; masked entries equal MASK_VALUE.
  """
  if mode not in ("mc", "gen"):
    raise ValueError(f"{mode=} must be 'mc' or 'gen'")
  if tied is None:
    if cfg.needs_tied:
      raise ValueError(
          "cfg leaves the layers to a tied-dependent default: pass tied= or"
          " use cfg.resolved(num_layers, tied)"
      )
    tied = False
  L = num_layers
  layers = cfg.exit_layers(L, tied)
  _check_stream("expert", expert, layers)
  if cfg.needs_amateur:
    if amateur is None:
      raise ValueError(f"method {cfg.method!r} needs amateur logits")
    a_final = L if amateur_num_layers is None else amateur_num_layers
    if a_final != L:
      if cfg.method == "lol":
        raise ValueError(
            f"LOL needs an amateur with {L} layers, got {amateur_num_layers}"
        )
      _check_stream("amateur", amateur, (a_final,))
      amateur = {L: amateur[a_final]}
    _check_stream("amateur", amateur, layers)
  shape = jnp.shape(expert[L])
  for name, stream in (("expert", expert), ("amateur", amateur or {})):
    for j in layers:
      if j in stream and jnp.shape(stream[j]) != shape:
        raise ValueError(f"{name}[{j}] has shape {jnp.shape(stream[j])}")

  # SLED reads only the final log-probs (for the mask); skip the early
  # exits' full-vocabulary log_softmax outside jit too.
  lp_layers = (L,) if cfg.method == "sled" else layers
  lp_e = {j: log_softmax32(expert[j]) for j in lp_layers}
  lp_a = (
      {j: log_softmax32(amateur[j]) for j in layers}
      if cfg.needs_amateur
      else {}
  )

  method = cfg.method
  if method == "base":
    f_TV = lp_e[L]
  elif method == "icd" or (method == "cd" and cfg.cd.form == "li"):
    f_TV = lp_e[L] - lp_a[L]
  elif method == "cd":
    beta = cfg.cd.beta
    f_TV = (1.0 + beta) * jnp.asarray(expert[L], jnp.float32) - beta * (
        jnp.asarray(amateur[L], jnp.float32)
    )
  elif method == "lol":
    f_TV = lp_e[L] - lp_a[L]
    if cfg.lol.layer_select == "static":
      lol_layers = cfg.lol.static_layers(L)
      for j, w in zip(lol_layers, cfg.lol.static_weights(L)):
        f_TV = f_TV + w * (lp_e[j] - lp_a[j])
    else:
      cands = cfg.lol.candidates(L, tied)
      e_NTV, a_NTV = _stack(lp_e, cands), _stack(lp_a, cands)
      pick_T = dola_select(lp_e[L], e_NTV)
      f_TV = f_TV + cfg.lol.weights[0] * _take_layer(e_NTV - a_NTV, pick_T)
  elif method == "dola":
    premature = cfg.dola.premature(L, tied)
    if cfg.dola.mode == "static":
      f_TV = lp_e[L] - lp_e[premature[0]]
    else:
      e_NTV = _stack(lp_e, premature)
      pick_T = dola_select(lp_e[L], e_NTV)
      f_TV = lp_e[L] - _take_layer(e_NTV, pick_T)
  elif method == "sled":
    s = cfg.sled
    early = s.early_layers(L, tied)
    # A list, not a stack: no (N, ..., T, V) copy of the early exits.
    z_early = [expert[j] for j in early]
    eta = s.eta_mc if mode == "mc" else s.eta_gen
    evolved = sled_evolve(expert[L], z_early, s.k, s.rate, s.tau, eta)
    f_TV = log_softmax32(evolved)
  else:
    raise ValueError(f"unknown method {method!r}")

  if cfg.post_softmax:
    f_TV = log_softmax32(f_TV)
  mask_TV = plausibility_mask(lp_e[L], cfg.relative_top)
  return jnp.where(mask_TV, jnp.float32(MASK_VALUE), f_TV)


def _check_stream(name, stream, layers):
  missing = [j for j in layers if j not in stream]
  if missing:
    raise KeyError(f"{name} logits lack exits {missing}; need {layers}")


def _gather_targets(f_TV, targets, valid):
  f_TV = jnp.asarray(f_TV, jnp.float32)
  targets = jnp.asarray(targets)
  valid = jnp.asarray(valid, bool)
  if targets.shape != f_TV.shape[:-1] or valid.shape != targets.shape:
    raise ValueError(f"{f_TV.shape=} {targets.shape=} {valid.shape=}")
  picked_T = jnp.take_along_axis(f_TV, targets[..., None], axis=-1)[..., 0]
  return jnp.where(valid, picked_T, 0.0), valid


def score_continuation(
    f_TV: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    valid: jax.typing.ArrayLike,
) -> jax.Array:
  """score(C | P) = sum_t F[t, c_t] over valid positions (brief §2.2 step 5).

  Args:
    f_TV: (..., T, V) method scores (rows predicting the continuation).
    targets: (..., T) int continuation token ids (any value where invalid).
    valid: (..., T) bool, True on continuation positions.

  Returns:
    (...) float32 summed scores.
  """
  picked_T, _ = _gather_targets(f_TV, targets, valid)
  return jnp.sum(picked_T, axis=-1)


def mean_nll_continuation(
    f_TV: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    valid: jax.typing.ArrayLike,
) -> jax.Array:
  """Mean NLL per continuation token, -mean_t F[t, c_t] (FACTOR official).

  AI21Labs/factor `eval_factuality.py` scores options by mean NLL; lower is
  better. An empty continuation scores 0.

  Args:
    f_TV: (..., T, V) method scores.
    targets: (..., T) int continuation token ids.
    valid: (..., T) bool, True on continuation positions.

  Returns:
    (...) float32 mean NLL.
  """
  picked_T, valid = _gather_targets(f_TV, targets, valid)
  count = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)
  return -jnp.sum(picked_T, axis=-1) / count
