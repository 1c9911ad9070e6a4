"""Learned image compression (arXiv 2309.02529, 2403.14471): codec core.

So far: discretised conditional likelihoods and the scale table
(`entropy`), and real range coding of integer latents with constriction
(`coder`). Models, file format, CLI and the RD harness: issue 6, open.
"""

from jaxlib_models.compression import coder, entropy
from jaxlib_models.compression.coder import CodingTable, CorruptStream

__all__ = ["CodingTable", "CorruptStream", "coder", "entropy"]
