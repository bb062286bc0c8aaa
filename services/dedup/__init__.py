"""Deduplication stage: exact, MinHash-LSH near-duplicate and semantic, on shared state."""
