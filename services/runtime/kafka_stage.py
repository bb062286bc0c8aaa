"""The Kafka stage loop every service runs as a worker (kafka-python).

Delivery is one switch, ``kafka.processing_guarantee``:

- ``exactly_once`` (default): the outputs of up to ``transaction_interval_ms`` of polls
  (kept, dropped and dead-lettered copies) are buffered while the processor runs, then sent
  in one producer transaction with the consumed offsets (``send_offsets_to_transaction``
  with the consumer's group metadata, KIP-447): they commit together or not at all, and no
  transaction is open at the broker while a batch is being processed. Readers use
  ``isolation_level=read_committed`` (every stage does) and see each output exactly once,
  however often a worker is killed. A restarted worker with the same ``kafka.instance_id``
  fences its previous incarnation at once (``init_transactions``) and rejoins the group as
  the same static member; zombies of an old group generation are fenced by the broker when
  they try to commit offsets. A rebalance that moves a partition of the open transaction
  drops it (nothing of it was sent): committed afterwards, under the new generation, the
  broker would accept offsets of partitions that moved, whose new owner has already re-read
  them from the committed offsets, and their outputs would appear twice. The dropped records
  are read again from where the transaction started, by whoever owns each partition now.
- ``at_least_once``: a record's offset is committed only after every output it produced
  was acknowledged (acks=all), and only the unbroken run of finished records of each
  partition; a crash between acknowledgement and commit redelivers those records.

Output batch ids are ``<topic>-<partition>-<offset>[.<part>]@<stage>.<decision>``: the input
position says which input a batch came from (a redelivery repeats it) and ``<decision>`` is a
digest of the stage's model and config version, so a replay under a new version never looks
like a redelivery (protos/sluice/common/v1/sample.proto, ``batch_id``).

No single message can stop the loop: undecodable, unknown-schema and oversized inputs, and
batches that keep failing, go to the dead-letter topic with the reason, source position and
size in headers; a copy that would exceed the producer's limit keeps a truncated value (its
original size in a header) instead of failing the write. Output is split to fit the
smallest ``max.message.bytes`` of the topics it is written to (read from the broker at
start), and a single sample that cannot fit even alone is dead-lettered. On SIGTERM the
worker stops between records, commits what is done, and closes.

A stage that keeps state across records (density's pass-1 sketch) passes a ``StageState``:
the loop tells it which partition each record comes from, asks it to checkpoint before
every offset commit (under both guarantees), and on assignment (and after an aborted
transaction) seeks each partition to where the state says it resumes. The state, not the
committed offset, then decides where a partition restarts, so a SIGKILL loses nothing the
state checkpointed and re-reads nothing it holds.

A stage whose state is small and decides what it emits (scoring's top-X% quantile
estimates) passes a ``CommitState`` instead: its per-partition snapshot rides in the
metadata of the partition's offset commit, inside the same transaction as the outputs, so
the committed offset and the state that covers it can never disagree. A restarted worker
(or the next owner after a rebalance, or this one after an aborted transaction) restores
each partition's state from the committed metadata before its first record.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import (
    KafkaError,
    ProducerFencedError,
    TopicAlreadyExistsError,
    UnknownBrokerIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from services.runtime.codec import BatchCodec, Headers
from services.runtime.domain import Outcome, Sample
from services.runtime.errors import SluiceError, TooLarge, Unavailable
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.runtime.stage import StageCore

log = logging.getLogger(__name__)

H_DLQ_REASON = "sluice-dlq-reason"
H_DLQ_ERROR = "sluice-dlq-error"
H_DLQ_SIZE = "sluice-dlq-original-bytes"
H_DLQ_TRUNCATED = "sluice-dlq-truncated"
H_SOURCE = "sluice-source"
H_STAGE = "sluice-stage"
# Fetch/produce requests carry protocol framing beyond the value itself.
_FRAMING_BYTES = 64 * 1024
_TOPIC_WAIT_S = 30.0  # how long a starting worker waits for its input topic's metadata
# Room left in a produced message for its key, headers and record-batch overhead.
_RECORD_OVERHEAD = 16 * 1024
# The broker's default max.message.bytes, assumed when a topic's config cannot be read.
BROKER_DEFAULT_MESSAGE_BYTES = 1048588


@dataclass
class WorkerStats:
    """What a worker has done since it started (for logs and tests)."""

    records: int = 0
    samples_in: int = 0
    samples_out: int = 0
    dead_letters: int = 0
    commits: int = 0
    aborts: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_record_at: float | None = None  # time.monotonic() of the first record handled
    last_commit_at: float | None = None  # ... and of the last commit

    @property
    def busy_seconds(self) -> float:
        """From the first record to the last commit: the loop's own time for its work."""
        if self.first_record_at is None or self.last_commit_at is None:
            return 0.0
        return max(0.0, self.last_commit_at - self.first_record_at)


class _SendBuffer:
    """The outputs of one exactly-once transaction, held in memory until it commits. The
    processor runs with nothing open at the broker, so a slow batch (an LLM stage on a busy
    CPU) can never outlive ``transaction_timeout_ms``: the transaction spans only the sends."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes | None, bytes | None, Headers]] = []
        self.bytes = 0

    def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:  # fmt: skip
        self.items.append((topic, value, key, list(headers or [])))
        self.bytes += len(value or b"") + len(key or b"")


@dataclass
class _Transaction:
    """The exactly-once loop's pending transaction: outputs buffered, offsets remembered."""

    opened_at: float
    start: dict[TopicPartition, int] = field(default_factory=dict)  # first offset per partition
    done: dict[TopicPartition, int] = field(default_factory=dict)  # next offset per partition
    records: int = 0
    buffer: _SendBuffer = field(default_factory=_SendBuffer)

    @property
    def empty(self) -> bool:
        """Nothing read into it and nothing to send."""
        return not self.start and not self.buffer.items

    def due(self, settings: KafkaSettings) -> bool:
        return (time.monotonic() - self.opened_at) * 1000 >= settings.transaction_interval_ms or (
            self.buffer.bytes >= settings.transaction_max_bytes
        )


class StageState(Protocol):
    """Per-partition state a stage keeps across records and checkpoints itself (density's
    pass-1 sketches). The loop calls it from its own thread only (rebalance callbacks run
    inside ``poll``). Contract:

    - ``on_assigned(partitions)``: the worker now owns ``partitions`` (newly, or again after
      a rewind that followed ``on_revoked``); load their state and return the offset to
      resume each from. A partition left out resumes from the group's committed offset.
    - ``on_revoked(partitions)``: the worker no longer owns them (or rewinds them); forget
      their in-memory state. What was not checkpointed is re-read by the next owner.
      A partition a rebalance gives back to the same worker gets neither call: its
      in-memory state and position go on.
    - ``on_record(tp, offset)``: the next record handed to the processor comes from ``tp`` at
      ``offset`` (called for every record, dead-lettered ones included).
    - ``checkpoint(done)``: persist state covering every record handed over so far, before
      the loop commits ``done`` (next offset per partition); raising prevents the commit.
      Called at every commit point: each poll (at_least_once), each transaction (exactly_once).

    Resuming from the checkpoint rather than the commit is exact for a stage without outputs
    (a checkpoint may be ahead of a commit that then failed). A stage with outputs under
    exactly_once must resume from the checkpoint matching the committed offset instead.
    """

    def on_assigned(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...

    def on_revoked(self, partitions: list[TopicPartition]) -> None: ...

    def on_record(self, tp: TopicPartition, offset: int) -> None: ...

    def checkpoint(self, done: dict[TopicPartition, int]) -> None: ...


class CommitState(Protocol):
    """Per-partition state committed *with* the partition's offset, in the commit's metadata
    (Kafka keeps up to ``offset.metadata.max.bytes`` of it, 4 KiB by default; under
    exactly_once it is part of the transaction). For small state that decides outputs
    (scoring's quantile estimates): replaying a partition from its committed offset starts
    from exactly the state that offset was committed with, so decisions never count a record
    twice or miss one. The loop calls it from its own thread only. Contract:

    - ``restore(tp, metadata)``: the worker owns ``tp`` and is about to hand over its first
      record since it was assigned (or since an aborted transaction); ``metadata`` is what
      was committed with ``tp``'s offset ('' if nothing, or a commit without state).
    - ``on_record(tp, offset)``: the next record handed to the processor comes from ``tp``.
    - ``snapshot(tp)``: the state covering every record of ``tp`` handed over so far, as the
      text to commit with its offset.
    - ``forget(partitions)``: the worker no longer owns them (or rewinds them).
    """

    def restore(self, tp: TopicPartition, metadata: str) -> None: ...

    def on_record(self, tp: TopicPartition, offset: int) -> None: ...

    def snapshot(self, tp: TopicPartition) -> str: ...

    def forget(self, partitions: list[TopicPartition]) -> None: ...


def _names(partitions: Any) -> str:
    return ", ".join(f"{tp.topic}-{tp.partition}" for tp in sorted(partitions))


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks: logged (which worker owns what is the first question when a
    stage stalls), then handed to the worker, which settles its state and positions once
    the new assignment is known (``StageWorker._on_assigned``)."""

    def __init__(self, worker: StageWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        if not revoked:
            return
        log.info("stage %s revoked: %s", self.worker.stage, _names(revoked))
        self.worker._on_revoked(set(revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        if not lost:
            return
        log.warning("stage %s lost its group membership: %s", self.worker.stage, _names(lost))
        self.worker._on_lost(set(lost))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("stage %s assigned: %s", self.worker.stage, _names(assigned) or "nothing")
        self.worker._on_assigned(set(assigned))


def decision_digest(stage: str, version: str) -> str:
    """Short, stable digest of what decided (stage, model and config version): the suffix
    of every output batch id."""
    return hashlib.sha256(f"{stage}\0{version}".encode()).hexdigest()[:12]


class StageWorker:
    """Consumes SampleBatch messages, runs a processor, produces the kept samples."""

    def __init__(
        self,
        processor: StageCore,
        settings: KafkaSettings,
        metrics: StageMetrics,
        *,
        stage: str,
        codec: BatchCodec | None = None,
        dropped_topic: str = "",
        max_retries: int = 2,
        decision_version: str = "",
        state: StageState | None = None,
        commit_state: CommitState | None = None,
    ) -> None:
        """``decision_version``: the stage's model + config identity for batch ids (default:
        the processor's ``model_version``, read when the loop starts). ``state``: the stage's
        checkpointed per-partition state, if it keeps any (``StageState``);
        ``commit_state``: small state committed with the offsets (``CommitState``)."""
        self.processor = processor
        self.settings = settings
        self.metrics = metrics
        self.stage = stage
        self.codec = codec or BatchCodec(settings.max_message_bytes)
        self.dropped_topic = dropped_topic
        self.max_retries = max_retries
        self.decision_version = decision_version
        self.state = state
        self.commit_state = commit_state
        self._unrestored: set[TopicPartition] = set()
        self.stats = WorkerStats()
        self.produce_limit = settings.max_message_bytes
        self._out_codec = BatchCodec(settings.max_message_bytes)
        self._digest = ""
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._txn: _Transaction | None = None
        """exactly_once: the open transaction (outputs buffered, nothing sent yet)."""
        self._parked: _Transaction | None = None
        """The open transaction while a rebalance decides whether it may go on."""
        self._revoking: set[TopicPartition] = set()
        """Partitions revoked by a rebalance whose new assignment is not known yet."""

    @property
    def exactly_once(self) -> bool:
        return self.settings.processing_guarantee == "exactly_once"

    # -- lifecycle -------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the record in hand (thread- and signal-safe)."""
        self._stop.set()

    def assignment(self) -> set[TopicPartition]:
        """The partitions this worker owns right now (empty before it joined its group)."""
        consumer = self._consumer
        return set(consumer.assignment()) if consumer is not None else set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> graceful stop. Call from the main thread."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def _out_topics(self) -> list[str]:
        s = self.settings
        return [t for t in (s.output_topic, self.dropped_topic, s.dead_letter_topic) if t]

    def _connect(self) -> tuple[KafkaConsumer, KafkaProducer]:
        s = self.settings
        common = s.client_kwargs()
        fetch_bytes = s.max_message_bytes + _FRAMING_BYTES
        # The producer may not write more than the smallest topic it writes to accepts.
        self.produce_limit = min(s.max_message_bytes, topic_message_limit(s, self._out_topics()))
        self._out_codec = BatchCodec(max(1024, self.produce_limit - _RECORD_OVERHEAD))
        instance = s.instance_id or f"{uuid.uuid4().hex[:12]}"
        try:
            consumer = KafkaConsumer(
                **common,
                group_id=s.group_id,
                group_instance_id=s.instance_id or None,  # static membership when stable
                client_id=f"{s.client_id}-{self.stage}",
                enable_auto_commit=False,
                auto_offset_reset=s.auto_offset_reset,
                max_poll_records=s.max_poll_records,
                session_timeout_ms=s.session_timeout_ms,
                heartbeat_interval_ms=max(500, s.session_timeout_ms // 5),
                max_poll_interval_ms=s.max_poll_interval_ms,
                # eager assignors: the rebalance handling (_on_revoked) relies on it
                partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
                max_partition_fetch_bytes=fetch_bytes,
                fetch_max_bytes=max(fetch_bytes, 50 * 1024 * 1024),
                isolation_level="read_committed",
            )
            producer_kw: dict[str, Any] = {}
            if self.exactly_once:
                producer_kw = {
                    "transactional_id": f"{s.transactional_id_prefix or s.group_id}-{instance}",
                    "transaction_timeout_ms": s.transaction_timeout_ms,
                }
            producer = KafkaProducer(
                **common,
                client_id=f"{s.client_id}-{self.stage}",
                acks="all",
                linger_ms=5,
                max_request_size=self.produce_limit + _FRAMING_BYTES,
                retries=5,
                **producer_kw,
            )
            if self.exactly_once:
                # Fences any earlier producer with this transactional id (a killed
                # incarnation of this worker) and aborts its open transaction.
                producer.init_transactions()
        except KafkaError as exc:
            raise Unavailable(f"cannot reach Kafka at {s.bootstrap_servers}: {exc}") from exc
        self._consumer = consumer
        self._await_topic(consumer, s.input_topic)
        consumer.subscribe(
            [s.input_topic],
            listener=_RebalanceListener(self),
        )
        return consumer, producer

    def _await_topic(self, consumer: KafkaConsumer, topic: str) -> None:
        """Wait (bounded) until ``consumer``'s own metadata lists ``topic``.

        A consumer that joins its group before its metadata knows the input topic is
        assigned nothing and must rejoin; with kafka-python that early rejoin can leave the
        group leader stuck in its assignment. A topic created later is still picked up by
        the subscription's metadata refresh, so the wait gives up after
        ``_TOPIC_WAIT_S`` and subscribes anyway.
        """
        if not await_partitions(consumer, topic, self._stop, timeout_s=_TOPIC_WAIT_S):
            log.warning("input topic %s not in metadata yet; subscribing anyway", topic)

    def _resume(self, partitions: list[TopicPartition]) -> None:
        """Seek ``partitions`` to where the stage state resumes them (it loads them first);
        the commit state restores them lazily, before each one's first record."""
        if self.commit_state is not None:
            self._unrestored.update(partitions)
        if self.state is None or self._consumer is None:
            return
        for tp, offset in self.state.on_assigned(partitions).items():
            log.info("resuming %s-%d at offset %d (stage state)", tp.topic, tp.partition, offset)
            self._consumer.seek(tp, offset)

    def _forget_committed(self, partitions: list[TopicPartition]) -> None:
        if self.commit_state is not None:
            self.commit_state.forget(partitions)
            self._unrestored.difference_update(partitions)

    def _restore_committed(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        """Load ``tp``'s commit state from the metadata committed with its offset: the
        offset the consumer resumed from (only this worker commits ``tp`` while it owns it)."""
        assert self.commit_state is not None
        try:
            committed = consumer.committed(tp, metadata=True)
        except KafkaError as exc:
            raise Unavailable(f"cannot read the committed state of {tp}: {exc}") from exc
        metadata = (committed.metadata or "") if committed is not None else ""
        self.commit_state.restore(tp, metadata)
        self._unrestored.discard(tp)

    def _offsets(self, done: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        """What to commit: each partition's next offset, with its commit state."""
        cs = self.commit_state
        return {
            tp: OffsetAndMetadata(off, cs.snapshot(tp) if cs is not None else "", -1)
            for tp, off in done.items()
        }

    def run(self, *, idle_timeout_s: float | None = None) -> WorkerStats:
        """Run until stopped (or, if ``idle_timeout_s`` is set, until no input
        arrived for that long: for one-shot replays and tests)."""
        self._digest = decision_digest(
            self.stage, self.decision_version or self.processor.model_version
        )
        self.metrics.set_model_version(self.processor.model_version)
        consumer, producer = self._connect()
        self._consumer, self._producer = consumer, producer
        last_data = time.monotonic()
        log.info(
            "stage %s consuming %s -> %s (%s, produce limit %d bytes)",
            self.stage,
            self.settings.input_topic,
            self.settings.output_topic,
            self.settings.processing_guarantee,
            self.produce_limit,
        )
        self._txn = None
        clean = False
        try:
            while not self._stop.is_set():
                # a rebalance inside poll may drop the open transaction (_on_assigned)
                polled = poll_records(
                    consumer,
                    self._stop,
                    timeout_ms=self.settings.poll_timeout_ms,
                    max_records=self.settings.max_poll_records,
                )
                record_lag(self.metrics, self.stage, consumer)
                if polled:
                    last_data = time.monotonic()
                    if not self.exactly_once:
                        self._handle_poll(consumer, producer, polled)
                    else:
                        self._txn = self._txn or _Transaction(time.monotonic())
                        self._add_to_transaction(self._txn, polled)
                txn = self._txn
                if txn is not None and (not polled or txn.due(self.settings)):
                    self._txn = None
                    self._commit_transaction(consumer, producer, txn)
                if (
                    not polled
                    and idle_timeout_s is not None
                    and time.monotonic() - last_data > idle_timeout_s
                ):
                    break
            clean = True
        finally:
            txn, self._txn = self._txn, None
            if txn is not None and clean:  # stopped on request: keep what is done
                self._commit_transaction(consumer, producer, txn)
            consumer.close(autocommit=False)
            producer.close(timeout=self.settings.produce_timeout_s)
            self._consumer = self._producer = None
        log.info("stage %s stopped: %s", self.stage, self.stats)
        return self.stats

    # -- one poll --------------------------------------------------------
    def _process_records(
        self, producer: KafkaProducer | _SendBuffer, polled: dict[TopicPartition, list[Any]]
    ) -> tuple[dict[TopicPartition, int], list[Any]]:
        """Handle the records of one poll in order; the next offset per partition handled
        and the futures of everything sent. Stops between records when asked to."""
        done: dict[TopicPartition, int] = {}
        futures: list[Any] = []
        for tp, records in polled.items():
            for rec in records:
                if self._stop.is_set():
                    log.info("stop requested: the rest of the poll will be redelivered")
                    return done, futures
                if self.state is not None:
                    self.state.on_record(tp, rec.offset)
                if self.commit_state is not None:
                    if tp in self._unrestored and self._consumer is not None:
                        self._restore_committed(self._consumer, tp)
                    self.commit_state.on_record(tp, rec.offset)
                futures.extend(self._handle_record(producer, rec))
                done[tp] = rec.offset + 1
        return done, futures

    def _handle_poll(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        polled: dict[TopicPartition, list[Any]],
    ) -> None:
        """At-least-once: acknowledge every output, then commit the offsets."""
        done, futures = self._process_records(producer, polled)
        producer.flush(timeout=self.settings.produce_timeout_s)
        for fut in futures:
            try:
                fut.get(timeout=self.settings.produce_timeout_s)
            except KafkaError as exc:
                # Nothing of this poll is committed; the worker exits and its
                # replacement resumes from the last commit.
                raise Unavailable(f"broker did not acknowledge output: {exc}") from exc
        if done:
            if self.state is not None:
                self.state.checkpoint(done)
            consumer.commit(self._offsets(done))
            self.stats.commits += 1
            self.stats.last_commit_at = time.monotonic()

    def _add_to_transaction(
        self, txn: _Transaction, polled: dict[TopicPartition, list[Any]]
    ) -> None:
        """Exactly-once: process a poll into the pending transaction (outputs buffered,
        offsets remembered). A transaction collects polls for ``transaction_interval_ms`` (or
        ``transaction_max_bytes`` of output), so its fixed cost (four broker round trips) is
        shared by many batches."""
        for tp, records in polled.items():
            if records:
                txn.start.setdefault(tp, records[0].offset)
        done, _ = self._process_records(txn.buffer, polled)
        txn.done.update(done)
        txn.records += sum(len(r) for r in polled.values())

    def _commit_transaction(
        self, consumer: KafkaConsumer, producer: KafkaProducer, txn: _Transaction
    ) -> None:
        """Send the transaction's outputs and its input offsets, and commit: they become
        visible together. If it cannot commit (a rebalance took its partitions, a broker
        failed over) it is aborted and the consumer rewinds to its first offsets: nothing of
        it is visible, nothing is skipped."""
        if not txn.done and not txn.buffer.items:
            return
        if txn.done and self.state is not None:
            self.state.checkpoint(dict(txn.done))
        began = False
        try:
            producer.begin_transaction()
            began = True
            for topic, value, key, headers in txn.buffer.items:
                producer.send(topic, value=value, key=key, headers=headers)
            if txn.done:
                producer.send_offsets_to_transaction(
                    self._offsets(txn.done), consumer.group_metadata()
                )
            producer.commit_transaction()
            self.stats.commits += 1
            self.stats.last_commit_at = time.monotonic()
        except ProducerFencedError as exc:
            # A newer incarnation owns this transactional id: this one must not go on.
            raise Unavailable(f"producer fenced by a newer instance: {exc}") from exc
        except KafkaError as exc:
            self._abort(consumer, producer, txn, exc, began=began)

    # -- rebalances --------------------------------------------------------
    # The consumer uses the eager protocol: a rebalance first revokes every partition
    # (``_on_revoked``), then assigns the full new set (``_on_assigned``). kafka-python keeps
    # the position of a partition in both, and no other member can have read it in between
    # (one generation hands it out). So nothing is decided at revocation: a partition that
    # comes back keeps its position, its stage and commit state and its share of the open
    # transaction; only what moved away is forgotten. Eviction (``_on_lost``) is different:
    # the positions are gone and the partitions may already be read by others.
    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance begins: hold the open transaction (outputs buffered, nothing sent)
        and note what may leave; change nothing until the assignment is known."""
        if self._txn is not None and not self._txn.empty:
            self._parked = self._txn
        self._txn = None
        self._revoking |= revoked

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        """Evicted from the group (a missed session or poll deadline): drop the open
        transaction and forget every partition; whichever member owns them next, this one
        included, resumes them from their committed offsets."""
        txn = self._parked or self._txn
        self._txn = self._parked = None
        if txn is not None and not txn.empty:
            self.stats.aborts += 1
            log.warning(
                "lost the group with an open transaction: dropped its %d records (not sent)",
                txn.records,
            )
        gone, self._revoking = sorted(lost | self._revoking), set()
        self._release(gone)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """The new assignment is known. Partitions that moved away are forgotten; new ones
        are loaded and positioned (``_resume``); kept ones go on untouched. The parked
        transaction goes on if every one of its partitions was kept, else it is dropped.

        Committed after partitions moved, its offsets would be accepted: KIP-447 fences a
        member of an *old* generation, and this member commits with the new one, but the
        broker does not check that the partitions are still the member's. Their new owner
        has already resumed from the offsets committed before, so every record of the
        transaction from a moved partition would be output twice. Dropped, its records are
        read again from where it started: by the new owner from the committed offsets, and
        by this worker, whose kept partitions are rewound here (with their state)."""
        kept = self._revoking & assigned
        self._release(sorted(self._revoking - assigned))
        self._revoking = set()
        txn, self._parked = self._parked, None
        if txn is not None and set(txn.start) <= assigned:
            self._txn = txn
        elif txn is not None:
            self.stats.aborts += 1
            log.warning(
                "rebalance moved partitions of an open transaction: dropped its %d records "
                "(not sent); they are read again from where it started",
                txn.records,
            )
            self._rewind(txn, sorted(set(txn.start) & kept))
        fresh = sorted(assigned - kept)
        if fresh:
            self._resume(fresh)

    def _rewind(self, txn: _Transaction, partitions: list[TopicPartition]) -> None:
        """Rewind ``partitions`` to where ``txn`` started them, and reload their stage and
        commit state, which hold records of ``txn``. A stage state, not the transaction's
        start, then says where its partitions resume (it may have checkpointed them)."""
        if not partitions:
            return
        if self._consumer is not None:
            for tp in partitions:
                if tp in txn.start:
                    self._consumer.seek(tp, txn.start[tp])
        self._release(partitions)
        self._resume(partitions)

    def _release(self, partitions: list[TopicPartition]) -> None:
        """Forget the stage and commit state of ``partitions`` (moved away, or rewound)."""
        if not partitions:
            return
        if self.state is not None:
            self.state.on_revoked(partitions)
        self._forget_committed(partitions)

    def _abort(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        txn: _Transaction,
        exc: Exception,
        *,
        began: bool = True,
    ) -> None:
        self.stats.aborts += 1
        log.warning("transaction aborted (%s); rewinding to its first offsets", exc)
        try:
            if began:
                producer.abort_transaction()
        except ProducerFencedError as fenced:
            raise Unavailable(f"producer fenced by a newer instance: {fenced}") from fenced
        except KafkaError as again:
            # The producer is unusable; exit so a restart resumes from committed offsets.
            raise Unavailable(f"cannot abort transaction: {again}") from again
        assigned = set(consumer.assignment())
        # A stage state checkpointed every partition it holds just before the commit.
        self._rewind(txn, sorted(assigned if self.state is not None else assigned & set(txn.start)))

    def _handle_record(self, producer: KafkaProducer | _SendBuffer, rec: Any) -> list[Any]:
        s = self.settings
        source = f"{rec.topic}-{rec.partition}-{rec.offset}"
        self.stats.records += 1
        if self.stats.first_record_at is None:
            self.stats.first_record_at = time.monotonic()
        started = time.perf_counter()
        try:
            batch = self.codec.decode(rec.value, rec.headers)
        except SluiceError as exc:
            return [self._dead_letter(producer, rec, exc.dead_letter_reason, exc.message)]
        outcomes: list[Outcome] | None = None
        for attempt in range(self.max_retries + 1):
            try:
                outcomes = self.processor.process(batch.samples)
                break
            except SluiceError as exc:
                return [self._dead_letter(producer, rec, exc.dead_letter_reason, exc.message)]
            except Exception as exc:  # a bug or a resource failure: retry, then dead-letter
                self.stats.retries += 1
                log.exception("processing %s failed (attempt %d)", source, attempt + 1)
                if attempt == self.max_retries:
                    return [
                        self._dead_letter(
                            producer, rec, "processing_error", f"{type(exc).__name__}: {exc}"
                        )
                    ]
        assert outcomes is not None
        kept = [o.sample for o in outcomes if o.kept]
        dropped = [o.sample for o in outcomes if not o.kept]
        trace: Headers = [(H_SOURCE, source.encode()), (H_STAGE, self.stage.encode())]
        batch_id = f"{source}@{self.stage}.{self._digest}"
        futures = []
        for topic, samples, kind in (
            (s.output_topic, kept, ""),
            (self.dropped_topic, dropped, "d"),
        ):
            if not topic or not samples:
                continue
            for chunk_id, chunk in self._fit(samples, f"{batch_id}{kind}"):
                try:
                    value, headers = self._out_codec.encode(chunk, self.stage, chunk_id)
                except TooLarge as exc:  # one sample alone does not fit the topic
                    futures.append(
                        self._dead_letter(
                            producer,
                            rec,
                            "output_too_large",
                            f"sample {chunk[0].id}: {exc.message}",
                        )
                    )
                    continue
                futures.append(
                    producer.send(topic, value=value, key=rec.key, headers=headers + trace)
                )
        self.stats.samples_in += len(batch.samples)
        self.stats.samples_out += len(kept)
        for o in outcomes:
            if not o.kept:
                self.stats.reasons[o.reason] = self.stats.reasons.get(o.reason, 0) + 1
        self.metrics.observe_outcomes(outcomes, self.processor.signals, self.processor.steps)
        self.metrics.batches.labels(self.stage).inc()
        self.metrics.batch_seconds.labels(self.stage).observe(time.perf_counter() - started)
        return futures

    def _fit(self, samples: list[Sample], batch_id: str) -> list[tuple[str, list[Sample]]]:
        """Split ``samples`` into chunks whose encoding fits the produce limit (part ids
        derived from ``batch_id``, so a redelivery repeats them); a single sample that does
        not fit is returned alone, for the caller to dead-letter."""
        try:
            self._out_codec.encode(samples, self.stage, batch_id)
            return [(batch_id, samples)]
        except TooLarge:
            if len(samples) <= 1:
                return [(batch_id, samples)]
        mid = len(samples) // 2
        return self._fit(samples[:mid], f"{batch_id}.0") + self._fit(samples[mid:], f"{batch_id}.1")

    def _dead_letter(
        self, producer: KafkaProducer | _SendBuffer, rec: Any, reason: str, error: str
    ) -> Any:
        """Send a copy of ``rec`` to the dead-letter topic with why, where from and how big.
        The value is kept whole when it fits the producer's limit, else truncated (the
        original size in a header): a dead letter must never fail to be written."""
        log.warning(
            "dead-lettering %s-%d-%d: %s: %s", rec.topic, rec.partition, rec.offset, reason, error
        )
        self.stats.dead_letters += 1
        self.metrics.dead_letters.labels(self.stage, reason).inc()
        original = rec.value if rec.value is not None else b""
        headers: Headers = [
            *[(k, v) for k, v in (rec.headers or []) if v is None or len(v) <= 4096],
            (H_DLQ_REASON, reason.encode()),
            (H_DLQ_ERROR, error[:2000].encode("utf-8", "replace")),
            (H_SOURCE, f"{rec.topic}-{rec.partition}-{rec.offset}".encode()),
            (H_STAGE, self.stage.encode()),
            (H_DLQ_SIZE, str(len(original)).encode()),
        ]
        key = rec.key if rec.key is None or len(rec.key) <= 4096 else rec.key[:4096]
        room = (
            self.produce_limit - _RECORD_OVERHEAD - sum(len(k) + len(v or b"") for k, v in headers)
        )
        room -= len(key or b"")
        value = original
        if len(original) > max(0, room):
            value = original[: max(0, room)]
            headers.append((H_DLQ_TRUNCATED, b"true"))
        return producer.send(self.settings.dead_letter_topic, value=value, key=key, headers=headers)


POLL_ERROR_PATIENCE_S = 60.0
"""How long a consumer's polls may keep failing with transient broker errors (a broker
restarting, a leader moving) before the worker gives up with Unavailable."""
POLL_ERROR_PAUSE_S = 0.5
"""Pause between a poll that failed with a transient broker error and the next."""


def transient(exc: KafkaError) -> bool:
    """A broker error that passes on its own: kafka-python's retriable errors, and an unknown
    broker id (partition metadata names a leader the client's broker list does not have yet,
    a race while a broker restarts, which kafka-python 3 raises from ``poll`` as if fatal)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, UnknownBrokerIdError)


def poll_records(
    consumer: KafkaConsumer,
    stop: threading.Event | None = None,
    *,
    timeout_ms: int,
    max_records: int | None = None,
    patience_s: float = POLL_ERROR_PATIENCE_S,
    clock: Callable[[], float] = time.monotonic,
) -> dict[TopicPartition, list[Any]]:
    """``consumer.poll``, riding out transient broker errors (``transient``): a failed poll
    returned no records and moved no position, so it is tried again after
    ``POLL_ERROR_PAUSE_S``. Empty if ``stop`` is set while waiting; Unavailable once polls
    have failed for ``patience_s``. Other errors propagate as they are."""
    failing_since: float | None = None
    while True:
        try:
            polled: dict[TopicPartition, list[Any]] = consumer.poll(
                timeout_ms=timeout_ms, max_records=max_records
            )
            return polled
        except KafkaError as exc:
            if not transient(exc):
                raise
            now = clock()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= patience_s:
                raise Unavailable(
                    f"polls kept failing for {now - failing_since:.0f} s: {exc}"
                ) from exc
            log.warning("poll failed (%s): trying again", exc)
            if (stop or threading.Event()).wait(POLL_ERROR_PAUSE_S):
                return {}


def await_partitions(
    consumer: KafkaConsumer,
    topic: str,
    stop: threading.Event,
    *,
    timeout_s: float | None = None,
    interval_s: float = 0.5,
) -> set[int]:
    """``topic``'s partition ids once ``consumer``'s metadata lists it, refreshing every
    ``interval_s``; empty if ``stop`` is set or ``timeout_s`` passes first (None: no limit).
    Raises Unavailable if the metadata cannot be read."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not (parts := consumer.partitions_for_topic(topic)):
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return set()
            log.info("waiting for topic %s", topic)
            stop.wait(interval_s)
            consumer.topics()  # refresh metadata
    except KafkaError as exc:
        raise Unavailable(f"cannot read metadata for topic {topic}: {exc}") from exc
    return set(parts)


def record_lag(metrics: StageMetrics, stage: str, consumer: KafkaConsumer) -> None:
    """Set ``sluice_stage_consumer_lag`` (high watermark - position) for every partition the
    consumer holds whose high watermark the last fetch reported."""
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is None:
            continue
        try:
            pos = consumer.position(tp, timeout_ms=100)
        except Exception:  # position unknown while rebalancing
            continue
        metrics.consumer_lag.labels(stage, tp.topic, str(tp.partition)).set(max(0, hw - pos))


def topic_message_limit(settings: KafkaSettings, topics: Iterable[str]) -> int:
    """The smallest ``max.message.bytes`` of ``topics`` as the broker reports it (topics that
    do not exist yet get the broker default). What a producer may send to all of them."""
    names = sorted(set(topics))
    if not names:
        return settings.max_message_bytes
    try:
        admin = KafkaAdminClient(**settings.client_kwargs(), client_id="sluice-admin")
    except KafkaError as exc:
        raise Unavailable(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        known = [t for t in names if t in existing]
        limits = [BROKER_DEFAULT_MESSAGE_BYTES] if len(known) < len(names) else []
        if known:
            res = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t, ["max.message.bytes"]) for t in known],
                config_filter="all",
            )
            for t in known:
                entry = res.get("topic", {}).get(t, {}).get("max.message.bytes")
                limits.append(int(entry["value"]) if entry else BROKER_DEFAULT_MESSAGE_BYTES)
        return min(limits)
    except KafkaError as exc:
        log.warning("could not read max.message.bytes of %s (%s); assuming the default", names, exc)
        return BROKER_DEFAULT_MESSAGE_BYTES
    finally:
        admin.close()


# -- helpers for publishers, readers and operators -------------------------
def ensure_topics(
    bootstrap: str | KafkaSettings,
    topics: Iterable[str],
    partitions: int = 4,
    replication: int = 1,
    timeout_s: float = 30,
    configs: dict[str, str] | None = None,
) -> None:
    """Create topics that do not exist yet (idempotent), with topic ``configs`` (e.g.
    max.message.bytes). ``bootstrap``: an address, or settings that also carry security."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap) if isinstance(bootstrap, str) else bootstrap
    admin = KafkaAdminClient(
        **kafka.client_kwargs(),
        client_id="sluice-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(t, partitions, replication, topic_configs=dict(configs or {}))
            for t in topics
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def publish(
    producer: KafkaProducer,
    topic: str,
    samples: Iterable[Sample],
    *,
    batch_size: int = 256,
    codec: BatchCodec | None = None,
    stage: str = "ingest",
    batch_prefix: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Publish samples as SampleBatch messages of ``batch_size`` samples; waits for
    every acknowledgement. Returns the number of messages sent."""
    codec = codec or BatchCodec()
    futures = []
    for n, chunk in enumerate(_chunks(samples, batch_size)):
        for value, headers in codec.encode_split(chunk, stage, f"{batch_prefix}{n:08d}"):
            futures.append(
                producer.send(
                    topic, value=value, key=f"{batch_prefix}{n}".encode(), headers=headers
                )
            )
        if on_batch:
            on_batch(len(chunk))
    producer.flush()
    for f in futures:
        f.get(timeout=60)
    return len(futures)


def dedupe_batches(messages: Iterable[tuple[str, list[Sample]]]) -> Iterator[Sample]:
    """Samples from (batch_id, samples) pairs, each batch id taken once: what a
    reader does to turn at-least-once redelivery into exactly-once contents."""
    seen: set[str] = set()
    for batch_id, samples in messages:
        if batch_id in seen:
            continue
        seen.add(batch_id)
        yield from samples


def _chunks(items: Iterable[Sample], n: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
