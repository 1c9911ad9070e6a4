"""Learned image compression (arXiv 2309.02529, 2403.14471).

Codec core: discretised conditional likelihoods, mixtures and the scale table
(`entropy`), real range coding with constriction (`coder`), the factorised
prior for z (`bottleneck`), the mean-scale hyperprior with optional serial
or two-network checkerboard context (`hyperprior`, `serial`,
`checkerboard`), the .jlic format with channel-occupancy skipping (`codec`),
the deformable residual module (`deform`), three-step distillation
(`distill`), training (`train`, `entry`, `ship`), the photo corpus (`data`),
the RD harness (`metrics`, `bdrate`, `anchors`, `rd`), the shipped models
(`pretrained`) and the `jlic` command line (`cli`).
"""

from jaxlib_models.compression import bottleneck, coder, entropy
from jaxlib_models.compression.codec import (Codec, FormatError, compress,
                                             decompress)
from jaxlib_models.compression.coder import CodingTable, CorruptStream
from jaxlib_models.compression.hyperprior import (Hyperprior,
                                                  HyperpriorConfig)

__all__ = ["Codec", "CodingTable", "CorruptStream", "FormatError",
           "Hyperprior", "HyperpriorConfig", "bottleneck", "coder",
           "compress", "decompress", "entropy"]
