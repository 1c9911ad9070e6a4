r"""Trains one experiment config; resumes automatically from --workdir.

  python -m train --config=configs/spike_slab/sim.py:tiny --workdir=runs/x \
      [--config.train.num_steps=100 ...]

Every `--config.a.b=value` overrides a field of the config file (an unknown
key fails with its name and the nearest valid keys). All logic lives in the
library (`jaxlib_models.<method>.entry.train_main`).
"""

import argparse
import importlib
import sys

import jax

from jaxlib_models.core import config as config_lib


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="python -m train", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--config", required=True,
                      help="config file and variant, e.g. configs/spike_slab/sim.py:tiny")
  parser.add_argument("--workdir", required=True,
                      help="run folder: checkpoints, metrics.jsonl, results")
  if "-h" in argv or "--help" in argv:
    parser.print_help()
    return 0
  try:
    cfg, rest = config_lib.parse_config_args(argv)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest + ["--config", "given"])
  print(f"devices: {jax.devices()}", flush=True)
  entry = importlib.import_module(f"jaxlib_models.{cfg.method}.entry")
  entry.train_main(cfg, args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
