r"""3x3 convolution on wide inputs: one XLA convolution against a sum over
input-channel chunks (the route `diffusion.unet_blocks.Conv2D` takes on CPU).

  .venv/bin/python benchmarks/conv_chunks_speed.py

Shapes are the SD-1.5 UNet's at 512x512, batch 4 (decoder resnets take the
skip concatenations: 960, 1920, 2560 input channels). Prints ms and GFLOP/s
per variant (median of 5 after a warm-up); compare rows, not machines.
"""

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_xnnpack=true")

import jax  # noqa: E402
import numpy as np  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
# (map side, input channels, output channels, chunk sizes to try)
SHAPES = [(64, 640, 320, (320, 160)), (64, 960, 320, (320,)),
          (64, 320, 320, (160,)), (32, 1280, 640, (640, 320)),
          (32, 960, 640, (320, 480)), (32, 1920, 640, (640,)),
          (32, 640, 640, (320,)), (16, 2560, 1280, (1280, 640)),
          (16, 1920, 1280, (640,)), (16, 1280, 1280, (640,))]


def one_conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=DN)


def chunked(piece):
  def f(x, k):
    y = 0
    for s in range(0, x.shape[-1], piece):
      y = y + one_conv(x[..., s:s + piece], k[:, :, s:s + piece])
    return y
  return f


def im2col(x, k):
  """unet_blocks.Conv2D's own im2col route (taken on CPU for maps of <=
  IM2COL_MAX_PIXELS), forced on at this size while tracing."""
  from jaxlib_models.diffusion import unet_blocks  # noqa: PLC0415

  conv = unet_blocks.Conv2D(k.shape[-1], (3, 3), strides=(1, 1),
                           padding=((1, 1), (1, 1)))
  params = {"kernel": k, "bias": jax.numpy.zeros(k.shape[-1], k.dtype)}
  before = unet_blocks.IM2COL_MAX_PIXELS
  unet_blocks.IM2COL_MAX_PIXELS = x.shape[1] * x.shape[2]
  try:
    return conv.apply({"params": params}, x)
  finally:
    unet_blocks.IM2COL_MAX_PIXELS = before


def median_ms(f, *args, reps=5):
  f = jax.jit(f)
  f(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main():
  print(f"backend {jax.default_backend()}, {os.cpu_count()} cores,"
        f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  for h, c, f, pieces in SHAPES:
    x = jax.random.normal(jax.random.key(0), (4, h, h, c))
    k = jax.random.normal(jax.random.key(1), (3, 3, c, f)) * 0.01
    gflop = 2 * 4 * h * h * 9 * c * f / 1e9
    rows = [("one conv", median_ms(one_conv, x, k))]
    rows += [(f"chunks of {p}", median_ms(chunked(p), x, k)) for p in pieces]
    if h <= 32:
      rows.append(("im2col", median_ms(im2col, x, k)))
    print(f"{h}x{h} {c}->{f}: " + "  ".join(
        f"{n} {ms:.1f} ms ({gflop / ms * 1e3:.0f} GFLOP/s)" for n, ms in rows),
        flush=True)


if __name__ == "__main__":
  main()
