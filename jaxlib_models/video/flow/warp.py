"""Bilinear backward warping by optical flow, in jnp (jit-able).

Convention (OpenCV / RAFT / the warp-error scripts): a flow field holds
per-pixel displacements (dx, dy) in pixels, last axis ordered x then y, and

  backward_warp(img, flow)[y, x] = img(x + flow[y, x, 0], y + flow[y, x, 1])

with bilinear interpolation between the four neighbouring pixel centres
(pixel centres at integer coordinates) and every neighbour outside the image
read as 0. This is `cv2.remap(img, grid + flow, INTER_LINEAR,
BORDER_CONSTANT, 0)` for float images, and equally
`torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=True)` once the pixel coordinates are normalised with
`pixel_to_grid`. If f is the forward flow of frames (a, b), a(x) ~ b(x + f),
so `backward_warp(b, f)` reconstructs a.

N: batch, H/W: source height/width, P/Q: output height/width, C: channels.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _sample_one(img_HWC: Array, x_PQ: Array, y_PQ: Array) -> Array:
  """Bilinear, zero outside, at float pixel coordinates (one image)."""
  h, w, c = img_HWC.shape
  flat_LC = img_HWC.reshape(h * w, c)
  x0 = jnp.floor(x_PQ)
  y0 = jnp.floor(y_PQ)
  wx1 = x_PQ - x0
  wy1 = y_PQ - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  out_PQC = jnp.zeros(x_PQ.shape + (c,), img_HWC.dtype)
  for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
    for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      weight = jnp.where(inside, wx * wy, 0.0).astype(img_HWC.dtype)
      out_PQC = out_PQC + flat_LC[idx] * weight[..., None]
  return out_PQC


def bilinear_sample(img: jax.typing.ArrayLike, x: jax.typing.ArrayLike,
                    y: jax.typing.ArrayLike) -> Array:
  """Samples img at float pixel coordinates (cv2.remap semantics).

  Args:
    img: (H, W, C) or (N, H, W, C); integer images are read as float32.
    x: (P, Q) or (N, P, Q) column coordinates, pixel centres at integers.
    y: same shape as x, row coordinates.

  Returns:
    (P, Q, C) or (N, P, Q, C) float samples; neighbours outside the image
    count as 0.
  """
  img = jnp.asarray(img)
  if not jnp.issubdtype(img.dtype, jnp.floating):
    img = img.astype(jnp.float32)
  x = jnp.asarray(x, img.dtype)
  y = jnp.asarray(y, img.dtype)
  if x.shape != y.shape:
    raise ValueError(f"x {x.shape} and y {y.shape} differ in shape")
  if img.ndim == 3 and x.ndim == 2:
    return _sample_one(img, x, y)
  if img.ndim == 4 and x.ndim == 3 and x.shape[0] == img.shape[0]:
    return jax.vmap(_sample_one)(img, x, y)
  raise ValueError(f"img {img.shape} must be (H, W, C) with (P, Q) coordinates"
                   f" or (N, H, W, C) with (N, P, Q); got {x.shape}")


def _check_flow(img: Array, flow: Array) -> None:
  if flow.shape[-1] != 2 or flow.ndim not in (3, 4):
    raise ValueError(f"flow must be (H, W, 2) or (N, H, W, 2), got"
                     f" {flow.shape}")
  if img.ndim not in (3, 4):
    raise ValueError(f"img must be (H, W, C) or (N, H, W, C), got {img.shape}")


@jax.jit
def backward_warp(img: jax.typing.ArrayLike,
                  flow: jax.typing.ArrayLike) -> Array:
  """Samples img at (x + flow_x, y + flow_y): the cv2.remap variant.

  Args:
    img: (H, W, C) or (N, H, W, C) image(s) (uint8 is read as float32).
    flow: (H', W', 2) or (N, H', W', 2) displacements (dx, dy) in pixels;
      the output has the flow's spatial size (usually that of img). A single
      flow is shared by a batch of images, a batch of flows needs a batch of
      images.

  Returns:
    float32 (H', W', C) or (N, H', W', C), zero where sampling left the image.
  """
  img = jnp.asarray(img)
  if not jnp.issubdtype(img.dtype, jnp.floating):
    img = img.astype(jnp.float32)
  flow = jnp.asarray(flow, img.dtype)
  _check_flow(img, flow)
  p, q = flow.shape[-3:-1]
  gy, gx = jnp.meshgrid(jnp.arange(p, dtype=img.dtype),
                        jnp.arange(q, dtype=img.dtype), indexing="ij")
  x = gx + flow[..., 0]
  y = gy + flow[..., 1]
  if img.ndim == 4 and flow.ndim == 3:
    x = jnp.broadcast_to(x, (img.shape[0],) + x.shape)
    y = jnp.broadcast_to(y, (img.shape[0],) + y.shape)
  if img.ndim == 3 and flow.ndim == 4:
    raise ValueError("a batch of flows needs a batch of images")
  return bilinear_sample(img, x, y)


def pixel_to_grid(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
                  height: int, width: int) -> Array:
  """Pixel coordinates -> grid_sample's normalised (gx, gy), corners aligned.

  gx = 2 x / (W - 1) - 1, so -1 and 1 are the centres of the first and last
  pixel (align_corners=True). Returns (..., 2).
  """
  gx = 2.0 * jnp.asarray(x, jnp.float32) / max(width - 1, 1) - 1.0
  gy = 2.0 * jnp.asarray(y, jnp.float32) / max(height - 1, 1) - 1.0
  return jnp.stack([gx, gy], axis=-1)


def flow_to_grid(flow: jax.typing.ArrayLike) -> Array:
  """(…, H, W, 2) pixel flow -> normalised sampling grid for grid_sample."""
  flow = jnp.asarray(flow, jnp.float32)
  h, w = flow.shape[-3:-1]
  gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  return pixel_to_grid(gx + flow[..., 0], gy + flow[..., 1], h, w)


@jax.jit
def grid_sample(img: jax.typing.ArrayLike,
                grid: jax.typing.ArrayLike) -> Array:
  """`torch.nn.functional.grid_sample(align_corners=True)`, NHWC.

  Bilinear, padding_mode="zeros". `grid_sample(img, flow_to_grid(flow))`
  equals `backward_warp(img, flow)` up to float rounding.

  Args:
    img: (N, H, W, C) or (H, W, C).
    grid: (N, P, Q, 2) or (P, Q, 2) normalised (gx, gy), -1 / 1 the centres
      of the first / last pixel.

  Returns:
    float32 (N, P, Q, C) or (P, Q, C).
  """
  img = jnp.asarray(img)
  if not jnp.issubdtype(img.dtype, jnp.floating):
    img = img.astype(jnp.float32)
  grid = jnp.asarray(grid, img.dtype)
  if grid.shape[-1] != 2 or grid.ndim != img.ndim:
    raise ValueError(f"grid {grid.shape} must be (N, P, Q, 2) or (P, Q, 2) to"
                     f" match img {img.shape}")
  h, w = img.shape[-3:-1]
  x = (grid[..., 0] + 1.0) * 0.5 * (w - 1)
  y = (grid[..., 1] + 1.0) * 0.5 * (h - 1)
  return bilinear_sample(img, x, y)
