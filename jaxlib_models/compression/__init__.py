"""Learned image compression (arXiv 2309.02529, 2403.14471): codec core.

So far: discretised conditional likelihoods and the scale table
(`entropy`), real range coding of integer latents with constriction
(`coder`), the factorised prior for z with its stored coding table
(`bottleneck`), the mean-scale hyperprior (`hyperprior`), the .jlic file
format (`codec`), photo loaders (`data`) and training through the trainer
(`train`, `entry`). Context models, trained models, CLI and the RD harness:
issue 6, open.
"""

from jaxlib_models.compression import bottleneck, coder, entropy
from jaxlib_models.compression.coder import CodingTable, CorruptStream

__all__ = ["CodingTable", "CorruptStream", "bottleneck", "coder", "entropy"]
