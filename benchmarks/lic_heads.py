"""Shipped codecs on the held-out photos: mean bpp (real .jlic files) and
PSNR per model, with every decode checked bit-exact.

  .venv/bin/python benchmarks/lic_heads.py [--photos coffee,hubble] [--models DIR]
"""

import argparse

import numpy as np

from jaxlib_models.compression import codec, data, pretrained


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--photos", default="",
                 help="comma-separated subset of data.EVAL_SET (default all)")
  p.add_argument("--models", default=pretrained.DIR,
                 help="folder of models (default: the shipped ones)")
  args = p.parse_args()
  photos = data.eval_photos(args.photos.split(",") if args.photos else None)
  print("| model | bpp | PSNR dB |\n|---|---:|---:|")
  for n in pretrained.names(args.models):
    c = pretrained.load(n, args.models)
    bpp, psnr = [], []
    for img in photos.values():
      blob, rec = codec.compress(c, img)
      if not (codec.decompress(c, blob) == rec).all():
        raise SystemExit(f"{n}: decode is not bit-exact")
      bpp.append(8 * len(blob) / img.shape[0] / img.shape[1])
      mse = np.mean((rec.astype(np.float64) - img) ** 2)
      psnr.append(10 * np.log10(255**2 / mse))
    print(f"| {n} | {np.mean(bpp):.4f} | {np.mean(psnr):.2f} |", flush=True)


if __name__ == "__main__":
  main()
