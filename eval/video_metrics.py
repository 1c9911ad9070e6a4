r"""Warp errors and CLIP scores of an edited video against its source.

  python -m eval.video_metrics --source SRC.mp4 --edited EDIT.mp4 \
      --prompt "a van gogh painting" --clip-folder CLIP_DIR --flow dis \
      --out report.json

SRC / EDIT are video files or folders of frames. Always computed: the
StreamV2V warp error (mean L1, 0-255) and the Lai et al. E_warp (squared, on
[0, 1]), both with flow on the source; with --clip-folder (a transformers
CLIPModel folder, e.g. openai/clip-vit-base-patch32): Tem-Con, and Pro-Ali
when --prompt is given (cosines x1). Writes the JSON report and a PNG of the
per-pair warp errors next to it (--plot to choose). Metric names carry the
variant, the flow estimator and the CLIP model; the reference numbers use
RAFT flow and CLIP weights that are not available offline, so compare only
runs with the same names.
"""

import argparse
import os
import sys
import time


def _plot(results, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxlib_models.core import io as core_io

  fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.6 * len(results)),
                           squeeze=False)
  for ax, r in zip(axes[:, 0], results):
    ax.plot(range(len(r.per_pair)), r.per_pair, marker=".")
    ax.set_ylabel(r.name, fontsize=7)
    ax.axhline(r.value, color="gray", lw=0.8, ls="--")
  axes[-1, 0].set_xlabel("frame pair (i, i+1)")
  axes[0, 0].set_title(title, fontsize=8)
  core_io.save_figure(fig, path)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m eval.video_metrics", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--source", required=True,
                  help="source video file or folder of frames")
  ap.add_argument("--edited", required=True,
                  help="edited video file or folder (resized to the source)")
  ap.add_argument("--prompt", default=None,
                  help="edit prompt for CLIP Pro-Ali (needs --clip-folder)")
  ap.add_argument("--clip-folder", default=None,
                  help="transformers CLIPModel folder (safetensors + config"
                  " + tokenizer files); enables the CLIP metrics")
  ap.add_argument("--flow", default="dis", choices=("dis", "farneback"),
                  help="flow estimator on the source video (default dis)")
  ap.add_argument("--max-frames", type=int, default=None,
                  help="use only the first N frames")
  ap.add_argument("--fps", type=float, default=None,
                  help="frame rate of folder videos (default 30)")
  ap.add_argument("--batch-size", type=int, default=16,
                  help="frames per CLIP image-encoder call")
  ap.add_argument("--out", required=True, help="report JSON path")
  ap.add_argument("--plot", default=None,
                  help="per-pair warp-error PNG (default: --out with .png)")
  args = ap.parse_args(argv)
  if args.prompt and not args.clip_folder:
    ap.error("--prompt needs --clip-folder (a CLIP model for Pro-Ali)")

  from jaxlib_models.core import io as core_io
  from jaxlib_models.video import io as vio
  from jaxlib_models.video.flow import estimators
  from jaxlib_models.video.metrics import warp_error

  t0 = time.time()
  try:
    src, src_fps = vio.read_video(args.source, args.max_frames, fps=args.fps)
    edit, edit_fps = vio.read_video(args.edited, args.max_frames,
                                    fps=args.fps)
  except vio.VideoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(edit) < 2 or len(src) < len(edit):
    print(f"error: need >= 2 edited frames and at least as many source"
          f" frames (source {len(src)}, edited {len(edit)})", file=sys.stderr)
    return 2
  est = estimators.get_flow_estimator(args.flow)
  flows = estimators.compute_flows(src[:len(edit)], est)
  results = list(warp_error.warp_errors(src, edit, est.name,
                                        flows=flows).values())
  report = {
      "source": os.path.abspath(args.source),
      "edited": os.path.abspath(args.edited),
      "num_frames": int(len(edit)),
      "source_size_hw": list(src.shape[1:3]),
      "edited_size_hw": list(edit.shape[1:3]),
      "fps": {"source": src_fps, "edited": edit_fps},
      "flow": est.name,
      "metrics": {},
  }
  for r in results:
    report["metrics"].update(r.as_dict())
  if args.clip_folder:
    from jaxlib_models.video.metrics import clip_score

    model = clip_score.load_clip_model(args.clip_folder)
    report["clip_model"] = model.name
    report["clip_resize"] = clip_score.RESIZE
    scores = [clip_score.clip_frame_consistency(edit, model,
                                                args.batch_size)]
    if args.prompt:
      report["prompt"] = args.prompt
      scores.append(clip_score.clip_text_alignment(edit, args.prompt, model,
                                                   args.batch_size))
    for s in scores:
      report["metrics"].update(s.as_dict())
  report["wall_s"] = round(time.time() - t0, 3)
  core_io.write_json(args.out, report)
  plot = args.plot or os.path.splitext(args.out)[0] + ".png"
  _plot(results, plot, f"{os.path.basename(args.edited)} vs"
        f" {os.path.basename(args.source)}")
  for k, v in report["metrics"].items():
    if isinstance(v, float):
      print(f"{k}: {v:.4f}")
  print(f"wrote {args.out} and {plot} ({report['wall_s']:.1f} s)",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
