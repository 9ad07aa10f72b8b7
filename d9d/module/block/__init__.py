"""Building blocks: attention, RoPE, norms, MLP, embeddings, heads, snapshot aggregators."""
