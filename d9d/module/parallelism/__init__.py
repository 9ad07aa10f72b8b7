"""Parallelism: FSDP2/HSDP over named meshes, per-model plans, layout-independent init."""
