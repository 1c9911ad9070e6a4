r"""Trains one experiment config; resumes automatically from --workdir.

  python -m train --config=configs/spike_slab/sim.py:tiny --workdir=runs/x \
      [--config.train.num_steps=100 ...]

Every `--config.a.b=value` overrides a field of the config file (an unknown
key fails with its name and the nearest valid keys). Kill it and run the same
command again: it resumes from the newest checkpoint in --workdir. All logic
lives in the library (`jaxlib_models.<method>.entry.train_main`).
"""

import sys

from jaxlib_models.core import cli

if __name__ == "__main__":
  sys.exit(cli.run("python -m train", __doc__, "train_main"))
