"""The stage loop across a rebalance on the real broker (Apache Kafka), in process.

A consumer group rebalances whenever any member joins or leaves, also when every
partition ends up where it was. A worker with checkpointed state and an open transaction
must then go on exactly where it was: reloading its state from the last checkpoint (older
than the open transaction) would read the transaction's records a second time, and a
stage with outputs would send them twice."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from services.runtime.domain import Sample
from services.runtime.kafka_stage import StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.integration.kafka_util import decode_all, read_topic, unique, wait_committed
from tests.support.stages import KeepAll

pytestmark = pytest.mark.integration


class CountingState:
    """A StageState that counts each record it is handed, per partition, checkpointed in
    memory with the offset it covers (what density's pass 1 does with sketches in S3)."""

    def __init__(self) -> None:
        self.saved: dict[TopicPartition, tuple[int, Counter[int]]] = {}
        self.held: dict[TopicPartition, tuple[int, Counter[int]]] = {}

    def on_assigned(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        for tp in partitions:
            position, counts = self.saved.get(tp, (0, Counter()))
            self.held[tp] = (position, Counter(counts))
        return {tp: self.held[tp][0] for tp in partitions}

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.held.pop(tp, None)

    def on_record(self, tp: TopicPartition, offset: int) -> None:
        _, counts = self.held[tp]
        counts[offset] += 1
        self.held[tp] = (offset + 1, counts)

    def checkpoint(self, done: dict[TopicPartition, int]) -> None:
        for tp, (position, counts) in self.held.items():
            self.saved[tp] = (position, Counter(counts))


class Recording(StageWorker):
    """Notes whether a transaction was open each time a rebalance began."""

    open_at_revoke: list[bool]

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.open_at_revoke.append(self._txn is not None and bool(self._txn.start))
        super()._on_revoked(revoked)


def test_a_rebalance_that_changes_nothing_reads_nothing_twice(kafka_bootstrap: str) -> None:
    """A second member joins the group for another topic and leaves again: two rebalances,
    both handing the worker all of its partitions back, while its transaction (20 s
    interval, input every 20 ms) is open. Every record reaches the state once, every
    sample is output once, and no transaction is dropped."""
    ingest, out, other, group = unique("ing"), unique("out"), unique("other"), unique("grp")
    ensure_topics(kafka_bootstrap, [ingest, out, other, f"{ingest}.dlq"], partitions=2)
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        input_topic=ingest,
        output_topic=out,
        group_id=group,
        processing_guarantee="exactly_once",
        transaction_interval_ms=20000,
        poll_timeout_ms=200,
        max_poll_records=4,
        session_timeout_ms=6000,
    )
    state = CountingState()
    worker = Recording(KeepAll(), kafka, StageMetrics("unit"), stage="unit", state=state)
    worker.open_at_revoke = []
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(worker.assignment()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(worker.assignment()) == 2, "the worker never got its partitions"

    samples = [Sample(id=f"s{i:04d}", text=f"text {i}") for i in range(600)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all", linger_ms=0)
    sent = 0

    def feed() -> None:
        nonlocal sent
        for i in range(0, len(samples), 2):
            batch = samples[i : i + 2]
            sent += publish(producer, ingest, batch, batch_size=2, batch_prefix=f"f{i}")
            time.sleep(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    time.sleep(1.0)
    intruder = KafkaConsumer(
        other, bootstrap_servers=[kafka_bootstrap], group_id=group, session_timeout_ms=6000
    )
    deadline = time.monotonic() + 30
    while not intruder.assignment() and time.monotonic() < deadline:
        intruder.poll(timeout_ms=200)
    assert {tp.topic for tp in intruder.assignment()} == {other}, "no rebalance"
    intruder.close()  # leaves the group: the second rebalance
    feeder.join(60)
    producer.close()
    wait_committed(kafka_bootstrap, group, ingest, timeout_s=60)
    worker.request_stop()
    thread.join(30)
    assert not thread.is_alive()

    assert len(worker.open_at_revoke) >= 2 and any(worker.open_at_revoke), (
        f"no transaction was open at a rebalance: {worker.open_at_revoke}"
    )
    assert worker.stats.aborts == 0
    assert worker.stats.records == sent, "records read twice"
    for tp, (position, counts) in state.saved.items():
        assert set(counts.values()) == {1} and sorted(counts) == list(range(position)), tp
    assert sum(position for position, _ in state.saved.values()) == sent
    seen = [
        s.id for b in decode_all(read_topic(kafka_bootstrap, out, expect=sent)) for s in b.samples
    ]
    assert sorted(seen) == [s.id for s in samples], f"{len(seen) - len(set(seen))} repeated"
