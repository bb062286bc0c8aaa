"""The lag source against a real broker (Tansu): exact lag per group, and failures that say why.

Messages are produced one per batch (flush after each send): Tansu can report the end offset
as the last batch's start + 1 (see /work/shared/INFRA.md), which is exact only for
single-record batches.
"""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from operators.lag import KafkaLagSource, LagSourceError
from operators.settings import LagClientSettings
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

FAST = LagClientSettings(request_timeout_ms=2000, bootstrap_timeout_ms=500)


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"lag-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()
    return name


def _produce(bootstrap: str, topic: str, per_partition: list[int]) -> None:
    producer = KafkaProducer(bootstrap_servers=[bootstrap], linger_ms=0)
    for partition, n in enumerate(per_partition):
        for _ in range(n):
            producer.send(topic, b"x", partition=partition)
            producer.flush()
    producer.close()


def _consume(bootstrap: str, topic: str, group: str, partition: int, n: int) -> None:
    """Consume ``n`` messages of one partition as ``group`` and commit."""
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap],
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=n,
    )
    consumer.assign([TopicPartition(topic, partition)])
    seen, deadline = 0, time.monotonic() + 10
    while seen < n and time.monotonic() < deadline:
        seen += sum(len(r) for r in consumer.poll(timeout_ms=200, max_records=n - seen).values())
    assert seen == n
    consumer.commit()
    consumer.close()


def test_lag_is_end_minus_committed_summed_over_partitions(kafka_bootstrap: str) -> None:
    topic = _topic(kafka_bootstrap, 3)
    _produce(kafka_bootstrap, topic, [5, 3, 0])
    source = KafkaLagSource(FAST)
    try:
        # A group that committed nothing starts at the log start: everything is lag.
        fresh = source.read(kafka_bootstrap, topic, "nobody-yet")
        assert (fresh.lag, fresh.end_offsets, fresh.committed_offsets, fresh.partitions) == (
            8,
            8,
            0,
            3,
        )

        _consume(kafka_bootstrap, topic, "g1", partition=0, n=4)
        after = source.read(kafka_bootstrap, topic, "g1")
        assert (after.lag, after.committed_offsets) == (4, 4)  # 1 left on p0, 3 on p1

        _produce(kafka_bootstrap, topic, [0, 0, 2])
        grown = source.read(kafka_bootstrap, topic, "g1")
        assert (grown.lag, grown.end_offsets) == (6, 10)
        # Another group on the same topic has its own lag.
        assert source.read(kafka_bootstrap, topic, "nobody-yet").lag == 10
    finally:
        source.close()


def test_missing_topic_is_a_lag_source_error(kafka_bootstrap: str) -> None:
    source = KafkaLagSource(FAST)
    try:
        with pytest.raises(LagSourceError, match="no-such-topic"):
            source.read(kafka_bootstrap, "no-such-topic", "g")
    finally:
        source.close()


def test_broker_down_is_a_lag_source_error_and_reconnects(kafka_bootstrap: str) -> None:
    source = KafkaLagSource(FAST)
    dead = f"127.0.0.1:{free_port()}"
    try:
        for _ in range(2):  # a failed client is dropped: each attempt connects afresh
            with pytest.raises(LagSourceError, match="bootstrap"):
                source.read(dead, "t", "g")
        # The same source still serves a live broker.
        topic = _topic(kafka_bootstrap, 1)
        assert source.read(kafka_bootstrap, topic, "g").lag == 0
    finally:
        source.close()
