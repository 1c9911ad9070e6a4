r"""Runs a method's study config (many fits) and writes report.md + PNGs.

  python -m eval.study --config=configs/spike_slab/study.py:demo --workdir=runs/demo

Resumes: finished fits are read back from their results.json, a fit killed
midway resumes from its last checkpoint. `--config.a.b=value` overrides.
"""

import argparse
import importlib
import sys

from jaxlib_models.core import config as config_lib


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="python -m eval.study", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="study config file[:arg]")
  parser.add_argument("--workdir", required=True, help="output folder")
  if "-h" in argv or "--help" in argv:
    parser.print_help()
    return 0
  try:
    cfg, rest = config_lib.parse_config_args(argv)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest + ["--config", "given"])
  entry = importlib.import_module(f"jaxlib_models.{cfg.method}.entry")
  entry.study_main(cfg, args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
