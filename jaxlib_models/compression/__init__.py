"""Learned image compression (arXiv 2309.02529, 2403.14471): codec core.

So far: discretised conditional likelihoods and the scale table
(`entropy`), real range coding of integer latents with constriction
(`coder`), and the factorised prior for z with its stored coding table
(`bottleneck`). Models, file format, CLI and the RD harness: issue 6, open.
"""

from jaxlib_models.compression import bottleneck, coder, entropy
from jaxlib_models.compression.coder import CodingTable, CorruptStream

__all__ = ["CodingTable", "CorruptStream", "bottleneck", "coder", "entropy"]
