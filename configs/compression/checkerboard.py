r"""Fu et al. (arXiv 2309.02529) preset: improved checkerboard context with two
parameter networks, per-set probability models, L1 latent sparsity and
channel skipping, on the mean-scale hyperprior transforms.

  python -m train --config=configs/compression/checkerboard.py --workdir=runs/ckbd
  python -m eval --config=configs/compression/checkerboard.py --workdir=runs/ckbd

Paper values unknown (brief learned_image_compression.md §3), our defaults:
anchors a 3-component Gaussian mixture (hyperprior only), non-anchors a
Gaussian (hyperprior + 5x5 context over decoded anchors); L1 weight 0.01 per
pixel; all-zero channels skipped with an M-bit occupancy map in the file.
Data as configs/compression/hyperprior.py (corpus: libjxl-testdata training
photos, 12 held-out package photos).
default: N=128, M=192, lambda 0.0067, 256^2 crops, batch 8, 20k steps (GPU).
tiny: N=8, M=12, package photos, 64^2 crops, 4 steps (smoke).
serial: the same transforms with the serial 5x5 autoregressive context
  (the slow baseline of benchmarks/lic_decode_speed.py).
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_jlm_hyperprior_config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "hyperprior.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  tiny = variant.endswith("tiny")
  c = base.get_config("tiny" if tiny else None)
  c.model.update(context="checkerboard", anchor_family="gmm",
                 nonanchor_family="gaussian", mixture_components=3,
                 skip_channels=True, l1_weight=0.01)
  if variant.startswith("serial"):
    c.model.update(context="serial", kind="gaussian", skip_channels=False)
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {arg!r}: choose '', 'tiny', 'serial'"
                     " or 'serial_tiny'")
  return c
