"""jaxlib_models: JAX/Flax reimplementations of ten recent methods."""

__version__ = "0.1.0"
