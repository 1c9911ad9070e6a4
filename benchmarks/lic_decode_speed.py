r"""Decode speed: Fu et al.'s improved checkerboard against a serial context.

  .venv/bin/python benchmarks/lic_decode_speed.py [--N 128] [--M 192] \
      [--height 512] [--width 768] [--reps 3] [--json OUT] [--quick]

Goal (issue 6; brief learned_image_compression.md §1, §5): the checkerboard
codec (arXiv 2309.02529: anchors EP_a(psi) with a K=3 GMM, non-anchors
EP_n(psi, ctx) Gaussian, two-pass range coding) decodes >= 30x faster than a
serial autoregressive context model of the same size (Minnen 2018: masked 5x5
context + EP, position-by-position decoding); the paper claims 70-90x against
"the SOTA learned codec" (GLLMM on a GPU, unverified).

What is timed, per 768x512 image on the CPU (jax's default backend here):
  * compress and decompress wall time including range coding, excluding jit
    compilation (one warm-up image per codec first), median of --reps;
  * "y decode": the part of decompress that decodes y (parameter networks +
    range decoding, both passes or all positions), without z, h_s and g_s;
  * the decoders run the same codec core (mean-scale hyperprior transforms,
    N and M as given) and differ only in the context model.
Codecs: "checkerboard" (gmm anchors / gaussian non-anchors, the library
default), "checkerboard-gauss" (gaussian / gaussian: the table-coded variant,
to isolate the cost of per-symbol GMM rows, brief pitfall 9) and "serial".
Weights are random (no trained model exists offline): network time does not
depend on weight values, but entropy-coding time depends on the symbols, so
the weights are calibrated to give trained-looking symbols (per-channel gains
of y, predicted scales matched to them, parameters varying over positions;
see `_calibrate`); the resulting bpp is printed, it is not a rate-distortion
result.
Channel skipping: the checkerboard codec with --planted of its M channels
forced to zero (their g_a output and, for the Gaussian set, predicted mean
zeroed), decoded with skipping on (bitmap, channels not coded) and off.
The image is china.jpg (scikit-learn) resized to --width x --height.
`--compressai`: also time CompressAI's serial context model of the same size
(`JointAutoregressiveHierarchicalPriors(N, M)`, Minnen 2018, PyTorch, its own
rANS coder, position-by-position decoding in Python; random weights after
`update()`), the reference implementation serial decode times are usually
quoted for; needs CompressAI beside the venv (see lic_vs_compressai.py) and
PYTHONPATH pointing at it.
`--quick` shrinks everything to check the script (numbers then mean nothing).
Record the output in benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time
from PIL import Image

from jaxlib_models.compression import codec, data, entropy, hyperprior


def _image(w, h):
  path = data.builtin_photos()["china"]
  img = Image.fromarray(data.load_image(path)).resize((w, h),
                                                      Image.BILINEAR)
  return np.asarray(img, np.uint8)


def _calibrate(params, cfg, args, planted=()):
  """Random weights made to look like a trained model's statistics (library
  choice, for the coder's sake): channel c of y gets a gain g_c, log-uniform
  in [args.gain_min, args.gain_max] (energy concentrated in few channels);
  every predicted scale of channel c gets + 0.8 g_c (about y_c's std at
  gain 1); the parameter networks' output layers are multiplied by
  args.param_spread so that means and scales vary over positions (a
  trained model's rows are rarely repeated). Planted channels: y_c = 0 and,
  for single-kind sets, mu_c = 0."""
  p = jax.tree.map(np.array, params)
  m, k = cfg.M, cfg.mixture_components
  rng = np.random.default_rng(0)
  gain = np.exp(rng.uniform(np.log(args.gain_min), np.log(args.gain_max), m))
  p["g_a3"]["kernel"] *= gain.astype(np.float32)
  p["g_a3"]["bias"] *= gain.astype(np.float32)
  if cfg.context == "serial":
    heads = [p["serial"]["entropy_parameters"]["conv2"]], [cfg.kind]
  else:
    heads = ([p["ckbd"]["ep_anchor"]["conv2"], p["ckbd"]["ep_nonanchor"][
        "conv2"]], [cfg.anchor_family, cfg.nonanchor_family])
  for conv, fam in zip(*heads):
    conv["kernel"] *= args.param_spread
    conv["bias"] *= args.param_spread
    reps = k if entropy.is_mixture(fam) else 1
    conv["bias"][:reps * m] += np.tile(0.8 * gain, reps).astype(np.float32)
    if planted and not entropy.is_mixture(fam):
      conv["kernel"][..., [m + c for c in planted]] = 0.0
      conv["bias"][[m + c for c in planted]] = 0.0
  if planted:
    p["g_a3"]["kernel"][..., list(planted)] = 0.0
    p["g_a3"]["bias"][list(planted)] = 0.0
  return p


def _build(args, planted=(), **kw):
  cfg = hyperprior.HyperpriorConfig(N=args.N, M=args.M, **kw)
  model = hyperprior.Hyperprior(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 64, 64, 3)))["params"]
  params = _calibrate(params, cfg, args, planted)
  return codec.Codec.from_params(cfg, params)


def _y_decode_fn(cod, blob):
  """Decodes only y from a file (parameter nets + range decoding)."""
  h, w, zh, zw, occ, z_data, y_data = codec._parse(cod, blob)
  from jaxlib_models.compression import bottleneck  # noqa: PLC0415

  z_hat = bottleneck.decode_z(z_data, (1, zh, zw, cod.model.cfg.N),
                              cod.z_table, cod.z_medians)
  psi = cod._psi(z_hat)
  p = cod._ctx_params()
  return lambda: cod.y_coder.decode_y(p, y_data, psi, occ)


def _time_codec(name, cod, img, reps, skip=None):
  blob, recon = codec.compress(cod, img, skip_channels=skip)  # Warm-up.
  out = codec.decompress(cod, blob)
  if not np.array_equal(out, recon):
    raise AssertionError(f"{name}: decoded image differs from the encoder's")
  y_dec = _y_decode_fn(cod, blob)
  y_dec()
  enc_s = median_time(lambda: codec.compress(cod, img, skip_channels=skip),
                       reps)
  dec_s = median_time(lambda: codec.decompress(cod, blob), reps)
  ydec_s = median_time(y_dec, reps)
  h, w = img.shape[:2]
  row = {"encode_s": enc_s, "decode_s": dec_s, "y_decode_s": ydec_s,
         "bytes": len(blob), "bpp": 8 * len(blob) / (h * w)}
  print(f"  {name:24s} encode {enc_s:7.3f} s  decode {dec_s:7.3f} s  "
        f"(y decode {ydec_s:7.3f} s)  {row['bpp']:.3f} bpp", flush=True)
  return row


def _time_compressai(args, img):
  """CompressAI's serial AR codec (mbt2018) on the same image, or None."""
  try:
    import torch  # noqa: PLC0415
    from compressai.models import (  # noqa: PLC0415
        JointAutoregressiveHierarchicalPriors)
  except ImportError as e:
    print(f"  CompressAI not importable ({e}): its row is skipped; see "
          "lic_vs_compressai.py --help for the side install", flush=True)
    return None
  from lic_vs_compressai import time_compressai  # noqa: PLC0415

  torch.manual_seed(0)
  row = time_compressai(JointAutoregressiveHierarchicalPriors(args.N, args.M),
                        img, args.reps)
  h, w = img.shape[:2]
  row.update(bpp=8 * row["bytes"] / (h * w), torch=torch.__version__)
  print(f"  {'compressai-serial':24s} encode {row['encode_s']:7.3f} s  decode "
        f"{row['decode_s']:7.3f} s  {row['bpp']:.3f} bpp", flush=True)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--N", type=int, default=128)
  ap.add_argument("--M", type=int, default=192)
  ap.add_argument("--height", type=int, default=512)
  ap.add_argument("--width", type=int, default=768)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--gain-min", type=float, default=0.05)
  ap.add_argument("--gain-max", type=float, default=3.0)
  ap.add_argument("--param-spread", type=float, default=2.0)
  ap.add_argument("--planted", type=float, default=0.5,
                  help="share of channels forced to zero (skipping part)")
  ap.add_argument("--json", default="")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--compressai", action="store_true",
                  help="also time CompressAI's serial context model (mbt2018)")
  args = ap.parse_args(argv)
  if args.quick:
    args.N, args.M, args.height, args.width, args.reps = 8, 12, 64, 128, 1
  load = os.getloadavg()[0]
  dev = jax.devices()[0]
  info = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
          "machine": f"{platform.machine()} {platform.processor() or ''} "
                     f"{os.cpu_count()} cpus".strip(),
          "device": f"{dev.platform}:{dev.device_kind}",
          "jax": jax.__version__, "load_avg_1min": load,
          "N": args.N, "M": args.M, "size": [args.height, args.width],
          "reps": args.reps, "dtype": "float32"}
  print(json.dumps(info), flush=True)
  if load > 0.5:
    print(f"warning: 1-min load average {load:.2f}: other processes use the "
          "CPU, timings are inflated", flush=True)
  img = _image(args.width, args.height)
  res = {"info": info, "codecs": {}}
  print(f"{args.width}x{args.height}, N={args.N}, M={args.M}, random "
        f"calibrated weights, median of {args.reps}:", flush=True)
  variants = {
      "checkerboard": dict(context="checkerboard"),
      "checkerboard-gauss": dict(context="checkerboard",
                                 anchor_family="gaussian"),
      "serial": dict(context="serial"),
  }
  for name, kw in variants.items():
    res["codecs"][name] = _time_codec(name, _build(args, **kw), img,
                                      args.reps)
  c, s = res["codecs"]["checkerboard"], res["codecs"]["serial"]
  g = res["codecs"]["checkerboard-gauss"]
  res["ratio_decode"] = s["decode_s"] / c["decode_s"]
  res["ratio_y_decode"] = s["y_decode_s"] / c["y_decode_s"]
  res["ratio_decode_gauss"] = s["decode_s"] / g["decode_s"]
  res["ratio_y_decode_gauss"] = s["y_decode_s"] / g["y_decode_s"]
  print(f"serial / checkerboard decode time: {res['ratio_decode']:.2f}x "
        f"(y decode only {res['ratio_y_decode']:.2f}x); with gaussian "
        f"anchors {res['ratio_decode_gauss']:.2f}x "
        f"({res['ratio_y_decode_gauss']:.2f}x); goal >= 30x, paper 70-90x",
        flush=True)
  if args.compressai:
    row = _time_compressai(args, img)
    if row is not None:
      res["codecs"]["compressai-serial"] = row
      res["ratio_decode_vs_compressai_serial"] = (row["decode_s"]
                                                  / c["decode_s"])
      print(f"CompressAI serial / our checkerboard decode time: "
            f"{res['ratio_decode_vs_compressai_serial']:.1f}x", flush=True)
  n_planted = int(round(args.planted * args.M))
  planted = tuple(range(0, args.M, max(1, args.M // max(n_planted, 1))))
  planted = planted[:n_planted]
  cod = _build(args, planted=planted, context="checkerboard")
  print(f"channel skipping, checkerboard, {len(planted)} of {args.M} channels "
        "planted zero:", flush=True)
  res["skipping"] = {"planted": len(planted)}
  for name, skip in (("skip on", True), ("skip off", False)):
    res["skipping"][name] = _time_codec(name, cod, img, args.reps, skip)
  on, off = res["skipping"]["skip on"], res["skipping"]["skip off"]
  print(f"skipping: decode {off['decode_s'] / on['decode_s']:.2f}x faster "
        f"(y decode {off['y_decode_s'] / on['y_decode_s']:.2f}x), "
        f"{off['bytes'] - on['bytes']} bytes saved", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
