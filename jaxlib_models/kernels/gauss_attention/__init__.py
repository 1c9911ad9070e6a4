"""Gaussian-kernel attention: softmax-weighted mean and log-sum-exp over data
points with logits -|x - X_j|^2 / (2 t) (the empirical score's hot path)."""

from jaxlib_models.kernels.gauss_attention.api import (
    BlockSizes,
    PallasBlockSizes,
    gauss_attention,
    validate,
)

__all__ = ["BlockSizes", "PallasBlockSizes", "gauss_attention", "validate"]
