"""Model families built from the blocks."""
