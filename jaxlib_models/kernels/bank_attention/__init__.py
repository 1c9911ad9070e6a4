"""Attention over own keys plus extra keys with a validity mask (the diffusion
backbone's primitive: StreamV2V feature bank, Fairy anchors, FlowVid previous
frames): jnp reference, chunked online softmax, Pallas GPU kernel."""

from jaxlib_models.kernels.bank_attention.api import (
    BlockSizes,
    IMPLEMENTATIONS,
    PallasBlockSizes,
    bank_attention,
    validate,
)

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "PallasBlockSizes",
           "bank_attention", "validate"]
