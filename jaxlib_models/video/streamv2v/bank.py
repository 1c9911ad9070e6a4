"""StreamV2V feature bank: dynamic merging (DyMe) and the per-layer update.

The bank is an explicit pytree nested like the UNet's module tree; each
self-attention layer holds `{"k", "v", "o"}`, each (B, M, C) with B the
stream-batch slots and M = max_frames * N tokens (N: the layer's tokens of
one frame). Shapes never change, so one compiled step serves any video length
and memory is constant (brief §2.3 (c)).

Update at a bank step (every `interval` UNet calls):

- merge on (default): X = [bank; current] has M + N tokens; a random
  bipartite split per batch element takes N of them as sources A, the rest as
  destinations D; each source goes to its most similar destination by cosine of
  the L2-normalised keys, and D_new[d] = (D[d] + sum of its sources) / (1 +
  their count). K, V and O share one assignment. Result: M tokens.
- merge off: FIFO of the last `max_frames` raw frames.

Seeding (the first call): the bank is the current frame tiled `max_frames`
times. Attention over duplicated keys/values equals attention over one copy,
so a seeded bank behaves exactly like "only this frame" without masks.

The random split takes `fold_in(fold_in(key, frame_id), layer_index)`, so a run
is reproducible for a given key (the reference's split is unseeded).
"""

import jax
import jax.numpy as jnp

Array = jax.Array
FIELDS = ("k", "v", "o")


def merge_assigned(dst: Array, src: Array, assign: Array) -> Array:
  """D_new[d] = (D[d] + sum_{a: assign[a] = d} S[a]) / (1 + count[d]).

  Args:
    dst: (T_d, C) destination tokens.
    src: (T_s, C) source tokens.
    assign: (T_s,) int destination index of each source.
  """
  n = dst.shape[0]
  f = jnp.float32
  sums = jax.ops.segment_sum(src.astype(f), assign, num_segments=n)
  counts = jax.ops.segment_sum(jnp.ones(src.shape[0], f), assign,
                               num_segments=n)
  return ((dst.astype(f) + sums) / (1.0 + counts)[:, None]).astype(dst.dtype)


def bipartite_assign(metric: Array, key: Array, r: int
                     ) -> tuple[Array, Array, Array]:
  """Random bipartite split of T tokens and each source's destination.

  Args:
    metric: (T, C) similarity features (keys), any scale.
    key: PRNG key of this batch element.
    r: number of sources (merged away).

  Returns:
    (src_idx (r,), dst_idx (T - r,), assign (r,) into dst_idx).
  """
  t = metric.shape[0]
  if not 0 < r < t:
    raise ValueError(f"merging {r} of {t} tokens: need 0 < r < {t}")
  m = metric.astype(jnp.float32)
  m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
  perm = jax.random.permutation(key, t)
  src, dst = perm[:r], perm[r:]
  sim = m[src] @ m[dst].T
  return src, dst, jnp.argmax(sim, axis=-1)


def merge_layer(bank: dict, cur: dict, key: Array) -> dict:
  """DyMe for one layer: [bank; cur] (M + N tokens) merged back to M."""
  n = cur["k"].shape[1]
  x = {f: jnp.concatenate([bank[f], cur[f].astype(bank[f].dtype)], axis=1)
       for f in FIELDS}
  keys = jax.random.split(key, x["k"].shape[0])

  def one(xk, xv, xo, kb):
    src, dst, assign = bipartite_assign(xk, kb, n)
    return tuple(merge_assigned(a[dst], a[src], assign)
                 for a in (xk, xv, xo))

  k, v, o = jax.vmap(one)(x["k"], x["v"], x["o"], keys)
  return {"k": k, "v": v, "o": o}


def fifo_layer(bank: dict, cur: dict) -> dict:
  """Drops the oldest frame and appends the current one."""
  n = cur["k"].shape[1]
  return {f: jnp.concatenate([bank[f][:, n:], cur[f].astype(bank[f].dtype)],
                             axis=1) for f in FIELDS}


def _layers(tree, prefix=()):
  """(path, leaf dict) for every dict that holds k/v/o, in a fixed order."""
  if isinstance(tree, dict) and set(FIELDS) <= set(tree):
    yield prefix, tree
    return
  for name in sorted(tree):
    yield from _layers(tree[name], prefix + (name,))


def _rebuild(pairs) -> dict:
  out: dict = {}
  for path, leaf in pairs:
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf
  return out


def seed_bank(capture: dict, max_frames: int, dtype=None) -> dict:
  """A bank holding the captured frame `max_frames` times (see module doc)."""
  pairs = []
  for path, layer in _layers(capture):
    pairs.append((path, {
        f: jnp.tile(layer[f] if dtype is None else layer[f].astype(dtype),
                    (1, max_frames, 1)) for f in FIELDS}))
  return _rebuild(pairs)


def update_bank(bank: dict, capture: dict, key: Array, *, merge: bool
                ) -> dict:
  """Every layer updated with this call's captured k/v/o."""
  pairs = []
  cur_layers = dict(_layers(capture))
  for i, (path, layer) in enumerate(_layers(bank)):
    if path not in cur_layers:
      raise ValueError(f"the UNet captured no k/v/o for bank layer"
                       f" {'/'.join(path)}")
    cur = cur_layers[path]
    if merge:
      pairs.append((path, merge_layer(layer, cur, jax.random.fold_in(key, i))))
    else:
      pairs.append((path, fifo_layer(layer, cur)))
  return _rebuild(pairs)


def bank_as_extra(bank: dict) -> dict:
  """The `attn_extra` collection for the UNet (k, v, o per layer)."""
  return bank


def bank_bytes(bank: dict) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bank))


def layer_count(bank: dict) -> int:
  return sum(1 for _ in _layers(bank))
