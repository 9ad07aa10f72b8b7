"""Per-model parallelism plans."""
