"""Kernel-based score estimation and minimax diffusion sampling (arXiv
2402.15602): estimators, samplers, the DSM neural baseline, rate experiments.

  from jaxlib_models import score
  s = score.score(x, X, t)                              # estimated score
  y, (t0, T) = score.sample(jax.random.key(0), X, 1000)  # early-stopped SDE
"""

from jaxlib_models.score.estimators import (
    ScoreConfig,
    ScoreOut,
    check_data,
    empirical_score,
    estimate,
    score,
)
from jaxlib_models.score.legendre import legendre_score
from jaxlib_models.score.samplers import (
    SamplerConfig,
    bridge_sample,
    integrate,
    kde_sample,
    sample,
    theory_schedule,
    time_grid,
)

__all__ = [
    "SamplerConfig", "ScoreConfig", "ScoreOut", "bridge_sample", "check_data",
    "empirical_score", "estimate", "integrate", "kde_sample",
    "legendre_score", "sample", "score", "theory_schedule", "time_grid",
]
