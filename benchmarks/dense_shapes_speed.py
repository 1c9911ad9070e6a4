r"""The SD-1.5 UNet's dense matmul shapes: jax against PyTorch, same process.

  .venv/bin/python benchmarks/dense_shapes_speed.py [--reps 7] [--json OUT]

Each row is one float32 (M, K) x (K, N) product at a shape the UNet step of
`sd_unet_speed.py` runs (512x512, batch 4): `jax.jit(jnp.dot)` against
`torch.mm` with `torch.set_num_threads(os.cpu_count())`, the median of
--reps calls after one untimed call. Prints GFLOP/s for each and the time
ratio PyTorch / jax (< 1: PyTorch faster). This separates the matmul
library from the rest of the UNet step (convolutions, attention, fusions).
"""

from __future__ import annotations

import argparse
import os

# (M, K, N, where in the UNet at 512x512, batch 4)
SHAPES = (
    (16384, 320, 2560, "GEGLU projection, 64x64 level"),
    (16384, 1280, 320, "FF output, 64x64 level"),
    (4096, 640, 5120, "GEGLU projection, 32x32 level"),
    (1024, 1280, 10240, "GEGLU projection, 16x16 level"),
    (4096, 4096, 4096, "square reference"),
)


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=7,
                  help="timed calls per side and shape (median reported)")
  ap.add_argument("--json", default=None, help="also write the rows here")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxlib_models.core import io
  from jaxlib_models.core.timing import median_time

  torch.set_num_threads(os.cpu_count())
  dot = jax.jit(jnp.dot)
  rows = []
  for m, k, n, where in SHAPES:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_jax = median_time(lambda: dot(ja, jb).block_until_ready(),
                        args.reps, warmup=1)
    t_torch = median_time(lambda: torch.mm(ta, tb), args.reps, warmup=1)
    gflop = 2 * m * k * n / 1e9
    row = {"m": m, "k": k, "n": n, "where": where,
           "jax_gflops": gflop / t_jax, "torch_gflops": gflop / t_torch,
           "torch_over_jax_time": t_torch / t_jax}
    rows.append(row)
    print(f"{m} x {k} x {n} ({where}): jax {row['jax_gflops']:.0f} GFLOP/s,"
          f" PyTorch {row['torch_gflops']:.0f} GFLOP/s, PyTorch / jax time"
          f" {row['torch_over_jax_time']:.2f}", flush=True)
  if args.json:
    io.write_json(args.json, {"rows": rows, "cpus": os.cpu_count()})
  return rows


if __name__ == "__main__":
  main()
