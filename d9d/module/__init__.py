"""Modules: reusable blocks, the Qwen3 Dense models and their parallelism."""
