"""The stage loop's polls ride out transient broker errors (``poll_records``): a broker
restart can make kafka-python 3 raise an unknown broker id from ``poll`` (partition metadata
names a leader its broker list does not have yet), which used to end the worker. Stand-in
clients; the real broker restart is exercised by ``tests/integration/test_chaos.py``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from kafka.errors import (
    KafkaError,
    NodeNotReadyError,
    TopicAuthorizationFailedError,
    UnknownBrokerIdError,
)
from kafka.structs import TopicPartition

from services.runtime import kafka_stage
from services.runtime.errors import Unavailable
from services.runtime.kafka_stage import StageWorker, poll_records, transient
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.support.stages import KeepAll, records

T0 = TopicPartition("in", 0)


class FlakyConsumer:
    """``poll`` raises ``errors`` in turn, then returns ``batches`` in turn, then calls
    ``when_drained`` and returns nothing."""

    def __init__(
        self,
        errors: list[KafkaError],
        batches: list[dict[TopicPartition, list[Any]]],
        when_drained: Callable[[], None] = lambda: None,
    ) -> None:
        self.errors, self.batches, self.when_drained = errors, batches, when_drained
        self.polls = 0
        self.committed: dict[TopicPartition, int] = {}

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict[TopicPartition, Any]:
        self.polls += 1
        if self.errors:
            raise self.errors.pop(0)
        if self.batches:
            return self.batches.pop(0)
        self.when_drained()
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {T0}

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.committed.update({tp: o.offset for tp, o in offsets.items()})

    def close(self, autocommit: bool = True) -> None:
        pass


class Producer:
    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture(autouse=True)
def _short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_stage, "POLL_ERROR_PAUSE_S", 0.01)


def test_transient_errors_are_the_retriable_ones_and_an_unknown_broker_id() -> None:
    assert transient(UnknownBrokerIdError(3))
    assert transient(NodeNotReadyError(3))
    assert not transient(TopicAuthorizationFailedError())
    assert not transient(KafkaError("something else"))


def test_a_poll_rides_out_transient_errors() -> None:
    batch = {T0: records(T0, range(1))}
    consumer = FlakyConsumer([UnknownBrokerIdError(3), NodeNotReadyError(3)], [batch])
    assert poll_records(consumer, timeout_ms=10) == batch  # type: ignore[arg-type]
    assert consumer.polls == 3


def test_other_errors_propagate_at_once() -> None:
    consumer = FlakyConsumer([TopicAuthorizationFailedError()], [])
    with pytest.raises(TopicAuthorizationFailedError):
        poll_records(consumer, timeout_ms=10)  # type: ignore[arg-type]
    assert consumer.polls == 1


def test_errors_that_last_past_the_patience_make_the_worker_unavailable() -> None:
    consumer = FlakyConsumer([UnknownBrokerIdError(3)] * 10, [])
    ticks = iter(range(100))
    with pytest.raises(Unavailable, match="polls kept failing for 3 s"):
        poll_records(
            consumer,  # type: ignore[arg-type]
            timeout_ms=10,
            patience_s=3,
            clock=lambda: float(next(ticks)),
        )
    assert consumer.polls == 4  # failing since t=0; gives up at t=3


def test_a_stop_request_ends_the_wait_between_failed_polls() -> None:
    stop = threading.Event()
    stop.set()
    consumer = FlakyConsumer([UnknownBrokerIdError(3)], [{T0: records(T0, range(1))}])
    assert poll_records(consumer, stop, timeout_ms=10) == {}  # type: ignore[arg-type]
    assert consumer.polls == 1


def test_the_worker_loop_goes_on_after_a_transient_poll_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = KafkaSettings(input_topic="in", output_topic="", processing_guarantee="at_least_once")
    worker = StageWorker(KeepAll(), kafka, StageMetrics("unit"), stage="unit")
    consumer = FlakyConsumer(
        [UnknownBrokerIdError(3)], [{T0: records(T0, range(2))}], when_drained=worker.request_stop
    )
    monkeypatch.setattr(worker, "_connect", lambda: (consumer, Producer()))
    stats = worker.run()
    assert stats.records == 2
    assert consumer.committed == {T0: 2}
