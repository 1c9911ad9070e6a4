r"""One full-size SD-1.5 UNet step: our Flax UNet against diffusers' PyTorch.

  .venv/bin/python benchmarks/sd_unet_speed.py [--size 512] [--batch 4]
      [--reps 2] [--dtype float32] [--winograd auto] [--json OUT]

Both sides run the real SD-1.5 architecture (`UNet2DConditionModel` with
block_out_channels (320, 640, 1280, 1280), cross-attention dim 768, 8 heads)
with the SAME random weights: diffusers builds the model, its state dict goes
through our converter (`unet_params_from_state`), so the run doubles as a
full-size parity check (max abs difference printed). Speed does not depend
on weight values. Inputs: latents (B, size/8, size/8, 4), the StreamV2V slot
timesteps [399, 299, 199, 99] (cycled), text states (B, 77, 768).

XLA_FLAGS defaults to `--xla_cpu_use_xnnpack=true` when unset (about 8 %
faster on this UNet; `--no-xla-flags` to measure without).

Ours: the 3x3 convolutions take the Winograd route (`diffusion.winograd`,
kernels transformed once before timing, as `StreamV2VPipeline` does on CPU;
`--winograd off` for XLA's convolutions).

diffusers: `torch.inference_mode()`, default SDPA attention,
`torch.set_num_threads(os.cpu_count())`; ours: one jitted `apply` (XLA
attention). One untimed warm-up each (our compile time is printed apart),
then the median of --reps calls. Ratio > 1: ours faster. Issue 7's goal on
the 2-core CPU: >= 1.3x at 512x512, batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# XLA:CPU runs this UNet ~8 % faster with XNNPACK (measured 11.2 vs 12.1 s on
# 2 cores); set before jax is imported, and only when the user set no flags.
CPU_FLAGS = "--xla_cpu_use_xnnpack=true"
if "--no-xla-flags" not in os.sys.argv:
  os.environ.setdefault("XLA_FLAGS", CPU_FLAGS)

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time
from jaxlib_models.diffusion import unet as unet_lib

SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--size", type=int, default=512,
                  help="image side in pixels (latents are size/8)")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--dtype", default="float32",
                  choices=["float32", "bfloat16"], help="our compute dtype")
  ap.add_argument("--winograd", default="auto",
                  choices=["auto", "2", "4", "off"],
                  help="prepare the 3x3 convolutions for the Winograd route"
                  " (diffusion.winograd: auto = F(4x4) up to 640 output"
                  " channels, F(2x2) above; 'off': XLA's convolutions)")
  ap.add_argument("--json", default=None, help="write the figures here")
  ap.add_argument("--no-xla-flags", action="store_true",
                  help=f"do not default XLA_FLAGS to {CPU_FLAGS!r}")
  args = ap.parse_args(argv)
  if args.size % 64:
    ap.error(f"--size {args.size} must be a multiple of 64")

  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  print("building diffusers UNet (random weights)...", flush=True)
  ref = UNet2DConditionModel(**SD15).eval()
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  n_params = sum(v.size for v in state.values())
  cfg = unet_lib.UNetConfig.from_diffusers_dict(dict(ref.config))
  cfg = unet_lib.UNetConfig(**{**cfg.__dict__, "dtype": args.dtype})
  t0 = time.perf_counter()
  params = unet_lib.unet_params_from_state(cfg, state)
  t_convert = time.perf_counter() - t0
  del state
  t_prepare = 0.0
  if args.winograd != "off":
    from jaxlib_models.diffusion import winograd  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    tile = args.winograd if args.winograd == "auto" else int(args.winograd)
    params = winograd.prepare_params(params, tile)
    t_prepare = time.perf_counter() - t0
    print(f"prepared {winograd.prepared_count(params)} 3x3 kernels for the"
          f" Winograd route ({t_prepare:.1f} s)", flush=True)
  params = jax.device_put(params)
  param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))

  b, h = args.batch, args.size // 8
  rng = np.random.default_rng(0)
  lat = rng.standard_normal((b, 4, h, h)).astype(np.float32)
  ts = np.array([399, 299, 199, 99] * (b // 4 + 1))[:b]
  ctx = rng.standard_normal((b, 77, 768)).astype(np.float32)

  model = unet_lib.UNet2DConditionModel(cfg)
  fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  x_j = jnp.asarray(lat.transpose(0, 2, 3, 1))
  t_j, c_j = jnp.asarray(ts), jnp.asarray(ctx)
  t0 = time.perf_counter()
  compiled = fn.lower(params, x_j, t_j, c_j).compile()
  t_compile = time.perf_counter() - t0
  ours_out = None

  def ours():
    nonlocal ours_out
    ours_out = compiled(params, x_j, t_j, c_j).block_until_ready()

  x_t, t_t, c_t = map(torch.from_numpy, (lat, ts, ctx))
  ref_out = None

  def theirs():
    nonlocal ref_out
    with torch.inference_mode():
      ref_out = ref(x_t, t_t, encoder_hidden_states=c_t).sample

  print(f"timing (batch {b}, {args.size}x{args.size}, {args.reps} reps)...",
        flush=True)
  t_ours = median_time(ours, args.reps, warmup=1)
  t_ref = median_time(theirs, args.reps, warmup=1)
  diff = float(np.abs(np.asarray(ours_out, np.float32).transpose(0, 3, 1, 2)
                      - ref_out.numpy()).max())
  scale = float(np.abs(ref_out.numpy()).max())
  res = dict(
      benchmark="sd15_unet_step", size=args.size, batch=b,
      dtype_ours=args.dtype, dtype_ref="float32", params=n_params,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      ours_s=t_ours, diffusers_s=t_ref, speedup=t_ref / t_ours,
      ours_compile_s=t_compile, convert_s=t_convert,
      winograd=args.winograd, winograd_prepare_s=t_prepare,
      ours_param_bytes=param_bytes,
      max_abs_diff=diff, out_max_abs=scale,
      machine=f"{platform.processor() or platform.machine()},"
      f" {os.cpu_count()} cores", backend=jax.default_backend(),
      versions=dict(jax=jax.__version__, torch=torch.__version__))
  print(f"SD-1.5 UNet, {n_params / 1e6:.0f}M params, batch {b} at"
        f" {args.size}x{args.size}")
  print(f"  ours (Flax, {args.dtype}, Winograd {args.winograd}):"
        f" {t_ours:8.2f} s/step  (compile {t_compile:.1f} s, convert"
        f" {t_convert:.1f} s, params {param_bytes / 2**30:.1f} GiB)")
  print(f"  diffusers (PyTorch fp32): {t_ref:8.2f} s/step")
  print(f"  speedup: {t_ref / t_ours:.2f}x   max |diff| {diff:.2e} (outputs"
        f" up to {scale:.2f})")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(res, fh, indent=1)
  return res


if __name__ == "__main__":
  main()
