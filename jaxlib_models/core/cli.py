"""The shared command line of `python -m train`, `-m eval`, `-m eval.study`.

Each entry point is a few lines: it names itself and the library function
(`jaxlib_models.<config.method>.entry.<function>(config, workdir)`) to run.
"""

import argparse
import importlib
import sys

from jaxlib_models.core import config as config_lib


def maybe_initialize_distributed() -> bool:
  """Joins a multi-host job when the environment describes one.

  `jaxlib_models.parallel.launch` resolves the coordinator, process count
  and id from explicit variables (JAXLIB_COORDINATOR or
  JAX_COORDINATOR_ADDRESS, ...), Slurm (srun) or a Kubernetes indexed
  Job/JobSet; single-process runs do nothing. See examples/launch/.
  """
  from jaxlib_models.parallel import launch  # noqa: PLC0415

  return launch.initialize().is_multiprocess


def run(prog: str, doc: str, function: str, argv=None) -> int:
  """Parses --config/--workdir (+ --config.a.b=v overrides) and dispatches."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog=prog, description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
      "--config", required=True,
      help="config file and variant, e.g. configs/spike_slab/sim.py:tiny;"
      " override fields with --config.a.b=value",
  )
  parser.add_argument(
      "--workdir", required=True,
      help="run folder: checkpoints (ckpt/), metrics.jsonl, results",
  )
  if "-h" in argv or "--help" in argv:
    parser.print_help()
    return 0
  try:
    cfg, rest = config_lib.parse_config_args(argv)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  if cfg is None:
    parser.error("--config is required")
  args = parser.parse_args(rest + ["--config", "given"])
  maybe_initialize_distributed()
  entry = importlib.import_module(f"jaxlib_models.{cfg.method}.entry")
  getattr(entry, function)(cfg, args.workdir)
  return 0
