"""Fixtures of the synthesis tests: the packaged sentence-embedding model, loaded once."""

from __future__ import annotations

import pytest

from services.runtime.backends.embeddings import EmbeddingSettings, create_embedder


@pytest.fixture(scope="session")
def minilm():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 from its PyPI package (the near-duplicate filter.s default embedder)."""
    return create_embedder(EmbeddingSettings())
