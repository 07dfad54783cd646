"""Jobs run by ``specdec_jax.main`` (one module each)."""
