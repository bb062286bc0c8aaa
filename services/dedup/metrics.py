"""The dedup stage's own Prometheus metrics, on the process's StageMetrics registry:
duplicates found per level and the size of the shared state. Drops by reason
(``sluice_stage_samples_dropped_total{reason="dedup:near"}``) come from the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.runtime.metrics import TRANSPORT

if TYPE_CHECKING:
    from services.dedup.core import Verdict
    from services.dedup.store import StoreStats


class DedupMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duplicates = Counter(
            "sluice_dedup_duplicates",
            "Duplicates found, by level (exact, near, semantic) and transport.",
            ["level", "transport"],
            registry=registry,
        )
        self.state_keys = Gauge(
            "sluice_dedup_state_keys",
            "Keys in the dedup state store (claims and stored signatures/vectors).",
            registry=registry,
        )
        self.state_bytes = Gauge(
            "sluice_dedup_state_bytes",
            "Bytes the dedup state store uses (Redis used_memory; SQLite file size).",
            registry=registry,
        )

    def observe(self, verdicts: Sequence[Verdict]) -> None:
        tr = TRANSPORT.get()
        for v in verdicts:
            if v.level:
                self.duplicates.labels(v.level, tr).inc()

    def observe_state(self, stats: StoreStats) -> None:
        self.state_keys.set(stats.keys)
        self.state_bytes.set(stats.bytes)
