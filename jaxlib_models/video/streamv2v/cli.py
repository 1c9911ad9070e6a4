"""`video2video`: stream a video (file, folder of frames or webcam) through
StreamV2V and write the edited video.

  video2video in.mp4 out.mp4 --prompt "a watercolor painting" \\
      --model SD15_FOLDER [--taesd TAESD_FOLDER] [--lora LCM_LORA.safetensors]
  video2video frames/ out/ --prompt "..." --random tiny     # plumbing only
  video2video --webcam 0 out.mp4 --prompt "..." --model SD15_FOLDER

Weights: a diffusers Stable Diffusion 1.5 folder (unet/, vae/,
text_encoder/, tokenizer/, safetensors); StreamV2V uses SD 1.5 with the
LCM-LoRA fused (`--lora`) and TAESD for encoding and decoding (`--taesd`;
without it the folder's VAE is used). Converted parameters are cached
(`JAXLIB_MODELS_CACHE`, default ~/.cache/jaxlib_models), so the second start
skips conversion. Nothing is downloaded. `--random sd15|tiny` runs the
architecture with random weights (speed and plumbing; the output is noise).

Output frame n is the edit of input frame n: the stream's 3-frame latency is
absorbed by dropping the first outputs and flushing with the last frame.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _size(s: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in s.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--size {s!r}: want WIDTHxHEIGHT, e.g. 512x512") from None
  return h, w


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="video2video", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("paths", nargs="+", metavar="[INPUT] OUTPUT",
                  help="INPUT: video file or folder of frames (omit with"
                  " --webcam); OUTPUT: .mp4/.avi file, or a folder for PNG"
                  " frames")
  ap.add_argument("--prompt", required=True, help="the edit, as SD text")
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--model", help="diffusers SD-1.5 folder")
  src.add_argument("--random", choices=["tiny", "sd15"],
                   help="random weights of this architecture (no model)")
  ap.add_argument("--taesd", help="diffusers AutoencoderTiny folder (TAESD)")
  ap.add_argument("--lora", action="append", default=[],
                  help="LoRA .safetensors to fuse (kohya or PEFT keys);"
                  " repeatable, e.g. LCM-LoRA then a style")
  ap.add_argument("--lora-scale", type=float, action="append", default=[],
                  help="scale of each --lora (default 1.0)")
  ap.add_argument("--webcam", type=int, default=None, metavar="INDEX",
                  help="read camera INDEX instead of a file")
  ap.add_argument("--size", type=_size, default=None, metavar="WxH",
                  help="resize frames (multiples of 64 for SD-1.5)")
  ap.add_argument("--max-frames", type=int, default=None)
  ap.add_argument("--fps", type=float, default=None,
                  help="output frame rate (default: the input's)")
  ap.add_argument("--steps", type=int, default=4, help="denoising steps")
  ap.add_argument("--strength", type=float, default=0.4,
                  help="SDEdit strength (0.4: t = 399, 299, 199, 99)")
  ap.add_argument("--seed", type=int, default=2)
  ap.add_argument("--no-bank", action="store_true",
                  help="per-frame editing (no feature bank)")
  ap.add_argument("--dtype", default="float32",
                  choices=["float32", "bfloat16", "float16"])
  ap.add_argument("--winograd", default="auto",
                  choices=["auto", "off", "2", "4"],
                  help="UNet 3x3 convolutions by Winograd F(m x m, 3 x 3)"
                  " with kernels transformed at load (auto: on CPU in"
                  " float32; the SD-1.5 UNet step ran 1.36x faster on a"
                  " 2-core Zen 3 with ~2 GB more memory; off: XLA's"
                  " convolutions)")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  want = 1 if args.webcam is not None else 2
  if len(args.paths) != want:
    print("video2video: give INPUT OUTPUT, or --webcam INDEX OUTPUT",
          file=sys.stderr)
    return 2
  args.input = None if args.webcam is not None else args.paths[0]
  args.output = args.paths[-1]
  if args.model is None and args.random is None:
    print("video2video: give --model FOLDER (diffusers SD-1.5) or --random"
          " tiny|sd15", file=sys.stderr)
    return 2
  # Imported late: `--help` stays instant.
  from jaxlib_models.video import io as vio  # pylint: disable=g-import-not-at-top
  from jaxlib_models.video.streamv2v import pipeline as pl  # pylint: disable=g-import-not-at-top
  from jaxlib_models.video.streamv2v import stream  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  try:
    if args.webcam is not None:
      frames = vio.open_webcam(args.webcam, args.max_frames, args.size)
      fps = args.fps or 30.0
    else:
      frames = vio.iter_frames(args.input, args.max_frames, args.size)
      fps = vio.video_fps(args.input, args.fps)
    first = next(iter(frames), None)
    if first is None:
      raise vio.VideoError(f"{args.input}: no frames")
    if args.random:
      models = pl.random_models(args.random, dtype=args.dtype)
    else:
      models = pl.load_models(args.model, taesd=args.taesd, loras=args.lora,
                              lora_scales=args.lora_scale, dtype=args.dtype)
    cfg = stream.StreamConfig(
        num_inference_steps=args.steps, strength=args.strength,
        seed=args.seed, bank=stream.BankConfig(enabled=not args.no_bank))
    h, w = first.shape[:2]
    pipe = pl.StreamV2VPipeline(
        models, cfg, height=h, width=w, prompt=args.prompt,
        winograd=(args.winograd if args.winograd in ("auto", "off")
                  else int(args.winograd)))
  except (ValueError, FileNotFoundError) as e:
    print(f"video2video: {e}", file=sys.stderr)
    return 1
  print(f"video2video: {w}x{h}, {models.description or args.model},"
        f" latency {cfg.latency} frames", file=sys.stderr)

  def all_frames():
    yield first
    yield from frames

  lat = cfg.latency
  n_in = n_out = 0
  t_start = None
  last = first
  bar = tqdm(total=args.max_frames, unit="frame", disable=args.no_progress,
             desc="video2video")
  with vio.VideoWriter(args.output, fps=fps) as writer:
    def emit(out):
      nonlocal n_out
      writer.write(np.asarray(out))
      n_out += 1

    for fr in all_frames():
      out = pipe(fr)
      last = fr
      n_in += 1
      if n_in > lat:
        emit(out)
      if n_in == 1:  # exclude the compilation from the FPS
        np.asarray(out)
        t_start = time.perf_counter()
      elif t_start is not None:
        bar.set_postfix(fps=f"{(n_in - 1) / (time.perf_counter() - t_start):.2f}")
      bar.update(1)
    for _ in range(min(lat, n_in)):  # flush the stream with the last frame
      emit(pipe(last))
  bar.close()
  dt = time.perf_counter() - t_start if t_start else 0.0
  rate = (n_in - 1) / dt if dt > 0 and n_in > 1 else float("nan")
  print(f"video2video: {n_in} frames in, {n_out} out -> {args.output}"
        f" ({rate:.2f} FPS after compilation)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
