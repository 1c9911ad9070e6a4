"""Winograd F(m x m, 3 x 3) convolution: the UNet's 3x3 convolutions on CPU.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (arXiv
1509.09308). A stride-1 3x3 convolution is computed on m x m output tiles
from (m + 2) x (m + 2) input tiles: Y = A^T [(G k G^T) * (B^T d B)] A, so the
multiply-adds become (m + 2)^2 batched matmuls over the channels, one per
tile position, with 36 instead of 144 multiplies per 4 x 4 output (m = 4)
or 16 instead of 36 per 2 x 2 (m = 2).

The kernel transform U = G k G^T is done ONCE, at load time
(`prepare_params`), and stored in the parameter tree under `KEY` in place
of the 3x3 kernel: done inside the jitted step it costs more than it saves
for the wide kernels (2-core AMD EPYC Zen 3, batch 4, one 16x16 1280->1280
convolution: transform 367 ms, the Winograd convolution itself 93 ms, XLA's
convolution 335 ms). `unet_blocks.Conv2D` takes this route whenever its
parameters carry `KEY`.

Measured on that machine (batch 4, float32, median of 5, ms; XLA with
XNNPACK on; PyTorch 2.13 oneDNN on the same cores; XLA and PyTorch from
one run, the Winograd columns from another, so compare within +-15 %):

  layer              XLA conv   F(4)   F(2)   PyTorch
  64x64 320->320        280      132    256     240
  32x32 640->640        273      104    175     209
  16x16 1280->1280      335      128    134     283
  64x64 960->320        904      403    720     525

Numerics: the transforms are exact in real arithmetic; in float32 the
result differs from the direct convolution by ~2e-6 (m = 2) and ~3e-5
(m = 4) relative to the output's largest value (the F(4) matrices hold
entries up to 8 and 1/24). The Winograd path always computes in float32.

Memory: a prepared kernel holds (m + 2)^2 / 9 times the floats of the 3x3
kernel (1.8x for m = 2, 4x for m = 4). The SD-1.5 UNet's parameters take
3.4 GB in float32; prepared with m = 4 everywhere 9.3 GB, with the default
`tile="auto"` 5.5 GB. "auto" uses m = 4 for kernels with at most 640 output
channels (the 64x64 and 32x32 levels, where F(4) gains the most and the
kernels are small) and m = 2 for the wider ones; the whole UNet step is
then 2 % slower than with m = 4 everywhere (25.6 against 25.1 s,
`benchmarks/sd_unet_speed.py`, same VM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

KEY = "winograd_kernel"
TILES = (2, 4)
# Parameter-path parts whose 3x3 convolutions are not prepared: strided
# (downsamplers) and upsample-then-convolve (upsamplers, which have their own
# sub-pixel route in `unet_blocks.Conv2D`).
SKIP = ("upsamplers", "downsamplers")
# tile="auto": m = 4 for kernels with at most this many output channels.
AUTO_F4_MAX_FEATURES = 640


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B^T, G, A^T) of F(m, 3) in float64: (m+2, m+2), (m+2, 3), (m, m+2)."""
  if m == 2:
    bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
    at = [[1, 1, 1, 0], [0, 1, -1, -1]]
  elif m == 4:
    bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
          [0, 1, -1, 8, -8, 1]]
  else:
    raise ValueError(f"Winograd tile m={m}: choose one of {TILES}")
  return (np.array(bt, np.float64), np.array(g, np.float64),
          np.array(at, np.float64))


def transform_kernel(kernel, tile: int) -> np.ndarray:
  """(3, 3, C, F) HWIO kernel -> (m+2, m+2, C, F) float32 U = G k G^T,
  computed in float64 one row of U at a time."""
  k = np.asarray(kernel)
  if k.ndim != 4 or k.shape[:2] != (3, 3):
    raise ValueError(f"Winograd needs a (3, 3, C, F) kernel, got {k.shape}")
  _, g, _ = matrices(tile)
  a = tile + 2
  k = k.astype(np.float64)
  out = np.empty((a, a) + k.shape[2:], np.float32)
  for p in range(a):
    t = np.tensordot(g[p], k, axes=(0, 0))  # (3, C, F)
    out[p] = np.tensordot(g, t, axes=(1, 0))
  return out


def conv3x3(x: Array, u: Array,
            padding=((1, 1), (1, 1))) -> Array:
  """Stride-1 3x3 convolution of x (B, H, W, C) with a prepared kernel u
  (m+2, m+2, C, F) and explicit padding ((top, bottom), (left, right)).

  Returns (B, H + top + bottom - 2, W + left + right - 2, F) float32, equal
  to `lax.conv_general_dilated` with the untransformed kernel up to float
  rounding (module docstring). Any output size: the last tiles are
  computed on zero padding and cropped.

  The tile transforms are two small matmuls with kron(B^T, B^T) and
  kron(A^T, A^T) over the flattened tile positions. Written as unrolled
  sums of shifted slices instead, they run at the same speed but triple
  XLA's compile time for m = 4 (2.0-2.5 s against 0.7-1.0 s per layer).
  """
  a = u.shape[0]
  if u.ndim != 4 or u.shape[1] != a or a - 2 not in TILES:
    raise ValueError(f"prepared Winograd kernel of shape {u.shape}: want"
                     f" (m+2, m+2, C, F) with m in {TILES}")
  m = a - 2
  b, h, w, c = x.shape
  if u.shape[2] != c:
    raise ValueError(f"input has {c} channels, the prepared kernel"
                     f" {u.shape} expects {u.shape[2]}")
  bt, _, at = matrices(m)
  (pt, pb), (pl, pr) = padding
  ho, wo = h + pt + pb - 2, w + pl + pr - 2
  th, tw = -(-ho // m), -(-wo // m)
  xp = jnp.pad(x.astype(jnp.float32),
               ((0, 0), (pt, m * th + 2 - h - pt), (pl, m * tw + 2 - w - pl),
                (0, 0)))
  # Element (i, j) of every input tile, (a*a, B*th*tw*C), row-major (i, j).
  d = jnp.stack([xp[:, i:i + m * th:m, j:j + m * tw:m, :]
                 for i in range(a) for j in range(a)]).reshape(a * a, -1)
  v = (jnp.asarray(np.kron(bt, bt), jnp.float32) @ d).reshape(
      a * a, b * th * tw, c)
  f = u.shape[-1]
  prod = jnp.einsum("ktc,kcf->ktf", v,
                    u.reshape(a * a, c, f).astype(jnp.float32))
  y = jnp.asarray(np.kron(at, at), jnp.float32) @ prod.reshape(a * a, -1)
  # (p, q, B, th, tw, F) -> (B, th, p, tw, q, F) -> (B, m th, m tw, F).
  y = y.reshape(m, m, b, th, tw, f).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(b, m * th, m * tw, f)[:, :ho, :wo]


def _pick_tile(tile, kernel_shape) -> int:
  if tile == "auto":
    return 4 if kernel_shape[-1] <= AUTO_F4_MAX_FEATURES else 2
  if tile not in TILES:
    raise ValueError(f"Winograd tile={tile!r}: choose 'auto' or one of"
                     f" {TILES}")
  return tile


def prepare_params(params: Mapping[str, Any], tile: int | str = "auto", *,
                   skip: Sequence[str] = SKIP) -> dict:
  """A copy of a UNet (or ControlNet) parameter tree whose stride-1 3x3
  convolution kernels are replaced by their Winograd transforms (`KEY`).

  Every {"kernel": (3, 3, C, F), "bias": ...} entry is converted unless a
  part of its path contains one of the `skip` strings. The result runs
  through the same modules
  (`unet_blocks.Conv2D` picks the Winograd route from the parameter name);
  it is a derived layout for inference on CPU, not a checkpoint format:
  keep the original tree for training, saving and conversion.
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a mapping, got {type(params).__name__}")
  _pick_tile(tile, (1,))  # validate early

  def walk(node, path):
    if not isinstance(node, Mapping):
      return node
    k = node.get("kernel")
    if (k is not None and getattr(k, "ndim", 0) == 4
        and tuple(k.shape[:2]) == (3, 3)
        and not any(s in part for part in path for s in skip)):
      out = {n: v for n, v in node.items() if n != "kernel"}
      out[KEY] = jnp.asarray(transform_kernel(k, _pick_tile(tile, k.shape)))
      return out
    return {n: walk(v, path + (n,)) for n, v in node.items()}

  return walk(params, ())


def prepared_count(params: Mapping[str, Any]) -> int:
  """Number of Winograd-prepared kernels in a parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(1 for path, _ in leaves
             if getattr(path[-1], "key", None) == KEY)
