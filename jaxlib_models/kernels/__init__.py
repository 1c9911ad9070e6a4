"""Hot-path ops, each with a jnp reference, optional Pallas kernels and a
dispatcher (house style §10)."""
