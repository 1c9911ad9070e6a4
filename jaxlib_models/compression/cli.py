r"""jlic: encode and decode images with the library's learned codecs.

  jlic encode photo.png photo.jlic [--model hyperprior-q2]
  jlic decode photo.jlic out.png          (the model is found from the file)
  jlic models                             (the shipped models, with rates)
  jlic rd --out eval/compression_rd       (RD report: shipped models vs
                                           JPEG/WebP/AVIF/JPEG XL)
  jlic encode photo.png photo.jlic --refine 50
                                          (slower encoder, smaller file,
                                           same decoder: refine.py)

(also `python -m jaxlib_models.compression.cli ...`). `encode` reads any
image Pillow reads (PNG, JPEG, ...; grey and RGBA are converted to RGB) and
prints size, bpp and the PSNR of the decoder's reconstruction; the .jlic file
holds the model id, so `decode` picks the shipped model that wrote it (or the
one named by --model) and refuses a file written by another model. A
checkpoint of your own: `--checkpoint WORKDIR --config configs/compression/
hyperprior.py` (the trainer's workdir). Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import io as _io
import math
import os
import sys
import time

import numpy as np

from jaxlib_models.compression import codec as codec_lib
from jaxlib_models.compression import data, pretrained
from jaxlib_models.core import io


def _codec_from_args(args):
  if getattr(args, "checkpoint", ""):
    return _from_checkpoint(args.checkpoint, args.config)
  return pretrained.load(args.model)


def _from_checkpoint(workdir: str, config_path: str):
  import jax  # noqa: PLC0415

  from jaxlib_models.compression import entry  # noqa: PLC0415
  from jaxlib_models.core import config as config_lib  # noqa: PLC0415
  from jaxlib_models.core import trainer  # noqa: PLC0415

  if not config_path:
    raise SystemExit("--checkpoint needs --config (the config it was trained"
                     " with, e.g. configs/compression/hyperprior.py)")
  config = config_lib.load_config(config_path)
  cfg, _, tc, task = entry._setup(config)
  state, _, _ = trainer.restore_params(task, workdir, tc=tc)
  return codec_lib.Codec.from_params(cfg, jax.device_get(state.params))


def estimate_bits(cod, img) -> float:
  """The model's own rate for an image: -sum log2 P(y^) - sum log2 P(z^)
  at test-time rounding (what the coder should approach; the file adds the
  header, per-stream framing and the scale-table snapping)."""
  import jax.numpy as jnp  # noqa: PLC0415

  h, w = img.shape[:2]
  x = np.pad(img, ((0, -h % codec_lib.PAD), (0, -w % codec_lib.PAD), (0, 0)),
             mode="edge")
  out = cod.model.apply({"params": cod.params},
                        jnp.asarray(x[None] / 255.0, jnp.float32), None, False)
  return float(-(jnp.sum(jnp.log2(out["y_lik"]))
                 + jnp.sum(jnp.log2(out["z_lik"]))))


def _refine_config(args, lam: float):
  """The RefineConfig of --refine/--refine-lr at `lam`, None for
  --refine 0."""
  if not args.refine:
    return None
  from jaxlib_models.compression import refine  # noqa: PLC0415

  try:
    return refine.RefineConfig(lam=lam, steps=args.refine, lr=args.refine_lr)
  except ValueError as e:
    raise SystemExit(f"--refine: {e}") from None


def cmd_encode(args) -> int:
  rcfg = None
  if args.refine:
    if args.lam is None and args.checkpoint:
      raise SystemExit("--refine with --checkpoint needs --lam (the lambda"
                       " the checkpoint was trained with)")
    rcfg = _refine_config(args, args.lam if args.lam is not None
                          else pretrained.lam(args.model))
  img = data.load_image(args.input)
  cod = _codec_from_args(args)
  t0 = time.perf_counter()
  info = {}
  blob, recon = codec_lib.compress(cod, img, refine=rcfg, info=info)
  dt = time.perf_counter() - t0
  if "refine" in info:
    r = info["refine"]
    print(f"refinement ({rcfg.steps} steps): estimated bits {r['bits'][0]:,.0f}"
          f" -> {r['bits'][1]:,.0f}, objective {r['objective'][0]:.4f} ->"
          f" {r['objective'][1]:.4f}; kept the {r['kept']} latents")
  io.write_bytes(args.output, blob)
  h, w = img.shape[:2]
  mse = float(np.mean((recon.astype(np.float64) - img) ** 2))
  psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
  print(f"{args.output}: {len(blob):,} bytes, {8 * len(blob) / (h * w):.4f}"
        f" bpp, PSNR {psnr:.2f} dB ({w}x{h}, model {args.model if not args.checkpoint else args.checkpoint},"
        f" {dt:.2f} s)")
  return 0


def cmd_decode(args) -> int:
  if not os.path.exists(args.input):
    raise SystemExit(f"{args.input}: no such file")
  with open(args.input, "rb") as f:
    blob = f.read()
  if args.checkpoint:
    cod = _codec_from_args(args)
  elif args.model:
    cod = pretrained.load(args.model)
  else:
    mid = codec_lib.model_id_of(blob)
    name = pretrained.find_by_id(mid)
    if name is None:
      raise SystemExit(
          f"{args.input} was written by model {mid.hex()}, which is not a"
          f" shipped model ({', '.join(pretrained.names())}); pass"
          " --checkpoint/--config of the model that encoded it")
    cod = pretrained.load(name)
  t0 = time.perf_counter()
  img = codec_lib.decompress(cod, blob)
  dt = time.perf_counter() - t0
  from PIL import Image  # noqa: PLC0415

  buf = _io.BytesIO()
  fmt = os.path.splitext(args.output)[1].lstrip(".").upper() or "PNG"
  Image.fromarray(img).save(buf, format="JPEG" if fmt == "JPG" else fmt)
  io.write_bytes(args.output, buf.getvalue())
  print(f"{args.output}: {img.shape[1]}x{img.shape[0]} ({dt:.2f} s)")
  return 0


def cmd_models(args) -> int:
  del args
  for n in pretrained.names():
    rec = pretrained.info(n)
    c = rec["config"]
    print(f"{n}: lambda {rec['lambda']:g}, N={c['N']} M={c['M']},"
          f" {rec['steps']} steps on {rec['device']}"
          + (f" + {rec['continued_from']['steps']} earlier"
             if rec.get("continued_from") else "")
          + (f", checkerboard head ({c['anchor_family']} /"
             f" {c['nonanchor_family']}) on {rec['base']}"
             if rec.get("base") else ""))
  return 0


def cmd_rd(args) -> int:
  from jaxlib_models.compression import rd  # noqa: PLC0415

  images = data.eval_photos(args.photos.split(",") if args.photos else None)
  folder = args.models or pretrained.DIR
  names = pretrained.names(folder)
  if not names:
    raise SystemExit(f"no hyperprior_lam*.npz models in {folder} (write"
                     " them with python -m jaxlib_models.compression.ship)")
  if args.families:
    names = [n for n in names if n.split("-q")[0] in args.families.split(",")]
  where = ("shipped" if not args.models
           else os.path.basename(os.path.normpath(folder)))
  curves = {}
  for n in names:
    cod = pretrained.load(n, folder)
    fam = n.rsplit("-q", 1)[0]
    curves.setdefault(f"{fam} ({where})", []).append(rd.LearnedPoint(
        n, lambda img, c=cod: codec_lib.compress(c, img)[0],
        lambda b, c=cod: codec_lib.decompress(c, b),
        lambda img, c=cod: estimate_bits(c, img)))
    if args.refine and (not args.refine_families
                        or fam in args.refine_families.split(",")):
      curves.setdefault(
          f"{fam} ({where}) + refinement ({args.refine} steps)", []).append(
              _refined_point(n, cod,
                             _refine_config(args, pretrained.lam(n, folder))))
  res = rd.run_rd(images, curves, anchors=tuple(args.anchors.split(",")))
  files = rd.write_report(res, args.out)
  print("\n".join(f"wrote {v}" for v in files.values()))
  return 0


def _refined_point(name: str, cod, rcfg):
  """An RD point whose encoder refines the latents; its rate estimate is the
  refined latents' (kept from the encode of the same image)."""
  from jaxlib_models.compression import rd  # noqa: PLC0415

  est = {}

  def encode(img):
    info = {}
    blob, _ = codec_lib.compress(cod, img, refine=rcfg, info=info)
    r = info["refine"]
    est[hash(img.tobytes())] = r["bits"][r["kept"] == "refined"]
    return blob

  return rd.LearnedPoint(f"{name}+refine", encode,
                         lambda b: codec_lib.decompress(cod, b),
                         lambda img: est[hash(img.tobytes())])


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jlic", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  models = pretrained.names()
  default = pretrained.default_name()

  def model_args(sp, default_model):
    sp.add_argument("--model", default=default_model,
                    help=f"shipped model: {', '.join(models) or 'none found'}")
    sp.add_argument("--checkpoint", default="",
                    help="trainer workdir of your own model (needs --config)")
    sp.add_argument("--config", default="",
                    help="config file of --checkpoint")

  def refine_args(sp, lam: bool):
    sp.add_argument("--refine", type=int, default=0, metavar="STEPS",
                    help="optimize each image's latents for STEPS Adam steps"
                    " before coding (SGA; refine.py): a smaller file at the"
                    " same quality for the same decoder; at 50 steps about"
                    " a minute per 768x512 photo on 2 CPU cores (default 0:"
                    " off)")
    sp.add_argument("--refine-lr", type=float, default=0.01,
                    help="Adam learning rate of --refine (default"
                    " %(default)s)")
    if lam:
      sp.add_argument("--lam", type=float, default=None,
                      help="training lambda for --refine (default: the"
                      " shipped model's; required with --checkpoint)")

  e = sub.add_parser("encode", help="image -> .jlic")
  e.add_argument("input")
  e.add_argument("output")
  model_args(e, default)
  refine_args(e, True)
  e.set_defaults(fn=cmd_encode)
  d = sub.add_parser("decode", help=".jlic -> image (PNG by extension)")
  d.add_argument("input")
  d.add_argument("output")
  model_args(d, None)
  d.set_defaults(fn=cmd_decode)
  m = sub.add_parser("models", help="list the shipped models")
  m.set_defaults(fn=cmd_models)
  r = sub.add_parser("rd", help="rate-distortion report on the held-out photos")
  r.add_argument("--out", default="eval/compression_rd",
                 help="folder for rd.md, rd.json and rd.png (default"
                 " %(default)s)")
  r.add_argument("--photos", default="",
                 help="comma-separated subset of the evaluation photos")
  r.add_argument("--anchors", default="jpeg,webp,avif,jxl",
                 help="classical codecs measured on the same photos"
                 " (default %(default)s; avif and jxl are skipped with a"
                 " note when their encoder is not installed)")
  r.add_argument("--models", default="",
                 help="folder of hyperprior_lam*.npz/.json models (and"
                 " checkerboard_lam*.npz heads) written by compression.ship"
                 " (default: the shipped ones)")
  r.add_argument("--families", default="",
                 help="comma-separated model families to measure"
                 " (hyperprior, checkerboard; default: all found)")
  refine_args(r, False)
  r.add_argument("--refine-families", default="",
                 help="comma-separated families that get a --refine curve"
                 " (default: every measured family)")
  r.set_defaults(fn=cmd_rd)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (codec_lib.FormatError, FileNotFoundError, ValueError) as e:
    print(f"jlic {args.cmd}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
