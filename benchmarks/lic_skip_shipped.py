"""Channel skipping on the shipped checkerboard codecs (issue 6, check 3).

The shipped hyperpriors were trained without an L1 term (alpha_1 = 0, the
setting that keeps rate-distortion exactly where it is), yet some of their
M = 96 latent channels round to zero everywhere on a given photo. With
skipping on, those channels are marked in the file's occupancy map and are
neither coded nor decoded; the reconstruction is the same image. For each
shipped checkerboard model and held-out photo this script writes the file
with skipping off and on and reports the channels left out, the bytes, the
decode time of both files (median of --reps, compile excluded) and checks
that both decode bit-exactly to the same image.

  .venv/bin/python benchmarks/lic_skip_shipped.py [--photos coffee,hubble]
      [--reps 5] [--json benchmarks/lic_skip_shipped.json]
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from jaxlib_models.compression import codec, data, pretrained


def _median_decode(cod, blob, reps):
  codec.decompress(cod, blob)  # Compile and warm the tables.
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    codec.decompress(cod, blob)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure(name, photos, reps):
  """Per-photo rows for one checkerboard model."""
  cod = pretrained.load(name)
  rows = []
  for pname, img in photos.items():
    off, rec = codec.compress(cod, img, skip_channels=False)
    on, rec_on = codec.compress(cod, img, skip_channels=True)
    if not (rec == rec_on).all():
      raise SystemExit(f"{name} {pname}: skipping changed the image")
    for blob in (off, on):
      if not (codec.decompress(cod, blob) == rec).all():
        raise SystemExit(f"{name} {pname}: decode is not bit-exact")
    occ = codec.occupancy(cod, on)
    rows.append({"photo": pname, "pixels": int(img.shape[0] * img.shape[1]),
                 "channels_skipped": int((~occ).sum()),
                 "channels": int(occ.size),
                 "bytes_off": len(off), "bytes_on": len(on),
                 "decode_s_off": _median_decode(cod, off, reps),
                 "decode_s_on": _median_decode(cod, on, reps)})
  return rows


def summarize(name, rows):
  skipped = np.mean([r["channels_skipped"] / r["channels"] for r in rows])
  b_off = sum(r["bytes_off"] for r in rows)
  b_on = sum(r["bytes_on"] for r in rows)
  t_off = sum(r["decode_s_off"] for r in rows)
  t_on = sum(r["decode_s_on"] for r in rows)
  return {"model": name, "channels_skipped_mean": float(skipped),
          "channels_skipped_range": [
              min(r["channels_skipped"] for r in rows),
              max(r["channels_skipped"] for r in rows)],
          "bytes_off": b_off, "bytes_on": b_on,
          "decode_s_off": t_off, "decode_s_on": t_on,
          "time_saved": 1 - t_on / t_off}


def main():
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--photos", default="",
                 help="comma-separated subset of data.EVAL_SET (default all)")
  p.add_argument("--reps", type=int, default=5,
                 help="decodes per file, the median is kept (default 5)")
  p.add_argument("--json", default="",
                 help="also write the per-photo rows and summaries here")
  args = p.parse_args()
  photos = data.eval_photos(args.photos.split(",") if args.photos else None)
  names = [n for n in pretrained.names() if n.startswith("checkerboard")]
  out = {"machine": f"{platform.processor() or platform.machine()},"
                    f" {os.cpu_count()} cores", "reps": args.reps,
         "models": {}}
  print("| model | channels skipped (mean, range) | bytes off / on |"
        " decode s off / on (sum) | decode time saved |\n"
        "|---|---|---|---|---:|")
  for n in names:
    rows = measure(n, photos, args.reps)
    s = summarize(n, rows)
    out["models"][n] = {"summary": s, "photos": rows}
    lo, hi = s["channels_skipped_range"]
    print(f"| {n} | {100 * s['channels_skipped_mean']:.1f} % ({lo}-{hi} of"
          f" {rows[0]['channels']}) | {s['bytes_off']:,} / {s['bytes_on']:,}"
          f" | {s['decode_s_off']:.3f} / {s['decode_s_on']:.3f} |"
          f" {100 * s['time_saved']:.1f} % |", flush=True)
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
