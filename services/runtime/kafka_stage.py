"""The Kafka stage loop every service runs as a worker (kafka-python).

Delivery is at-least-once: a record's offset is committed only after the
output it produced has been acknowledged by the broker (acks=all), and only the
unbroken run of finished records of each partition is committed. A crash
between acknowledgement and commit re-delivers those input records; their
outputs carry deterministic batch ids (``<topic>-<partition>-<offset>``) so a
downstream reader can drop the repeats (``dedupe_batches``).

Malformed input never stops the loop: it goes to the dead-letter topic with the
reason in headers, and the offset moves on. On SIGTERM the worker stops
between records, commits what is done, and closes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata, TopicPartition

from services.runtime.codec import BatchCodec, Headers
from services.runtime.domain import Outcome, Sample
from services.runtime.errors import SluiceError, Unavailable
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.runtime.stage import StageCore

log = logging.getLogger(__name__)

H_DLQ_REASON = "sluice-dlq-reason"
H_DLQ_ERROR = "sluice-dlq-error"
H_SOURCE = "sluice-source"
H_STAGE = "sluice-stage"
# Fetch/produce requests carry protocol framing beyond the value itself.
_FRAMING_BYTES = 64 * 1024


@dataclass
class WorkerStats:
    """What a worker has done since it started (for logs and tests)."""

    records: int = 0
    samples_in: int = 0
    samples_out: int = 0
    dead_letters: int = 0
    commits: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.processor = processor
        self.settings = settings
        self.metrics = metrics
        self.stage = stage
        self.codec = codec or BatchCodec(settings.max_message_bytes)
        self.dropped_topic = dropped_topic
        self.max_retries = max_retries
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None

    # -- lifecycle -------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the record in hand (thread- and signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> graceful stop. Call from the main thread."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def _connect(self) -> tuple[KafkaConsumer, KafkaProducer]:
        s = self.settings
        fetch_bytes = s.max_message_bytes + _FRAMING_BYTES
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=s.bootstrap_servers.split(","),
                group_id=s.group_id,
                client_id=f"{s.client_id}-{self.stage}",
                enable_auto_commit=False,
                auto_offset_reset=s.auto_offset_reset,
                max_poll_records=s.max_poll_records,
                session_timeout_ms=s.session_timeout_ms,
                max_poll_interval_ms=s.max_poll_interval_ms,
                max_partition_fetch_bytes=fetch_bytes,
                fetch_max_bytes=max(fetch_bytes, 50 * 1024 * 1024),
            )
            producer = KafkaProducer(
                bootstrap_servers=s.bootstrap_servers.split(","),
                client_id=f"{s.client_id}-{self.stage}",
                acks="all",
                linger_ms=5,
                max_request_size=s.max_message_bytes + _FRAMING_BYTES,
                retries=5,
            )
        except KafkaError as exc:
            raise Unavailable(f"cannot reach Kafka at {s.bootstrap_servers}: {exc}") from exc
        consumer.subscribe([s.input_topic])
        return consumer, producer

    def run(self, *, idle_timeout_s: float | None = None) -> WorkerStats:
        """Run until stopped (or, if ``idle_timeout_s`` is set, until no input
        arrived for that long: for one-shot replays and tests)."""
        consumer, producer = self._connect()
        self._consumer, self._producer = consumer, producer
        last_data = time.monotonic()
        log.info(
            "stage %s consuming %s -> %s",
            self.stage,
            self.settings.input_topic,
            self.settings.output_topic,
        )
        try:
            while not self._stop.is_set():
                polled = consumer.poll(
                    timeout_ms=self.settings.poll_timeout_ms,
                    max_records=self.settings.max_poll_records,
                )
                self._update_lag(consumer)
                if not polled:
                    if idle_timeout_s is not None and time.monotonic() - last_data > idle_timeout_s:
                        break
                    continue
                last_data = time.monotonic()
                self._handle_poll(consumer, producer, polled)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=self.settings.produce_timeout_s)
            self._consumer = self._producer = None
        log.info("stage %s stopped: %s", self.stage, self.stats)
        return self.stats

    # -- one poll --------------------------------------------------------
    def _handle_poll(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        polled: dict[TopicPartition, list[Any]],
    ) -> None:
        done: dict[TopicPartition, int] = {}
        futures: list[Any] = []
        abandoned = False
        for tp, records in polled.items():
            for rec in records:
                if self._stop.is_set():
                    abandoned = True
                    break
                futures.extend(self._handle_record(producer, rec))
                done[tp] = rec.offset + 1
        # Acknowledge before commit: the at-least-once guarantee.
        producer.flush(timeout=self.settings.produce_timeout_s)
        for fut in futures:
            try:
                fut.get(timeout=self.settings.produce_timeout_s)
            except KafkaError as exc:
                # Nothing of this poll is committed; the worker exits and its
                # replacement resumes from the last commit.
                raise Unavailable(f"broker did not acknowledge output: {exc}") from exc
        if done:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in done.items()})
            self.stats.commits += 1
        if abandoned:
            log.info("stop requested: abandoned the rest of the poll; it will be redelivered")

    def _handle_record(self, producer: KafkaProducer, rec: Any) -> list[Any]:
        s = self.settings
        source = f"{rec.topic}-{rec.partition}-{rec.offset}"
        self.stats.records += 1
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
        futures = []
        for topic, samples, suffix in (
            (s.output_topic, kept, ""),
            (self.dropped_topic, dropped, ".dropped"),
        ):
            if not topic or not samples:
                continue
            for value, headers in self.codec.encode_split(samples, self.stage, source + suffix):
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

    def _dead_letter(self, producer: KafkaProducer, rec: Any, reason: str, error: str) -> Any:
        log.warning(
            "dead-lettering %s-%d-%d: %s: %s", rec.topic, rec.partition, rec.offset, reason, error
        )
        self.stats.dead_letters += 1
        self.metrics.dead_letters.labels(self.stage, reason).inc()
        headers = [
            *list(rec.headers or []),
            (H_DLQ_REASON, reason.encode()),
            (H_DLQ_ERROR, error[:2000].encode("utf-8", "replace")),
            (H_SOURCE, f"{rec.topic}-{rec.partition}-{rec.offset}".encode()),
            (H_STAGE, self.stage.encode()),
        ]
        value = (
            rec.value
            if rec.value is None or len(rec.value) <= self.settings.max_message_bytes
            else None
        )
        return producer.send(
            self.settings.dead_letter_topic, value=value, key=rec.key, headers=headers
        )

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            try:
                pos = consumer.position(tp, timeout_ms=100)
            except Exception:  # position unknown while rebalancing
                continue
            self.metrics.consumer_lag.labels(self.stage, tp.topic, str(tp.partition)).set(
                max(0, hw - pos)
            )


# -- helpers for publishers, readers and operators -------------------------
def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = 4,
    replication: int = 1,
    timeout_s: float = 30,
) -> None:
    """Create topics that do not exist yet (idempotent)."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        client_id="sluice-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, replication) for t in topics if t not in existing]
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
