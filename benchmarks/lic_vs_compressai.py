r"""Encode/decode time of our mean-scale hyperprior against CompressAI's.

  PYTHONPATH=/tmp/caisite .venv/bin/python benchmarks/lic_vs_compressai.py
      [--reps 5] [--N 128 --M 192] [--photo hubble] [--json OUT]

CompressAI (PyTorch, its own rANS coder) is not a dependency: install it
beside the venv, e.g.
  pip install --no-deps --target /tmp/caisite compressai==1.2.8 einops \
      torch-geometric xxhash aiohttp pandas
CompressAI 1.2.8's model registry imports `torchvision.transforms` at import
time; where no torchvision matching the CPU torch is at hand, an empty stub
package `torchvision/transforms.py` in that folder satisfies the import (no
torchvision code runs on the measured path).

Both sides: the same architecture and size (Minnen 2018 mean-scale
hyperprior, `compressai.models.MeanScaleHyperprior(N, M)` against
`HyperpriorConfig(N, M)`; ours takes |y| into h_a, as the scale hyperprior
does, which costs nothing measurable), random weights (speed does not depend
on weight values; the file sizes do, and are printed), one held-out photo
(default hubble, 768x512), float32 on this CPU. Ours: `codec.compress` /
`codec.decompress` (jitted transforms, constriction range coder, .jlic file);
CompressAI: `net.compress` / `net.decompress` after `net.update()` under
`torch.no_grad()`, `torch.set_num_threads(os.cpu_count())`. One warm-up call
each (jit compilation excluded), then the median of --reps. Ratio > 1: ours
faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time


def time_compressai(net, img: np.ndarray, reps: int) -> dict:
  """Median compress / decompress seconds of a CompressAI model on an
  (H, W, 3) uint8 image after `update()` and one warm-up call each, and the
  bytes of its strings."""
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  net = net.eval()
  net.update(force=True)
  x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
  with torch.no_grad():
    out = net.compress(x)
    return {
        "encode_s": median_time(lambda: net.compress(x), reps, 1),
        "decode_s": median_time(lambda: net.decompress(out["strings"],
                                                       out["shape"]), reps, 1),
        "bytes": sum(len(s[0]) for s in out["strings"])}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--N", type=int, default=128)
  p.add_argument("--M", type=int, default=192)
  p.add_argument("--photo", default="hubble")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  try:
    import torch  # noqa: PLC0415
    from compressai.models import MeanScaleHyperprior  # noqa: PLC0415
  except ImportError as e:
    print(f"CompressAI not importable ({e}); see --help for the side install")
    return 1
  from jaxlib_models.compression import codec, data, hyperprior  # noqa: PLC0415

  img = data.eval_photos([args.photo])[args.photo]
  h, w = img.shape[:2]
  load = os.getloadavg()[0]
  torch.set_num_threads(os.cpu_count())
  print(f"{platform.machine()} {os.cpu_count()} cpus, load {load:.2f}; jax"
        f" {jax.__version__}, torch {torch.__version__}; photo {args.photo}"
        f" {w}x{h}; N={args.N} M={args.M}; random weights; median of"
        f" {args.reps}", flush=True)

  cfg = hyperprior.HyperpriorConfig(N=args.N, M=args.M)
  params = hyperprior.Hyperprior(cfg).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  ours = codec.Codec.from_params(cfg, params)
  blob, _ = codec.compress(ours, img)
  res = {"photo": args.photo, "size": [h, w], "N": args.N, "M": args.M,
         "load": load, "jax": jax.__version__, "torch": torch.__version__,
         "ours": {"encode_s": median_time(lambda: codec.compress(ours, img),
                                      args.reps, 1),
                  "decode_s": median_time(lambda: codec.decompress(ours, blob),
                                      args.reps, 1),
                  "bytes": len(blob)}}

  torch.manual_seed(0)
  res["compressai"] = time_compressai(MeanScaleHyperprior(args.N, args.M),
                                      img, args.reps)
  for k in ("encode_s", "decode_s"):
    res[f"ratio_{k[:-2]}"] = res["compressai"][k] / res["ours"][k]
  for who in ("ours", "compressai"):
    r = res[who]
    print(f"  {who:<10} encode {r['encode_s']:.3f} s  decode"
          f" {r['decode_s']:.3f} s  ({r['bytes']:,} bytes)")
  print(f"ratio CompressAI / ours: encode {res['ratio_encode']:.2f}x,"
        f" decode {res['ratio_decode']:.2f}x (> 1: ours faster)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
