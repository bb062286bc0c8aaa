"""SampleBatch <-> Kafka message (value bytes + headers).

The value is a serialized ``sluice.common.v1.SampleBatch``; the schema version
and content type travel in headers so that a consumer can refuse what it does
not understand *before* parsing, and route it to the dead-letter topic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from google.protobuf.message import DecodeError as ProtoDecodeError

from services.gen.sluice.common.v1 import sample_pb2
from services.runtime.convert import sample_from_proto, sample_to_proto, validate_samples
from services.runtime.domain import Sample
from services.runtime.errors import DecodeError, SchemaVersionError, TooLarge

SCHEMA_VERSION = b"1"
CONTENT_TYPE = b"application/x-protobuf; type=sluice.common.v1.SampleBatch"
H_SCHEMA = "sluice-schema-version"
H_CONTENT_TYPE = "content-type"

Headers = list[tuple[str, bytes]]


class BatchCodec:
    """Encodes and decodes batches under a size limit (bytes of the value)."""

    def __init__(self, max_message_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes

    def encode(
        self, samples: Sequence[Sample], producer_stage: str, batch_id: str = ""
    ) -> tuple[bytes, Headers]:
        batch = sample_pb2.SampleBatch(
            batch_id=batch_id or uuid.uuid4().hex,
            producer_stage=producer_stage,
            created_ms=int(time.time() * 1000),
        )
        batch.samples.extend(sample_to_proto(s) for s in samples)
        value = batch.SerializeToString()
        if len(value) > self.max_message_bytes:
            raise TooLarge(
                f"encoded batch is {len(value)} bytes, limit {self.max_message_bytes}; "
                "split it (see encode_split)"
            )
        return value, [(H_SCHEMA, SCHEMA_VERSION), (H_CONTENT_TYPE, CONTENT_TYPE)]

    def encode_split(
        self, samples: Sequence[Sample], producer_stage: str, batch_id: str
    ) -> list[tuple[bytes, Headers]]:
        """Encode, splitting into as many messages as the size limit needs. Part ids
        are derived from ``batch_id`` so a replay produces the same ids."""
        try:
            return [self.encode(samples, producer_stage, batch_id)]
        except TooLarge:
            if len(samples) <= 1:
                raise
        mid = len(samples) // 2
        return self.encode_split(samples[:mid], producer_stage, f"{batch_id}.0") + (
            self.encode_split(samples[mid:], producer_stage, f"{batch_id}.1")
        )

    def decode(
        self, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
    ) -> DecodedBatch:
        hdrs = dict(headers or [])
        version = hdrs.get(H_SCHEMA)
        if version is None:
            raise SchemaVersionError(f"missing {H_SCHEMA} header")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema version {version!r} not supported (this build reads {SCHEMA_VERSION!r})"
            )
        if value is None:
            raise DecodeError("message has no value")
        if len(value) > self.max_message_bytes:
            raise TooLarge(f"message is {len(value)} bytes, limit {self.max_message_bytes}")
        batch = sample_pb2.SampleBatch()
        try:
            batch.ParseFromString(value)
        except ProtoDecodeError as exc:
            raise DecodeError(f"value is not a SampleBatch: {exc}") from exc
        samples = [sample_from_proto(m) for m in batch.samples]
        validate_samples(samples)
        return DecodedBatch(batch.batch_id, batch.producer_stage, samples)


class DecodedBatch:
    """A decoded batch: its id, who produced it, and the samples."""

    __slots__ = ("batch_id", "producer_stage", "samples")

    def __init__(self, batch_id: str, producer_stage: str, samples: list[Sample]) -> None:
        self.batch_id = batch_id
        self.producer_stage = producer_stage
        self.samples = samples
