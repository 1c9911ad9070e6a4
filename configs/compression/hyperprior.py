r"""Mean-scale hyperprior (Balle 2018 / Minnen 2018), trained on the corpus.

  python -m train --config=configs/compression/hyperprior.py --workdir=runs/hp
  python -m eval --config=configs/compression/hyperprior.py --workdir=runs/hp
  jlic encode in.png out.jlic --checkpoint runs/hp \
      --config configs/compression/hyperprior.py

Data (data.source="corpus"): training photos from Debian's libjxl-testdata
(`apt-get install libjxl-testdata`) or --config.data.train_folder=DIR of
PNGs; evaluation on the 12 held-out package photos (compression.data). A
folder of your own (e.g. Kodak) for both: --config.data.folder=DIR
--config.data.eval_names="('kodim01',...)".
default: N=128, M=192, lambda 0.0067, 256^2 crops, batch 8, 20k steps (a GPU
  job; on 2 CPU cores about 1.6 s per step).
tiny: N=8, M=12, the package photos (grace_hopper held out), 64^2 crops, 4
  steps, eval crop 96 (seconds; a smoke test).
The shipped models (compression/pretrained) come from
`python -m jaxlib_models.compression.ship` (N=64, M=96; see its --help).
"""

import ml_collections

from jaxlib_models.core.trainer import parallel_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "compression"
  c.model = dict(N=128, M=192, kind="gaussian")
  c.loss = dict(lam=0.0067)
  c.data = dict(source="corpus", folder="", train_folder="", eval_names=(),
                crop=256, seed=0, eval_crop=0)
  c.train = dict(num_steps=20000, batch_size=8, learning_rate=1e-4,
                 log_every=100, checkpoint_every=1000, progress=True,
                 **parallel_defaults())
  if arg == "tiny":
    c.model.update(N=8, M=12)
    c.data.update(source="builtin", eval_names=("grace_hopper",), crop=64,
                  eval_crop=96)
    c.train.update(num_steps=4, batch_size=8, log_every=2,
                   checkpoint_every=2, learning_rate=1e-3)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}: choose '' or 'tiny'")
  return c
