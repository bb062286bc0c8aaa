"""The stage loop's hooks for checkpointed state (``StageState``), with stand-in clients:
the state sees each record's partition, checkpoints before every offset commit under both
guarantees, and decides where a partition resumes on assignment and after an abort."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from services.runtime.kafka_stage import StageWorker, _RebalanceListener, _Transaction
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.support.stages import KeepAll, Rec, records

T0, T1 = TopicPartition("in", 0), TopicPartition("in", 1)


class Journal(list[tuple[Any, ...]]):
    """What the stand-ins and the state were asked to do, in order."""


class State:
    """A StageState that resumes each partition where it last checkpointed."""

    def __init__(self, journal: Journal, saved: dict[TopicPartition, int]) -> None:
        self.journal, self.saved = journal, saved
        self.held: dict[TopicPartition, int] = {}

    def on_assigned(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.journal.append(("assigned", tuple(partitions)))
        self.held.update({tp: self.saved.get(tp, 0) for tp in partitions})
        return {tp: self.held[tp] for tp in partitions}

    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.journal.append(("revoked", tuple(partitions)))
        for tp in partitions:
            self.held.pop(tp, None)

    def on_record(self, tp: TopicPartition, offset: int) -> None:
        self.journal.append(("record", tp, offset))
        self.held[tp] = offset + 1

    def checkpoint(self, done: dict[TopicPartition, int]) -> None:
        self.journal.append(("checkpoint", dict(done)))
        self.saved.update(self.held)


class Consumer:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def assignment(self) -> set[TopicPartition]:
        return {T0, T1}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.journal.append(("seek", tp, offset))

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.journal.append(("commit", {tp: o.offset for tp, o in offsets.items()}))

    def group_metadata(self) -> object:
        return object()


class Future:
    def get(self, timeout: float | None = None) -> None:
        return None


class Producer:
    def __init__(self, journal: Journal, fail_offsets: bool = False) -> None:
        self.journal, self.fail_offsets = journal, fail_offsets

    def send(self, topic: str, **_: Any) -> Future:
        return Future()

    def flush(self, timeout: float | None = None) -> None:
        pass

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, Any], _meta: Any) -> None:
        if self.fail_offsets:
            raise KafkaError("rebalance in progress")
        self.journal.append(("txn-offsets", {tp: o.offset for tp, o in offsets.items()}))

    def begin_transaction(self) -> None:
        self.journal.append(("txn-begin",))

    def commit_transaction(self) -> None:
        self.journal.append(("txn-commit",))

    def abort_transaction(self) -> None:
        self.journal.append(("txn-abort",))


@pytest.fixture
def journal() -> Iterator[Journal]:
    yield Journal()


def _worker(guarantee: str, state: State) -> StageWorker:
    kafka = KafkaSettings(input_topic="in", output_topic="", processing_guarantee=guarantee)
    return StageWorker(KeepAll(), kafka, StageMetrics("unit"), stage="unit", state=state)


def test_at_least_once_checkpoints_before_it_commits(journal: Journal) -> None:
    state = State(journal, {})
    worker = _worker("at_least_once", state)
    polled = {T0: records(T0, range(3, 5)), T1: records(T1, range(0, 1))}
    worker._handle_poll(Consumer(journal), Producer(journal), polled)  # type: ignore[arg-type]
    assert journal == [
        ("record", T0, 3),
        ("record", T0, 4),
        ("record", T1, 0),
        ("checkpoint", {T0: 5, T1: 1}),
        ("commit", {T0: 5, T1: 1}),
    ]
    assert state.saved == {T0: 5, T1: 1}


def test_exactly_once_checkpoints_before_the_transaction_commits(journal: Journal) -> None:
    state = State(journal, {})
    worker = _worker("exactly_once", state)
    consumer, producer = Consumer(journal), Producer(journal)
    txn = _Transaction(0.0)
    worker._add_to_transaction(txn, {T1: records(T1, range(7, 9))})
    worker._commit_transaction(consumer, producer, txn)  # type: ignore[arg-type]
    assert journal == [
        ("record", T1, 7),
        ("record", T1, 8),
        ("checkpoint", {T1: 9}),
        ("txn-begin",),
        ("txn-offsets", {T1: 9}),
        ("txn-commit",),
    ]


def test_an_aborted_transaction_resumes_where_the_state_says(journal: Journal) -> None:
    """The state checkpointed offset 9, then the commit failed: rewinding to the
    transaction's start (7) would hand records 7 and 8 to the state a second time."""
    state = State(journal, {})
    worker = _worker("exactly_once", state)
    consumer, producer = Consumer(journal), Producer(journal, fail_offsets=True)
    txn = _Transaction(0.0)
    worker._consumer = consumer  # type: ignore[assignment]
    worker._add_to_transaction(txn, {T1: records(T1, range(7, 9))})
    journal.clear()
    worker._commit_transaction(consumer, producer, txn)  # type: ignore[arg-type]
    assert journal[:3] == [("checkpoint", {T1: 9}), ("txn-begin",), ("txn-abort",)]
    assert ("revoked", (T0, T1)) in journal and ("assigned", (T0, T1)) in journal
    seeks = [e for e in journal if e[0] == "seek"]
    assert seeks[-2:] == [("seek", T0, 0), ("seek", T1, 9)]  # the state's, after txn.start's


def test_rebalance_callbacks_reach_the_state_and_seek(journal: Journal) -> None:
    state = State(journal, {T0: 12})
    worker = _worker("exactly_once", state)
    worker._consumer = Consumer(journal)  # type: ignore[assignment]
    listener = _RebalanceListener(worker)
    listener.on_partitions_assigned({T1, T0})
    listener.on_partitions_revoked({T0, T1})  # eager: everything is revoked first
    assert journal == [("assigned", (T0, T1)), ("seek", T0, 12), ("seek", T1, 0)]
    listener.on_partitions_assigned({T0})
    assert journal[3:] == [("revoked", (T1,))]  # decided once the assignment is known
    assert state.held == {T0: 12}


def _open_transaction(worker: StageWorker, polled: dict[TopicPartition, list[Rec]]) -> None:
    worker._txn = _Transaction(0.0)
    worker._add_to_transaction(worker._txn, polled)


def _owning_both(
    journal: Journal, saved: dict[TopicPartition, int]
) -> tuple[State, StageWorker, _RebalanceListener]:
    """An exactly_once worker that was assigned T0 and T1 (journal cleared after)."""
    state = State(journal, saved)
    worker = _worker("exactly_once", state)
    worker._consumer = Consumer(journal)  # type: ignore[assignment]
    listener = _RebalanceListener(worker)
    listener.on_partitions_assigned({T0, T1})
    journal.clear()
    return state, worker, listener


def test_a_rebalance_that_gives_every_partition_back_changes_nothing(journal: Journal) -> None:
    """The consumer keeps the positions of partitions it gets back; so does the worker keep
    their state and its open transaction (reloading the state from its last checkpoint
    would lose the transaction's records from it)."""
    state, worker, listener = _owning_both(journal, {})
    _open_transaction(worker, {T0: records(T0, range(0, 3))})
    txn = worker._txn
    journal.clear()
    listener.on_partitions_revoked({T0, T1})
    assert worker._txn is None  # held while the group decides
    listener.on_partitions_assigned({T0, T1})
    assert journal == []
    assert worker._txn is txn and worker.stats.aborts == 0
    assert state.held == {T0: 3, T1: 0}


def test_a_rebalance_that_moves_a_partition_drops_the_transaction(journal: Journal) -> None:
    """T1 moved: the transaction is dropped (nothing of it was sent); T1 is forgotten and
    T0, kept, is rewound to where the state resumes it, since its state holds the dropped
    records."""
    state, worker, listener = _owning_both(journal, {T0: 2})
    _open_transaction(worker, {T0: records(T0, range(2, 5)), T1: records(T1, range(0, 4))})
    journal.clear()
    listener.on_partitions_revoked({T0, T1})
    listener.on_partitions_assigned({T0})
    assert worker._txn is None and worker.stats.aborts == 1
    assert journal == [
        ("revoked", (T1,)),
        ("seek", T0, 2),  # the transaction's start
        ("revoked", (T0,)),
        ("assigned", (T0,)),
        ("seek", T0, 2),  # the state's last checkpoint
    ]
    assert state.held == {T0: 2}


def test_losing_the_group_forgets_everything_and_drops_the_transaction(
    journal: Journal,
) -> None:
    """Evicted, the worker's positions are reset: a transaction kept across the rejoin would
    be read again on top of itself."""
    _, worker, listener = _owning_both(journal, {})
    _open_transaction(worker, {T0: records(T0, range(0, 3))})
    journal.clear()
    listener.on_partitions_lost({T0, T1})
    assert worker._txn is None and worker.stats.aborts == 1
    assert journal == [("revoked", (T0, T1))]
    listener.on_partitions_assigned({T0, T1})  # the rejoin: both loaded afresh
    assert journal[1:] == [("assigned", (T0, T1)), ("seek", T0, 0), ("seek", T1, 0)]
    assert worker._txn is None


def test_a_stateless_worker_subscribes_without_a_listener() -> None:
    worker = StageWorker(KeepAll(), KafkaSettings(), StageMetrics("unit"), stage="unit")
    assert worker.state is None
    worker._resume([T0])  # nothing to ask, nothing to seek
