"""Runtime backends that run a compressed model."""
