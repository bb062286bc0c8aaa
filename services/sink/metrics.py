"""The sink's own Prometheus metrics, on the process's StageMetrics registry: rows and
bytes written, files and manifests committed, how long a commit takes and when the last one
was (how fresh the dataset a trainer reads is)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.runtime.metrics import LATENCY_BUCKETS


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "sluice_sink_rows_written", "Rows in committed shards.", registry=registry
        )
        self.bytes = Counter(
            "sluice_sink_written_bytes",
            "Bytes of committed Parquet shards (compressed, as stored).",
            registry=registry,
        )
        self.files = Counter(
            "sluice_sink_files_committed", "Shards made visible by a manifest.", registry=registry
        )
        self.manifests = Counter(
            "sluice_sink_manifests_committed", "Manifests committed.", registry=registry
        )
        self.counted = Counter(
            "sluice_sink_counted_samples",
            "Samples read from count_topics (upstream drops), counted for retention only.",
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "sluice_sink_commit_seconds",
            "Time to write, publish and commit one set of shards and its manifest.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Labelled by writer (one per replica: bounded) so a replica that stopped committing
        # shows even while the others go on; no series until the first commit.
        self.last_commit = Gauge(
            "sluice_sink_last_commit_timestamp_seconds",
            "Unix time of this writer's last committed manifest.",
            ["writer"],
            registry=registry,
        )
