"""The scoring stage's Kafka worker: the runtime loop, with its top-fraction filters kept per
input partition and committed with the partition's offsets.

"Keep the best X% so far" makes a decision depend on every score seen before it. Held in
memory only, that history would be lost by a SIGKILL (a restarted worker starts from an
empty estimate and judges its first batches against themselves) or counted twice (batches
of an aborted transaction re-read into an estimate that already saw them). So each input
partition has its own filters, and their state (five P² markers per filter, ~300 bytes)
is committed in the metadata of that partition's offset commit, inside the same
transaction as the outputs it decided (``services.runtime.kafka_stage.CommitState``). A
partition's decisions then depend only on its own records in offset order: replayed after a
crash, an aborted transaction or a rebalance, it gets exactly the decisions it got before.

Each partition carries a sample of the same stream, so per-partition estimates converge to
the same quantile; the price is a slower start (each partition warms up on its own
records). gRPC requests and local runs use the core's own, shared, filters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from kafka.structs import TopicPartition

from services.runtime.domain import Outcome, Sample
from services.runtime.kafka_stage import StageWorker
from services.runtime.metrics import StageMetrics
from services.runtime.settings import ServiceSettings
from services.scoring.core import Filters, ScoringCore

log = logging.getLogger(__name__)

STATE_VERSION = 1
METADATA_LIMIT = 4096
"""Kafka's default ``offset.metadata.max.bytes``: a commit with more metadata is refused."""


class PartitionFilters:
    """The worker's processor (the core, with the record's partition's filters) and its
    ``CommitState`` (those filters, committed with each partition's offset)."""

    def __init__(self, core: ScoringCore) -> None:
        self.core = core
        self._by_tp: dict[TopicPartition, Filters] = {}
        self._current: Filters | None = None

    # -- StageCore: the core, deciding with the current partition's filters -------------
    @property
    def signals(self) -> Sequence[str]:
        return self.core.signals

    @property
    def steps(self) -> Sequence[str]:
        return self.core.steps

    @property
    def model_version(self) -> str:
        return self.core.model_version

    def process(self, samples: list[Sample]) -> list[Outcome]:
        return self.core.process(samples, filters=self._current)

    # -- CommitState -------------------------------------------------------------------
    def restore(self, tp: TopicPartition, metadata: str) -> None:
        filters = self.core.new_filters()
        if metadata and filters:
            try:
                state = json.loads(metadata)
                if state.get("v") != STATE_VERSION or set(state["filters"]) != set(filters):
                    raise ValueError(f"state of steps {sorted(state['filters'])}")
                for step, f in filters.items():
                    f.load(state["filters"][step])
            except (ValueError, KeyError, TypeError) as exc:
                # Committed by another configuration (a different decision version): its
                # estimate is of another quantile. Start afresh, and say so.
                log.warning("%s: committed filter state not reusable (%s); fresh start", tp, exc)
                filters = self.core.new_filters()
        self._by_tp[tp] = filters

    def on_record(self, tp: TopicPartition, offset: int) -> None:
        filters = self._by_tp.get(tp)
        if filters is None:  # not restored: only when no commit state is wanted
            filters = self._by_tp[tp] = self.core.new_filters()
        self._current = filters

    def snapshot(self, tp: TopicPartition) -> str:
        filters = self._by_tp.get(tp)
        if not filters:
            return ""
        text = json.dumps(
            {"v": STATE_VERSION, "filters": {k: f.state() for k, f in filters.items()}},
            separators=(",", ":"),
        )
        if len(text.encode()) > METADATA_LIMIT:  # cannot happen with P² (fixed size)
            raise ValueError(f"filter state of {len(text)} bytes exceeds {METADATA_LIMIT}")
        return text

    def forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._by_tp.pop(tp, None)
        self._current = None


def make_worker(core: Any, settings: ServiceSettings, metrics: StageMetrics) -> StageWorker:
    """The registry's scoring worker: the runtime loop over ``PartitionFilters``."""
    from services.runtime.app import stage_worker

    adapter = PartitionFilters(core)
    return stage_worker("scoring", adapter, settings, metrics, commit_state=adapter)
