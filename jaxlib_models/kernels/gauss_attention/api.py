"""Dispatcher for the Gaussian-kernel attention (mean and log-sum-exp).

  mean_MD, lse_M = gauss_attention(x_MD, X_ND, t)

Implementations, tried in order (default: xla; pass
`implementation=("pallas", "xla")` to try the Pallas kernel first):
  "xla":    the chunked online-softmax scan (reference.chunked_forward),
            every platform and dtype, memory independent of N;
  "pallas": the Pallas GPU kernel (pallas_gpu.forward), float32, D <= 16;
            `interpret=True` runs it on CPU (tests);
  "dense":  the full (M, N) matrix (oracle only).
The default is xla on every platform because it is the faster one measured:
on an H100 (2026-11-26, d = 2, m = 1000, float32) the Pallas kernel took
7.8 ms at n = 1e5 and 77 ms at n = 1e6, the XLA scan 2.2 and 21.6 ms
(benchmarks/RESULTS.md, row 7). The kernel stays as an opt-in and a base.
Every implementation shares one closed-form VJP (reference.chunked_backward),
so gradients in x, X and t exist whichever forward ran.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxlib_models.kernels.gauss_attention import pallas_gpu, reference

BlockSizes = reference.BlockSizes
PallasBlockSizes = pallas_gpu.BlockSizes


def _impl(name: str, block_sizes, distance: str, interpret: bool):
  if name == "xla":
    return functools.partial(reference.chunked_forward,
                             block_sizes=block_sizes, distance=distance)
  if name == "dense":
    return functools.partial(reference.dense, distance=distance if
                             distance != "auto" else "direct")
  if name == "pallas":
    if distance == "expanded":
      raise NotImplementedError("pallas computes direct differences only")
    pbs = block_sizes if isinstance(block_sizes, pallas_gpu.BlockSizes) else None
    return functools.partial(pallas_gpu.forward, block_sizes=pbs,
                             interpret=interpret)
  raise ValueError(f"unknown implementation {name!r}; use 'pallas', 'xla' or "
                   "'dense'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _op(x_MD, X_ND, t, fwd, bwd_kw):
  return fwd(x_MD, X_ND, t)


def _op_fwd(x_MD, X_ND, t, fwd, bwd_kw):
  mean_MD, lse_M = fwd(x_MD, X_ND, t)
  return (mean_MD, lse_M), (x_MD, X_ND, t, mean_MD, lse_M)


def _op_bwd(fwd, bwd_kw, res, g):
  x_MD, X_ND, t, mean_MD, lse_M = res
  gm_MD, gl_M = g
  dx, dX, dt = reference.chunked_backward(
      x_MD, X_ND, t, mean_MD, lse_M, gm_MD.astype(x_MD.dtype),
      gl_M.astype(x_MD.dtype), **dict(bwd_kw))
  return dx, dX, jnp.asarray(dt, jnp.result_type(t)).reshape(jnp.shape(t))


_op.defvjp(_op_fwd, _op_bwd)


def validate(x_MD, X_ND, t) -> None:
  """Clear errors for bad shapes, empty data and (when concrete) bad t."""
  if jnp.ndim(x_MD) != 2 or jnp.ndim(X_ND) != 2:
    raise ValueError(f"queries and data must be 2-D (M, D) and (N, D); got "
                     f"shapes {jnp.shape(x_MD)} and {jnp.shape(X_ND)}")
  if x_MD.shape[1] != X_ND.shape[1]:
    raise ValueError(f"dimension mismatch: queries have D={x_MD.shape[1]} "
                     f"but data have D={X_ND.shape[1]}")
  if X_ND.shape[0] == 0:
    raise ValueError("empty data: N = 0 points; the score needs at least one")
  if jnp.ndim(t) != 0:
    raise ValueError(f"t must be a scalar, got shape {jnp.shape(t)}")
  if not isinstance(t, jax.core.Tracer):
    tv = float(t)
    if not tv > 0:  # Also catches NaN.
      raise ValueError(f"t must be > 0 (the noise variance), got {tv}")


def gauss_attention(x_MD, X_ND, t, *,
                    implementation: str | Sequence[str] | None = None,
                    block_sizes=None, distance: str = "auto",
                    interpret: bool = False):
  """Softmax-weighted mean of X and log-sum-exp of -|x - X_j|^2 / (2 t).

  Args:
    x_MD: queries.
    X_ND: data points (keys and values).
    t: noise variance, a scalar > 0.
    implementation: a name or an ordered list of names (module docstring).
    block_sizes: `BlockSizes` (xla) or `PallasBlockSizes` (pallas).
    distance: "auto" (direct differences in float64 with D <= 32, else the
      centred expanded form; see reference._resolve_distance), "direct",
      "expanded".
    interpret: run the Pallas kernel in interpret mode (CPU tests).

  Returns:
    (mean_MD, lse_M).
  """
  validate(x_MD, X_ND, t)
  x_MD = jnp.asarray(x_MD)
  X_ND = jnp.asarray(X_ND)
  if X_ND.dtype != x_MD.dtype:
    # A silent cast would downcast float64 data to float32 queries (or the
    # reverse) without the caller noticing (brief pitfall 8).
    raise TypeError(f"queries are {x_MD.dtype} but data are {X_ND.dtype}; "
                    "cast both to one dtype (float64 for verification at "
                    "small t, float32 otherwise)")
  t = jnp.asarray(t, x_MD.dtype)
  if isinstance(implementation, str):
    order = (implementation,)
  elif implementation is None:
    order = ("xla",)
  else:
    order = tuple(implementation)
  xla_bs = block_sizes if isinstance(block_sizes, reference.BlockSizes) else None
  bwd_kw = (("block_sizes", xla_bs),
            ("distance", reference._resolve_distance(
                distance, x_MD.shape[1], x_MD.dtype)))
  errors = []
  for name in order:
    fwd = _impl(name, block_sizes if name != "xla" else xla_bs, distance,
                interpret)
    try:
      return _op(x_MD, X_ND, t, fwd, bwd_kw)
    except NotImplementedError as e:
      errors.append(e)
  raise ExceptionGroup(f"every implementation in {order} refused the inputs",
                       errors)
