"""Precomputed embeddings on the wire: Sample.embedding (field 9) survives the codec, an
absent one stays None, and a sample carrying only an embedding is valid input."""

from __future__ import annotations

import numpy as np
import pytest

from services.runtime.codec import BatchCodec
from services.runtime.convert import sample_from_proto, sample_to_proto, validate_samples
from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument


def test_embedding_round_trips_as_float32() -> None:
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    samples = [Sample(id="a", embedding=vec.tolist()), Sample(id="b", text="plain text")]
    codec = BatchCodec()
    value, headers = codec.encode(samples, "ingest", "b1")
    decoded = codec.decode(value, headers).samples
    assert decoded[0].embedding == vec.tolist()
    assert decoded[1].embedding is None
    assert sample_from_proto(sample_to_proto(decoded[1])).embedding is None


def test_embedding_only_sample_is_valid_but_nothing_is_not() -> None:
    validate_samples([Sample(id="a", embedding=[0.5, 0.5])])
    with pytest.raises(InvalidArgument, match="nor an embedding"):
        validate_samples([Sample(id="a")])
