"""The sentence-transformers embedder on the real packaged all-MiniLM-L6-v2 (no model hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest

from services.runtime.backends.embeddings import (
    EmbeddingSettings,
    SentenceTransformerEmbedder,
    create_embedder,
    resolve_embedding_model,
)
from services.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(EmbeddingSettings(batch_size=4))


def test_packaged_minilm_gives_normalised_384_dim_vectors(
    embedder: SentenceTransformerEmbedder,
) -> None:
    texts = [f"Sentence number {i} about the weather in a small town." for i in range(10)]
    vecs = embedder.embed(texts)
    assert embedder.dim == 384
    assert vecs.shape == (10, 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.model_version == "all-minilm-l6-v2@fp32"


def test_similar_sentences_are_closer_than_unrelated_ones(
    embedder: SentenceTransformerEmbedder,
) -> None:
    a, b, c = embedder.embed(
        [
            "The cat is sleeping on the warm windowsill.",
            "A cat naps in the sun by the window.",
            "Quarterly revenue of the bank fell by four percent.",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.3
    assert float(a @ b) > float(b @ c) + 0.3


def test_batching_does_not_change_vectors(embedder: SentenceTransformerEmbedder) -> None:
    texts = ["short", "a much longer sentence with many more words in it than the first", "mid"]
    together = embedder.embed(texts)
    alone = np.vstack([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_bfloat16_vectors_match_float32(embedder: SentenceTransformerEmbedder) -> None:
    bf16 = create_embedder(EmbeddingSettings(dtype="bfloat16"))
    assert bf16.model_version == "all-minilm-l6-v2@bf16"
    texts = ["a plain sentence", "another, rather different, line of text about trains"]
    cos = np.sum(bf16.embed(texts) * embedder.embed(texts), axis=1)
    assert np.all(cos > 0.99)


def test_model_resolution(tmp_path: Path) -> None:
    packaged = resolve_embedding_model("packaged:all-minilm-l6-v2")
    assert packaged.local and (Path(packaged.path) / "config.json").is_file()
    assert resolve_embedding_model(str(tmp_path)).local
    hub = resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    assert not hub.local and hub.path == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(ConfigError, match="unknown packaged"):
        resolve_embedding_model("packaged:nope")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_embedding_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="empty"):
        resolve_embedding_model("  ")
