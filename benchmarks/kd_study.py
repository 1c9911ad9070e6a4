r"""Knowledge distillation of the shipped codecs into narrower decoders.

  python benchmarks/kd_study.py [--steps 300] [--prune-steps 0] [--crop 128]
      [--batch 8] [--lr 1e-4] [--lr-schedule constant] [--width 0.5]
      [--encoder frozen] [--out benchmarks/kd_study] [--photos all]

For each shipped hyperprior (teacher, compression/pretrained, N=64, M=96):
step (ii) of the three-step distillation (`compression.distill`): a student
with a narrower synthesis transform (`N_dec = round(width N)`), initialised
from the teacher (leading channels), trained on the training corpus with
L = R_s + lambda 255^2 MSE(x, x_s) + beta_out 255^2 MSE(x_t, x_s) +
beta_feat sum_k mean((f_s^k - P f_t^k)^2) (defaults beta_out = lambda,
beta_feat = 0.1 lambda 255^2), teacher frozen (so it stays the shipped
reference), with the foundation trainer (checkpoints: the study resumes).
`--encoder frozen` (default) keeps the student's g_a and h_a at the
teacher's, so both code the same latents and the BD-rate measures the
decoder; `joint` trains them too (the paper's wording), and the extra
distortion weight beta_out then moves the student to a higher rate.
Then both are measured on the held-out photos with real .jlic bitstreams
(bpp from file sizes, PSNR per image then mean), the student's decoder
multiply-adds at 768x512 against the teacher's, and the student's BD-rate
against the teacher (pchip over the shipped lambdas). Writes OUT.json and
OUT.md. Step (iii) (`--prune-steps` > 0): the student's synthesis blocks
are ranked by the validation R-D loss rise when bypassed
(`distill.prune_decoder`, 4 training crops), half of them cut, the pruned
student retrained with g_a/h_a frozen, and written as a standalone model
(`distill.pruned_model`: the bypass is in its config and .jlic model id)
whose real bitstreams are measured like the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import numpy as np

from jaxlib_models.compression import (bdrate, codec, data, distill,
                                       pretrained)
from jaxlib_models.core import io, trainer


def real_point(cod, images, skip_channels: bool | None = None) -> dict:
  """Mean bpp and PSNR of real .jlic files (each decode checked bit-exact);
  with channel skipping also the mean and least share of skipped
  channels."""
  bpp, psnr, skipped = [], [], []
  for img in images.values():
    blob, rec = codec.compress(cod, img, skip_channels=skip_channels)
    out = codec.decompress(cod, blob)
    if not np.array_equal(out, rec):
      raise AssertionError("decoded image differs from the encoder's")
    mse = float(np.mean((out.astype(np.float64) - img) ** 2))
    bpp.append(8 * len(blob) / (img.shape[0] * img.shape[1]))
    psnr.append(10 * math.log10(255**2 / mse))
    occ = codec.occupancy(cod, blob) if cod.context != "none" else None
    if occ is not None:
      skipped.append(float(np.mean(~occ)))
  res = {"bpp": float(np.mean(bpp)), "psnr": float(np.mean(psnr))}
  if skipped:
    res.update(skipped=float(np.mean(skipped)),
               skipped_min=float(np.min(skipped)))
  return res


def prune_step(args, name, lam, t_cfg, teacher, s_cfg, s_params, train_imgs,
               images) -> dict:
  """Step (iii) for one model; returns the pruned student's row fields."""
  c = args.crop
  x_val = np.stack([im[(im.shape[0] - c) // 2:(im.shape[0] - c) // 2 + c,
                       (im.shape[1] - c) // 2:(im.shape[1] - c) // 2 + c]
                    for im in train_imgs[:4]]).astype(np.float32) / 255.0
  cut, rises = distill.prune_decoder(s_cfg, s_params, x_val, lam,
                                     keep_fraction=0.5)
  tc = trainer.TrainConfig(num_steps=args.prune_steps, batch_size=args.batch,
                           learning_rate=args.lr, log_every=50,
                           lr_schedule=args.lr_schedule,
                           checkpoint_every=100, progress=False)
  task = distill.make_kd_task(
      t_cfg, teacher.params, s_cfg, train_imgs, lam, tc, c,
      distill.retrain_config(distill.KDConfig(teacher_trainable=False), cut),
      student_params=s_params)
  state = trainer.train(task, tc, os.path.join(args.workdir,
                                               name + "-pruned"))
  p_cfg, p_params = distill.pruned_model(
      s_cfg, jax.device_get(state.params["student"]), cut)
  pruned = codec.Codec.from_params(p_cfg, p_params)
  return {"pruned_cut": list(cut), "pruned_rises": rises,
          "pruned": real_point(pruned, images),
          "pruned_dec_macs": distill.decoder_flops(p_cfg, 512, 768)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--crop", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                 default="constant",
                 help="learning-rate schedule of both training steps"
                 " (cosine: decay to 0.1x at the last step)")
  p.add_argument("--encoder", choices=("frozen", "joint"), default="frozen",
                 help="step (ii): keep the teacher's g_a and h_a fixed in the"
                 " student (frozen, default: the student's latents, hence"
                 " its rate, stay the teacher's and the BD-rate measures the"
                 " decoder) or train them with the KD loss (joint: the extra"
                 " distortion weight beta_out then moves the student to a"
                 " higher rate)")
  p.add_argument("--beta-out", type=float, default=None,
                 help="output-KD weight (default: lambda)")
  p.add_argument("--beta-feat", type=float, default=None,
                 help="feature-KD weight (default: 0.1 lambda 255^2); with"
                 " --beta-out 0 --beta-feat 0 --width 1 the run is a plain"
                 " fine-tune of the teacher's decoder (a same-budget"
                 " control)")
  p.add_argument("--models", default="all",
                 help="'all' or comma-separated shipped model names")
  p.add_argument("--width", type=float, default=0.5,
                 help="student synthesis width N_dec as a fraction of the"
                 " teacher's N (default 0.5)")
  p.add_argument("--prune-steps", type=int, default=0,
                 help="step (iii) retraining steps (0: no pruning)")
  p.add_argument("--train-folder", default=None,
                 help="PNG folder to train the students on (the teachers'"
                 " corpus: `python -m jaxlib_models.compression.corpus"
                 " --out DIR`; default: libjxl-testdata's 5 photos)")
  p.add_argument("--out", default="benchmarks/kd_study")
  p.add_argument("--workdir", default="runs/kd_study")
  p.add_argument("--photos", default="all",
                 help="'all' or comma-separated evaluation photo names")
  args = p.parse_args(argv)
  images = data.eval_photos(None if args.photos == "all"
                            else args.photos.split(","))
  train_imgs = list(data.training_photos(args.train_folder).values())
  rows, t0 = [], time.perf_counter()
  names = (pretrained.names() if args.models == "all"
           else args.models.split(","))
  for name in names:
    rec = pretrained.info(name)
    t_cfg = pretrained.config_of(rec)
    teacher = pretrained.load(name)
    s_cfg = dataclasses.replace(t_cfg,
                                N_dec=max(1, round(t_cfg.N * args.width)))
    tc = trainer.TrainConfig(num_steps=args.steps, batch_size=args.batch,
                             learning_rate=args.lr, log_every=50,
                           lr_schedule=args.lr_schedule,
                             checkpoint_every=100, progress=False)
    task = distill.make_kd_task(t_cfg, teacher.params, s_cfg, train_imgs,
                                rec["lambda"], tc, args.crop,
                                distill.KDConfig(
                                    beta_out=args.beta_out,
                                    beta_feat=args.beta_feat,
                                    teacher_trainable=False,
                                    frozen=distill.ENCODER_SIDE
                                    if args.encoder == "frozen" else ()))
    state = trainer.train(task, tc, os.path.join(args.workdir, name))
    student = codec.Codec.from_params(
        s_cfg, jax.device_get(state.params["student"]))
    row = {"model": name, "lambda": rec["lambda"], "steps": args.steps,
           "teacher": real_point(teacher, images),
           "student": real_point(student, images),
           "teacher_dec_macs": distill.decoder_flops(t_cfg, 512, 768),
           "student_dec_macs": distill.decoder_flops(s_cfg, 512, 768)}
    if args.prune_steps > 0:
      row.update(prune_step(args, name, rec["lambda"], t_cfg, teacher,
                            s_cfg, jax.device_get(state.params["student"]),
                            train_imgs, images))
    rows.append(row)
    print(f"{name}: teacher {row['teacher']}, student {row['student']},"
          f" decoder MACs {row['student_dec_macs'] / row['teacher_dec_macs']:.3f}"
          " of the teacher's", flush=True)
  try:
    bd = bdrate.bd_rate([r["teacher"]["bpp"] for r in rows],
                        [r["teacher"]["psnr"] for r in rows],
                        [r["student"]["bpp"] for r in rows],
                        [r["student"]["psnr"] for r in rows]).as_dict()
  except ValueError as e:  # e.g. no PSNR overlap: say so, keep the table
    bd = {"value": float("nan"), "lo": float("nan"), "hi": float("nan"),
          "overlap": 0.0, "error": str(e)}
  bd_p = None
  if rows and "pruned" in rows[0]:
    try:
      bd_p = bdrate.bd_rate([r["teacher"]["bpp"] for r in rows],
                            [r["teacher"]["psnr"] for r in rows],
                            [r["pruned"]["bpp"] for r in rows],
                            [r["pruned"]["psnr"] for r in rows]).as_dict()
    except ValueError as e:
      bd_p = {"value": float("nan"), "error": str(e)}
  res = {"rows": rows, "bd_rate_student_vs_teacher": bd,
         "bd_rate_pruned_vs_teacher": bd_p,
         "images": sorted(images), "seconds": time.perf_counter() - t0,
         "args": vars(args)}
  io.write_json(args.out + ".json", res)
  lines = ["# KD study: narrower decoder students of the shipped codecs",
           "", f"Command: `python benchmarks/kd_study.py --steps {args.steps}"
           f" --prune-steps {args.prune_steps}"
           f" --crop {args.crop} --batch {args.batch} --lr {args.lr:g}"
           f" --lr-schedule {args.lr_schedule}"
           f" --encoder {args.encoder} --width {args.width:g}"
           + ("" if args.beta_out is None else f" --beta-out {args.beta_out:g}")
           + ("" if args.beta_feat is None
              else f" --beta-feat {args.beta_feat:g}")
           + ("" if args.models == "all" else f" --models {args.models}")
           + ("" if args.train_folder is None
              else f" --train-folder {args.train_folder}")
           + f"`; held-out photos: {len(images)}; real .jlic bitstreams.",
           "",
           "| model | lambda | teacher bpp | teacher PSNR | student bpp |"
           " student PSNR | decoder MACs, student / teacher |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['lambda']:g} | {r['teacher']['bpp']:.4f} |"
        f" {r['teacher']['psnr']:.2f} | {r['student']['bpp']:.4f} |"
        f" {r['student']['psnr']:.2f} |"
        f" {r['student_dec_macs'] / r['teacher_dec_macs']:.3f} |")
  b = res["bd_rate_student_vs_teacher"]
  if "error" in b:
    lines += ["", f"BD-rate of the student against the teacher: not"
              f" computable ({b['error']})."]
  else:
    lines += ["", f"BD-rate of the student against the teacher (pchip,"
              f" PSNR): **{b['value']:+.2f} %** over [{b['lo']:.2f},"
              f" {b['hi']:.2f}] dB (overlap {b['overlap']:.2f})."]
  if bd_p is not None:
    lines += ["", "Step (iii), pruned students (real .jlic files of the"
              " standalone pruned model):", "",
              "| model | cut | bpp | PSNR | decoder MACs / teacher |",
              "|---|---|---|---|---|"]
    for r in rows:
      lines.append(
          f"| {r['model']} | {', '.join(r['pruned_cut'])} |"
          f" {r['pruned']['bpp']:.4f} | {r['pruned']['psnr']:.2f} |"
          f" {r['pruned_dec_macs'] / r['teacher_dec_macs']:.3f} |")
    lines += ["", "BD-rate of the pruned students against the teacher: "
              + (f"not computable ({bd_p['error']})." if "error" in bd_p
                 else f"**{bd_p['value']:+.2f} %**.")]
  io.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
