"""The shared command line of `python -m train`, `-m eval`, `-m eval.study`.

Each entry point is a few lines: it names itself and the library function
(`jaxlib_models.<config.method>.entry.<function>(config, workdir)`) to run.
"""

import argparse
import importlib
import os
import sys

from jaxlib_models.core import config as config_lib


def maybe_initialize_distributed() -> bool:
  """Joins a multi-host job when the environment describes one.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Otherwise, under Slurm with more than one task, JAX's own
  cluster detection fills them in. Single-process runs do nothing.
  """
  import jax

  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    jax.distributed.initialize(
        coordinator_address=addr,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


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
