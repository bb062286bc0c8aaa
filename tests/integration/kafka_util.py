"""Helpers for tests that read topics on the real broker."""

from __future__ import annotations

import time
import uuid

from kafka import KafkaConsumer

from operators.lag import KafkaLagSource
from operators.settings import LagClientSettings
from services.runtime.codec import BatchCodec, DecodedBatch


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def read_topic(  # type: ignore[no-untyped-def]
    bootstrap: str,
    topic: str,
    *,
    expect: int,
    timeout_s: float = 60,
    count=lambda msg: 1,
    isolation_level: str = "read_committed",
) -> list:
    """Read ``topic`` from the beginning until ``count`` over messages reaches
    ``expect`` (or the timeout), then keep reading 1 s more to catch extras. Reads what a
    downstream stage reads: committed transactions only, unless told otherwise."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    out = []
    seen = 0
    deadline = time.monotonic() + timeout_s
    extra_until = None
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    out.append(r)
                    seen += count(r)
            if seen >= expect and extra_until is None:
                extra_until = time.monotonic() + 1.0
            if extra_until is not None and time.monotonic() > extra_until:
                break
    finally:
        consumer.close()
    return out


def decode_all(records: list) -> list[DecodedBatch]:  # type: ignore[type-arg]
    codec = BatchCodec()
    return [codec.decode(r.value, r.headers) for r in records]


def wait_committed(bootstrap: str, group: str, topic: str, *, timeout_s: float = 60) -> None:
    """Wait until consumer group ``group`` has committed every partition of ``topic`` up to
    its end (the operator's lag reading is 0): the stage has handled all of it, what it
    read twice after a rewind included. Raises AssertionError with the lag left if that
    takes longer than ``timeout_s``."""
    source = KafkaLagSource(LagClientSettings())
    try:
        deadline = time.monotonic() + timeout_s
        while (lag := source.read(bootstrap, topic, group).lag) > 0:
            if time.monotonic() >= deadline:
                raise AssertionError(f"group {group} left {lag} records of {topic} uncommitted")
            time.sleep(0.2)
    finally:
        source.close()
