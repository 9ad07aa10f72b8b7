"""d9d: the Qwen3 Dense model family, compiled per layer, sharded with FSDP2 in pipeline stages."""
