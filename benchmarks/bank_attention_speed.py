r"""Speed of attention over own + masked extra keys (kernels/bank_attention).

  .venv/bin/python benchmarks/bank_attention_speed.py [--reps 3] [--batch B]
      [--json OUT] [--quick]

SD-like sizes (StreamV2V self-attention with a bank as large as the frame):
  sd64: N = S = M = 4096 tokens (64x64 latent), C = 320, H = 8 (K = 40)
  sd32: N = S = M = 1024 tokens (32x32 latent), C = 640, H = 8 (K = 80)
include_self, about 80 % of the extra slots valid, batch 4 on a GPU and 1 on
a CPU by default (the dense paths hold B H N (S + M) float32 logits: 1 GB per
batch element at sd64). Timed under jax.jit, warm, median of --reps calls,
`block_until_ready`:
  xla:       bank_attention(implementation="xla") (reference.chunked);
  dpa_xla:   jax.nn.dot_product_attention(implementation="xla") on the float32
             concatenation (diffusion/attention.py's path; no cuDNN);
  reference: reference.dense (concatenation + masked softmax in jnp);
  pallas:    the Triton kernel, on a GPU only.
Every row prints the time and its ratio to "xla"; also the max |difference|
to "xla". CPU dtype float32; GPU float32 and bfloat16, card named. The
script warns when the 1-min load average is above 0.5 (another process is
using the CPU). `--quick` shrinks the sizes to check the script end to end.
"""

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time
from jaxlib_models.kernels import bank_attention as ba
from jaxlib_models.kernels.bank_attention import reference

SIZES = {"sd64": (4096, 320, 8), "sd32": (1024, 640, 8)}  # tokens, C, H


def _impls(heads, on_gpu):
  kw = dict(heads=heads)
  fns = {
      "xla": functools.partial(ba.bank_attention, implementation="xla", **kw),
      "dpa_xla": functools.partial(reference.dot_product_attention, **kw),
      "reference": functools.partial(reference.dense, **kw),
  }
  if on_gpu:
    fns["pallas"] = functools.partial(ba.bank_attention,
                                      implementation="pallas", **kw)
  return fns


def run_case(name, b, tokens, c, heads, dtype, reps, on_gpu):
  rng = np.random.default_rng(0)
  arr = lambda: jnp.asarray(rng.standard_normal((b, tokens, c)), dtype)
  q, ks, vs, ke, ve = (arr() for _ in range(5))
  valid = jnp.asarray(rng.random((b, tokens)) < 0.8)
  rows, base, base_out = [], None, None
  for impl, f in _impls(heads, on_gpu).items():
    fn = jax.jit(lambda q, ks, vs, ke, ve, m, f=f: f(q, ks, vs, ke, ve,
                                                      extra_valid=m))
    try:
      out = fn(q, ks, vs, ke, ve, valid).block_until_ready()
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name} {impl}: failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    t = median_time(lambda: fn(q, ks, vs, ke, ve, valid).block_until_ready(),
                    reps=reps)
    if impl == "xla":
      base, base_out = t, out
    diff = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                 - base_out.astype(jnp.float32))))
    flops = 4 * b * heads * tokens * 2 * tokens * (c // heads)
    row = dict(case=name, impl=impl, dtype=jnp.dtype(dtype).name, batch=b,
               tokens=tokens, width=c, heads=heads, ms=t * 1e3,
               ratio_to_xla=t / base, max_abs_diff_to_xla=diff,
               tflops=flops / t / 1e12)
    print(f"{name:5s} {row['dtype']:8s} B={b} {impl:9s} {t * 1e3:9.1f} ms"
          f"  x{t / base:5.2f} of xla  {row['tflops']:6.2f} TFLOP/s"
          f"  max|d| {diff:.1e}", flush=True)
    rows.append(row)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--json", default=None)
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  load = os.getloadavg()[0]
  if load > 0.5:
    print(f"WARNING: 1-min load average {load:.1f}: another process is using"
          " the CPU, timings are off")
  dev = jax.devices()[0]
  print(f"device {dev.platform} {dev.device_kind}, jax {jax.__version__}")
  b = args.batch or (4 if on_gpu else 1)
  dtypes = (jnp.float32, jnp.bfloat16) if on_gpu else (jnp.float32,)
  rows = []
  for name, (tokens, c, heads) in SIZES.items():
    if args.quick:
      tokens, c = tokens // 16, c // 4
    for dtype in dtypes:
      rows += run_case(name, b, tokens, c, heads, dtype, args.reps, on_gpu)
  if not on_gpu:
    print("no GPU: pallas timing unmeasured")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=dev.device_kind, platform=dev.platform,
                     load_average=load, quick=args.quick, rows=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
