"""Spike-and-slab BNN: node PIPs for pruning and feature selection.

arXiv 2411.00273 (Saha, Liu, Liang), reconstructed on Bai, Song & Cheng
(arXiv 2011.07439). Public API:

- `SpikeSlabConfig`: model, prior, variational and pruning settings.
- NumPyro face: `model.make_model`, `model.make_guide`, `model.run_svi`,
  `model.numpyro_loss_fn` (registered closed-form KLs).
- Plain-JAX core: `core.init`, `core.loss_fn`, `core.predict`.
- PIPs and pruning: `pips.node_pips`, `pips.feature_pip`, `prune.prune`.
- Data: `data.load(name, seed)`; experiments: `experiment.fit`,
  `experiment.evaluate`, `study.run_study`.
"""

from jaxlib_models.spike_slab import core, data, pips, prune
from jaxlib_models.spike_slab.config import SpikeSlabConfig

__all__ = ["SpikeSlabConfig", "core", "data", "pips", "prune"]
