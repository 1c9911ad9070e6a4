"""Dispatcher for attention over own keys plus masked extra keys.

  out_BNC = bank_attention(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC,
                           v_extra_BMC, heads=H, include_self=True,
                           extra_valid=valid_BM)

Implementations, tried in order (default: ("xla",) on every platform):
  "xla":       XLA_IMPL below: the chunked online softmax
               (reference.chunked), every platform and dtype, never
               concatenating own and extra keys;
  "pallas":    the Pallas Triton kernel (pallas_gpu.forward), float32 /
               bfloat16 / float16, head dim <= 256 after padding;
               `interpret=True` runs it on CPU (tests);
  "reference": the dense concatenation and masked softmax (the oracle).
The default is "xla" everywhere, the GPU included, because the Pallas kernel
has not been measured on a GPU yet (it is tested in interpret mode and lowered
to Triton on CPU only); pass implementation=("pallas", "xla") to try it first.

Every implementation shares one VJP (jax.custom_vjp): the backward recomputes
with `reference.dense` (float32, memory O(B H N (S + M))), so jax.grad works
whichever forward ran. `extra_valid` gets no gradient.

Semantics are those of diffusion/attention.py's `attend`, except that a query
with no valid key at all (include_self=False, every extra slot invalid) gets
zeros here instead of NaN.

B: batch, N: queries, S: own keys, M: extra keys, C: width, H: heads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxlib_models.kernels.bank_attention import pallas_gpu, reference

Array = jax.Array
BlockSizes = reference.BlockSizes
PallasBlockSizes = pallas_gpu.BlockSizes
IMPLEMENTATIONS = ("xla", "pallas", "reference")
# What "xla" runs: "chunked" (reference.chunked) or "dot_product_attention"
# (jax.nn.dot_product_attention on the float32 concatenation). On a 2-core CPU
# (float32, B 1, include_self, 80 % valid, another job loading the CPU) the
# chunked scan took 468 ms at N = S = M = 4096, C 320, H 8 vs 1962 ms (4.2x)
# and 92 ms at 1024 tokens, C 640 vs 143 ms (1.6x)
# (benchmarks/bank_attention_speed.py). Unmeasured on a GPU.
XLA_IMPL = "chunked"


def _impl(name: str, *, heads, include_self, block_sizes, interpret):
  kw = dict(heads=heads, include_self=include_self)
  if name == "xla":
    bs = block_sizes if isinstance(block_sizes, reference.BlockSizes) else None
    if XLA_IMPL == "chunked":
      return functools.partial(reference.chunked, block_sizes=bs, **kw)
    return functools.partial(reference.dot_product_attention, **kw)
  if name == "reference":
    return functools.partial(reference.dense, **kw)
  if name == "pallas":
    pbs = (block_sizes if isinstance(block_sizes, pallas_gpu.BlockSizes)
           else None)
    return functools.partial(pallas_gpu.forward, block_sizes=pbs,
                             interpret=interpret, **kw)
  raise ValueError(f"unknown implementation {name!r}; use one of "
                   f"{IMPLEMENTATIONS}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _op(q, ks, vs, ke, ve, valid, fwd, cfg):
  del cfg
  return fwd(q, ks, vs, ke, ve, extra_valid=valid)


def _op_fwd(q, ks, vs, ke, ve, valid, fwd, cfg):
  del cfg
  return fwd(q, ks, vs, ke, ve, extra_valid=valid), (q, ks, vs, ke, ve, valid)


def _op_bwd(fwd, cfg, res, g):
  del fwd
  heads, include_self = cfg
  q, ks, vs, ke, ve, valid = res

  def ref(q, ks, vs, ke, ve):
    return reference.dense(q, ks, vs, ke, ve, heads=heads,
                           include_self=include_self, extra_valid=valid)

  _, vjp = jax.vjp(ref, q, ks, vs, ke, ve)
  return (*vjp(g.astype(q.dtype)), None)


_op.defvjp(_op_fwd, _op_bwd)


def validate(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None,
             v_extra_BMC=None, *, heads: int, include_self: bool = True,
             extra_valid=None) -> None:
  """ValueError naming the offending shapes for inputs that do not fit."""
  if jnp.ndim(q_BNC) != 3:
    raise ValueError(f"queries must be (B, N, C), got shape "
                     f"{jnp.shape(q_BNC)}")
  b, n, c = q_BNC.shape
  if not isinstance(heads, int) or heads < 1 or c % heads:
    raise ValueError(f"width C={c} of queries {q_BNC.shape} is not a "
                     f"multiple of heads={heads}")
  if n == 0:
    raise ValueError(f"no queries: shape {q_BNC.shape}")

  def check(name, k, v, what):
    ks, vs = jnp.shape(k), jnp.shape(v) if v is not None else None
    if (len(ks) != 3 or vs != ks or ks[0] != b or ks[2] != c):
      raise ValueError(f"{name} keys {ks} / values {vs} do not fit queries "
                       f"{q_BNC.shape}: want (B={b}, {what}, C={c}) for both")
    if ks[1] == 0:
      raise ValueError(f"{name} keys {ks} are empty; mask slots with "
                       "extra_valid instead of passing zero tokens")

  if include_self:
    if k_self_BSC is None or v_self_BSC is None:
      raise ValueError("include_self=True needs k_self and v_self")
    check("own", k_self_BSC, v_self_BSC, "S")
  if k_extra_BMC is None:
    if v_extra_BMC is not None:
      raise ValueError("v_extra given without k_extra")
    if extra_valid is not None:
      raise ValueError("extra_valid given without extra keys")
    if not include_self:
      raise ValueError("include_self=False without extra keys: nothing to "
                       "attend to")
    return
  check("extra", k_extra_BMC, v_extra_BMC, "M")
  m = k_extra_BMC.shape[1]
  if extra_valid is not None and jnp.shape(extra_valid) not in ((b, m), (m,)):
    raise ValueError(f"extra_valid shape {jnp.shape(extra_valid)} does not "
                     f"fit extra keys {k_extra_BMC.shape}: want (B={b}, "
                     f"M={m}) or (M={m},)")


def bank_attention(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC=None,
                   v_extra_BMC=None, *, heads: int, include_self: bool = True,
                   extra_valid=None,
                   implementation: str | Sequence[str] = ("xla",),
                   interpret: bool = False, block_sizes=None) -> Array:
  """Multi-head attention over [own; valid extra] keys and values.

  Args:
    q_BNC: (B, N, C) projected queries.
    k_self_BSC, v_self_BSC: (B, S, C) own keys and values (S may differ from
      N); ignored (may be None) when include_self is False.
    k_extra_BMC, v_extra_BMC: (B, M, C) extra keys and values, or None.
    heads: H, with C = H K; logits are scaled by 1 / sqrt(K).
    include_self: attend over the own keys too.
    extra_valid: (B, M) or (M,) bool; False slots are ignored. None: all
      valid.
    implementation: a name or an ordered sequence of names (module
      docstring); a NotImplementedError moves on to the next one.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    block_sizes: `BlockSizes` (xla) or `PallasBlockSizes` (pallas).

  Returns:
    (B, N, C) in q's dtype; logits and softmax in float32.
  """
  validate(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC, v_extra_BMC,
           heads=heads, include_self=include_self, extra_valid=extra_valid)
  if not include_self:
    k_self_BSC = v_self_BSC = None
  if extra_valid is not None:
    extra_valid = jnp.asarray(extra_valid).astype(bool)
  order = ((implementation,) if isinstance(implementation, str)
           else tuple(implementation))
  if not order:
    raise ValueError("implementation is empty")
  fwds = [_impl(name, heads=heads, include_self=include_self,
                block_sizes=block_sizes, interpret=interpret)
          for name in order]  # Unknown names fail before anything runs.
  errors = []
  for fwd in fwds:
    try:
      return _op(q_BNC, k_self_BSC, v_self_BSC, k_extra_BMC, v_extra_BMC,
                 extra_valid, fwd, (heads, include_self))
    except NotImplementedError as e:
      errors.append(e)
  raise ExceptionGroup(f"every implementation in {order} refused the inputs",
                       errors)
