"""The sink's Kafka side: its own loop (the runtime StageWorker produces outputs and commits
offsets to a group; the sink produces files and commits manifests).

Partitions are assigned explicitly (``partition % replicas == replica_index`` of the input
topic and of every ``count_topics`` topic), not through a group rebalance: a SIGKILLed sink
restarted with the same ``writer_id`` owns the same partitions at once, without waiting for
the broker to expire its old membership, and where it resumes is read from the manifests
(``ShardWriter.recover``). After each manifest the offsets are also committed to the
consumer group, for lag metrics and the operator only; they are never read back. After
every poll it sets ``sluice_stage_consumer_lag`` like every stage worker.

A record that cannot be decoded is skipped (counted in
``sluice_stage_dead_letters_total{reason}``, logged with its position); its offset is still
covered by the next manifest, so it never stops the sink.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from services.runtime.codec import BatchCodec
from services.runtime.errors import SluiceError, Unavailable
from services.runtime.kafka_stage import await_partitions, poll_records, record_lag
from services.runtime.metrics import StageMetrics
from services.runtime.stage import StageCore
from services.sink.core import Manifest
from services.sink.metrics import SinkMetrics
from services.sink.settings import SinkSettings
from services.sink.target import Target, open_target
from services.sink.writer import ShardWriter

log = logging.getLogger(__name__)
STAGE = "sink"
_FRAMING_BYTES = 64 * 1024


@dataclass
class SinkStats:
    records: int = 0
    samples_written: int = 0
    samples_counted: int = 0
    manifests: int = 0
    skipped: int = 0


class SinkWorker:
    def __init__(
        self,
        core: StageCore,
        settings: SinkSettings,
        metrics: StageMetrics,
        target: Target | None = None,
    ) -> None:
        self.core = core
        self.settings = settings
        self.metrics = metrics
        self.sink_metrics = SinkMetrics(metrics.registry)
        self.target = target or open_target(settings.directory, settings.store)
        self.writer = ShardWriter(self.target, settings, self.sink_metrics)
        self.codec = BatchCodec(settings.kafka.max_message_bytes)
        self.stats = SinkStats()
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def _topics(self) -> list[str]:
        k = self.settings.kafka
        return [k.input_topic, *[t for t in self.settings.count_topics if t != k.input_topic]]

    def _partitions(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        """This replica's partitions, once every topic exists."""
        s = self.settings
        out: list[TopicPartition] = []
        for topic in self._topics():
            parts = await_partitions(consumer, topic, self._stop, interval_s=1.0)
            out += [
                TopicPartition(topic, p) for p in sorted(parts) if p % s.replicas == s.replica_index
            ]
        return out

    def _connect(self) -> KafkaConsumer:
        k = self.settings.kafka
        fetch = k.max_message_bytes + _FRAMING_BYTES
        try:
            return KafkaConsumer(
                **k.client_kwargs(),
                group_id=k.group_id,
                client_id=f"{k.client_id}-{STAGE}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=k.max_poll_records,
                max_partition_fetch_bytes=fetch,
                fetch_max_bytes=max(fetch, 50 * 1024 * 1024),
                isolation_level="read_committed",
            )
        except KafkaError as exc:
            raise Unavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from exc

    def run(self) -> SinkStats:
        consumer = self._connect()
        try:
            tps = self._partitions(consumer)
            consumer.assign(tps)
            resume = self.writer.recover()
            for tp in tps:
                at = resume.get((tp.topic, tp.partition))
                if at is None:
                    consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, at)
            log.info(
                "sink %s owns %d partitions; resuming %s", self.writer.writer, len(tps), resume
            )
            while not self._stop.is_set():
                polled = poll_records(
                    consumer, self._stop, timeout_ms=self.settings.kafka.poll_timeout_ms
                )
                record_lag(self.metrics, STAGE, consumer)
                for tp, records in polled.items():
                    for rec in records:
                        self._handle(tp, rec)
                if self.writer.due():
                    self._commit(consumer)
            self._commit(consumer)
        finally:
            consumer.close()
        return self.stats

    def _handle(self, tp: TopicPartition, rec: Any) -> None:
        write = tp.topic == self.settings.kafka.input_topic
        self.stats.records += 1
        try:
            samples = self.codec.decode(rec.value, rec.headers).samples
        except SluiceError as exc:
            where = f"{tp.topic}-{tp.partition}-{rec.offset}"
            log.warning("skipping %s: %s", where, exc.message)
            self.metrics.dead_letters.labels(STAGE, exc.dead_letter_reason).inc()
            self.stats.skipped += 1
            samples = []
        self.writer.add((tp.topic, tp.partition), rec.offset, samples, write=write)
        if write:
            self.stats.samples_written += len(samples)
            self.metrics.observe_outcomes(self.core.process(samples), (), ())
        else:
            self.stats.samples_counted += len(samples)

    def _commit(self, consumer: KafkaConsumer) -> Manifest | None:
        manifest = self.writer.commit()
        if manifest is None:
            return None
        self.stats.manifests += 1
        offsets = {
            TopicPartition(t, p): OffsetAndMetadata(end, "", -1)
            for (t, p), (_, end) in manifest.input.items()
        }
        try:
            consumer.commit(offsets)
        except KafkaError as exc:  # informational only: the manifest is what counts
            log.warning("could not commit offsets to the group (lag only): %s", exc)
        return manifest


def make_worker(core: StageCore, settings: SinkSettings, metrics: StageMetrics) -> SinkWorker:
    """The registry's ``worker`` hook."""
    return SinkWorker(core, settings, metrics)
