r"""Mean-scale hyperprior on the photographs shipped by installed packages.

  python -m train --config=configs/compression/hyperprior.py --workdir=runs/hp
  python -m eval --config=configs/compression/hyperprior.py --workdir=runs/hp
  --config.data.folder=/path/to/kodak  (any folder of PNGs; then set
  --config.data.eval_names to the held-out file stems)

Without scikit-image only three photos exist (china, flower, grace_hopper):
training on them is a smoke test, not a model (issue 6 is open: corpus,
trained models and the RD harness are still to come).
default: N=128, M=192, lambda 0.0067, 256^2 crops, batch 8, 20k steps (hours
  on a CPU; untested at this size).
tiny: N=8, M=12, 64^2 crops, batch 2, 4 steps, eval crop 96 (seconds).
"""

import ml_collections

from jaxlib_models.core.trainer import parallel_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "compression"
  c.model = dict(N=128, M=192, kind="gaussian")
  c.loss = dict(lam=0.0067)
  c.data = dict(folder="", eval_names=("grace_hopper",), crop=256, seed=0,
                eval_crop=0)
  c.train = dict(num_steps=20000, batch_size=8, learning_rate=1e-4,
                 log_every=100, checkpoint_every=1000, progress=True,
                 **parallel_defaults())
  if arg == "tiny":
    c.model.update(N=8, M=12)
    c.data.update(crop=64, eval_crop=96)
    c.train.update(num_steps=4, batch_size=8, log_every=2,
                   checkpoint_every=2, learning_rate=1e-3)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}: choose '' or 'tiny'")
  return c
