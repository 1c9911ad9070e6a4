r"""Channel skipping at trained L1 settings (issue 6, check 3).

  python benchmarks/l1_skip_study.py [--steps 500] [--alphas 0,0.03,0.1]
      [--out benchmarks/l1_skip_study] [--workdir runs/l1_skip]

For each shipped hyperprior (compression/pretrained, N=64, M=96, three
lambdas) and each L1 weight alpha_1: a checkerboard codec (Fu et al.'s two
parameter networks; anchors `--anchor` family, non-anchors Gaussian; channel
skipping on) initialised from the shipped transforms and hyper networks
(the context and parameter networks start random), trained `--steps` steps
with L = R + lambda 255^2 MSE + alpha_1 sum|y^| / (H W) on the training
corpus. alpha_1 = 0 is the control: same start, steps and batches, no L1.

Measured on the held-out photos with real .jlic files (skipping on, every
decode checked bit-exact against the encoder's reconstruction): bpp, PSNR,
and the share of the M latent channels left out by the occupancy map. Per
alpha_1 > 0: the BD-rate against alpha_1 = 0 (pchip over the three
lambdas). Decode time on the 768x512 held-out photo (hubble): the same
model's file with skipping on against one with skipping off (every channel
coded), median of `--reps`, so the saving is the skipping alone.
Writes OUT.json, OUT.md. Training resumes from `--workdir` checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from jaxlib_models.compression import (bdrate, codec, data, distill,  # noqa: E402
                                       pretrained, train)
from jaxlib_models.core import io, trainer  # noqa: E402
from jaxlib_models.core.timing import median_time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_study  # noqa: E402

TIMED_PHOTO = "hubble"  # 512 x 768 after the evaluation centre crop.


def measure(cod, images) -> dict:
  """Real files with skipping on: mean bpp, PSNR and skipped share."""
  return kd_study.real_point(cod, images, skip_channels=True)


def decode_times(cod, img, reps: int) -> dict:
  on, _ = codec.compress(cod, img, skip_channels=True)
  off, _ = codec.compress(cod, img, skip_channels=False)
  t_on = median_time(lambda: codec.decompress(cod, on), reps, warmup=1)
  t_off = median_time(lambda: codec.decompress(cod, off), reps, warmup=1)
  return {"decode_on_s": t_on, "decode_off_s": t_off,
          "skipped": float(np.mean(~codec.occupancy(cod, on))),
          "bytes_on": len(on), "bytes_off": len(off)}


def train_model(args, name, alpha, train_imgs):
  rec = pretrained.info(name)
  t_cfg = pretrained.config_of(rec)
  shipped = pretrained.load(name)
  cfg = dataclasses.replace(t_cfg, context="checkerboard",
                            anchor_family=args.anchor,
                            nonanchor_family="gaussian", skip_channels=True,
                            l1_weight=alpha)
  tc = trainer.TrainConfig(num_steps=args.steps, batch_size=args.batch,
                           learning_rate=args.lr, lr_schedule="cosine",
                           log_every=50, checkpoint_every=250,
                           progress=False, console=False)
  task = train.make_task(cfg, train_imgs, rec["lambda"], tc, args.crop)
  init, counts = distill.init_student_from_teacher(
      task.init_params(jax.random.key(tc.seed)), shipped.params)
  task = dataclasses.replace(task, pretrained=lambda: init)
  state = trainer.train(task, tc, os.path.join(args.workdir,
                                               f"{name}-a{alpha:g}"))
  return cfg, jax.device_get(state.params), rec["lambda"], counts


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--alphas", default="0,0.03,0.1",
                 help="comma-separated L1 weights; 0 (the control) first")
  p.add_argument("--anchor", default="gaussian",
                 help="anchor family (the Fu preset uses gmm; gaussian"
                 " decodes faster on a CPU)")
  p.add_argument("--crop", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--photos", default="all",
                 help="'all' or comma-separated evaluation photo names")
  p.add_argument("--out", default="benchmarks/l1_skip_study")
  p.add_argument("--workdir", default="runs/l1_skip")
  args = p.parse_args(argv)
  alphas = [float(a) for a in args.alphas.split(",")]
  if alphas[0] != 0:
    p.error(f"--alphas must start with 0 (the control), got {args.alphas}")
  images = data.eval_photos(None if args.photos == "all"
                            else args.photos.split(","))
  timed = data.eval_photos([TIMED_PHOTO])[TIMED_PHOTO]
  train_imgs = list(data.training_photos().values())
  t0 = time.perf_counter()
  rows = []
  for alpha in alphas:
    for name in pretrained.names():
      cfg, params, lam, counts = train_model(args, name, alpha, train_imgs)
      cod = codec.Codec.from_params(cfg, params)
      row = {"alpha": alpha, "model": name, "lambda": lam,
             "init": counts, **measure(cod, images),
             **{f"timed_{k}": v for k, v in
                decode_times(cod, timed, args.reps).items()}}
      rows.append(row)
      print(f"alpha {alpha:g} {name}: {row['bpp']:.4f} bpp"
            f" {row['psnr']:.2f} dB, {100 * row['skipped']:.1f} % channels"
            f" skipped, decode {row['timed_decode_on_s']:.3f} s on /"
            f" {row['timed_decode_off_s']:.3f} s off", flush=True)
  summary = []
  base = [r for r in rows if r["alpha"] == 0]
  for alpha in alphas:
    rs = [r for r in rows if r["alpha"] == alpha]
    s = {"alpha": alpha,
         "skipped": float(np.mean([r["skipped"] for r in rs])),
         "decode_on_s": float(np.mean([r["timed_decode_on_s"] for r in rs])),
         "decode_off_s": float(np.mean([r["timed_decode_off_s"]
                                        for r in rs]))}
    s["saved"] = 1 - s["decode_on_s"] / s["decode_off_s"]
    if alpha != 0:
      try:
        s["bd_rate"] = bdrate.bd_rate(
            [r["bpp"] for r in base], [r["psnr"] for r in base],
            [r["bpp"] for r in rs], [r["psnr"] for r in rs]).as_dict()
      except ValueError as e:
        s["bd_rate"] = {"value": float("nan"), "error": str(e)}
    summary.append(s)
  res = {"rows": rows, "summary": summary, "args": vars(args),
         "images": sorted(images), "seconds": time.perf_counter() - t0}
  io.write_json(args.out + ".json", res)
  lines = [
      "# Channel skipping at trained L1 settings", "",
      f"Command: `python benchmarks/l1_skip_study.py --steps {args.steps}"
      f" --alphas {args.alphas} --anchor {args.anchor} --crop {args.crop}"
      f" --batch {args.batch} --lr {args.lr:g}`; {len(images)} held-out"
      " photos, real .jlic files; decode times on the 768x512 photo"
      f" ({TIMED_PHOTO}), median of {args.reps}.", "",
      "| alpha_1 | model | bpp | PSNR dB | channels skipped (mean / min"
      " over photos) | decode s, skip on / off |",
      "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['alpha']:g} | {r['model']} | {r['bpp']:.4f} |"
        f" {r['psnr']:.2f} | {100 * r['skipped']:.1f} % /"
        f" {100 * r['skipped_min']:.1f} % | {r['timed_decode_on_s']:.3f} /"
        f" {r['timed_decode_off_s']:.3f} |")
  lines += ["", "| alpha_1 | BD-rate vs alpha_1 = 0 | channels skipped |"
            " decode time saved by skipping |", "|---|---|---|---|"]
  for s in summary:
    bd = s.get("bd_rate")
    cell = ("(control)" if bd is None else
            f"not computable ({bd['error']})" if "error" in bd else
            f"{bd['value']:+.2f} %")
    lines.append(f"| {s['alpha']:g} | {cell} | {100 * s['skipped']:.1f} % |"
                 f" {100 * s['saved']:.1f} % ({s['decode_off_s']:.3f} ->"
                 f" {s['decode_on_s']:.3f} s) |")
  io.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
