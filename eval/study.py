r"""Runs a method's study config (many fits) and writes report.md + PNGs.

  python -m eval.study --config=configs/spike_slab/study.py:demo --workdir=runs/demo

Resumes: finished fits are read back from their results.json, a fit killed
midway resumes from its last checkpoint. `--config.a.b=value` overrides.
"""

import sys

from jaxlib_models.core import cli

if __name__ == "__main__":
  sys.exit(cli.run("python -m eval.study", __doc__, "study_main"))
