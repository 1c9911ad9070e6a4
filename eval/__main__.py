r"""Evaluates the newest checkpoint in --workdir and writes eval.json.

  python -m eval --config=configs/spike_slab/sim.py:tiny --workdir=runs/x

Use the config (and overrides) the run was trained with. A workdir without a
checkpoint is an error that says how to train one.
"""

import sys

from jaxlib_models.core import cli

if __name__ == "__main__":
  sys.exit(cli.run("python -m eval", __doc__, "eval_main"))
