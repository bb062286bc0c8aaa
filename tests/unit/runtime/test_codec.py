"""Batch codec: round trip, schema version header, size limits, malformed input."""

from __future__ import annotations

import pytest

from services.runtime.codec import H_SCHEMA, BatchCodec
from services.runtime.domain import Action, LineageEvent, Sample
from services.runtime.errors import DecodeError, InvalidArgument, SchemaVersionError, TooLarge


def _sample(i: int, text: str = "Some text here.") -> Sample:
    return Sample(
        id=f"s{i}",
        text=text,
        source="test",
        metadata={"lang": "en"},
        scores={"ask_llm": 0.25},
        lineage=[LineageEvent("scoring", Action.DROPPED, "heuristics:min_words", "m@1", 123, "p")],
    )


def test_round_trip_preserves_every_field() -> None:
    codec = BatchCodec()
    samples = [_sample(i) for i in range(3)]
    samples[1].prompt, samples[1].response, samples[1].text = "Q?", "A.", ""
    value, headers = codec.encode(samples, "ingest", "b1")
    decoded = codec.decode(value, headers)
    assert decoded.batch_id == "b1"
    assert decoded.producer_stage == "ingest"
    assert decoded.samples == samples


def test_missing_or_unknown_schema_version_is_rejected() -> None:
    codec = BatchCodec()
    value, _headers = codec.encode([_sample(0)], "ingest")
    with pytest.raises(SchemaVersionError, match="missing"):
        codec.decode(value, [])
    with pytest.raises(SchemaVersionError, match="not supported"):
        codec.decode(value, [(H_SCHEMA, b"99")])


def test_garbage_value_is_a_decode_error() -> None:
    codec = BatchCodec()
    _, headers = codec.encode([_sample(0)], "ingest")
    with pytest.raises(DecodeError):
        codec.decode(b"\xff\xff\xff garbage \x00\x01", headers)
    with pytest.raises(DecodeError):
        codec.decode(None, headers)


def test_invalid_samples_are_rejected() -> None:
    codec = BatchCodec()
    for bad in (
        [Sample(id="", text="x")],
        [Sample(id="a", text="  ")],
        [Sample(id="a", text="x"), Sample(id="a", text="y")],
    ):
        value, headers = codec.encode(bad, "ingest")
        with pytest.raises(InvalidArgument):
            codec.decode(value, headers)


def test_size_limit_on_encode_and_decode() -> None:
    small = BatchCodec(max_message_bytes=1024)
    big = [_sample(0, "word " * 400)]
    with pytest.raises(TooLarge):
        small.encode(big, "ingest")
    value, headers = BatchCodec().encode(big, "ingest")
    with pytest.raises(TooLarge):
        small.decode(value, headers)


def test_encode_split_respects_limit_and_keeps_order_and_ids() -> None:
    codec = BatchCodec(max_message_bytes=4096)
    samples = [_sample(i, f"document {i} " + "word " * 150) for i in range(12)]
    parts = codec.encode_split(samples, "scoring", "t-0-5")
    assert len(parts) > 1
    decoded = [codec.decode(v, h) for v, h in parts]
    assert all(len(v) <= 4096 for v, _ in parts)
    assert [s.id for d in decoded for s in d.samples] == [s.id for s in samples]
    # deterministic part ids: a replay of the same input yields the same batch ids
    again = [
        codec.decode(v, h).batch_id for v, h in codec.encode_split(samples, "scoring", "t-0-5")
    ]
    assert [d.batch_id for d in decoded] == again
    assert len(set(again)) == len(again)
