"""The scoring worker's per-partition filter state: what it commits with an offset, and
what a worker restores from it (services.scoring.worker)."""

from __future__ import annotations

import random

import pytest
from kafka.structs import TopicPartition

from services.runtime.backends.base import LMBackend
from services.scoring.core import ScoringCore
from services.scoring.settings import AskLLMSettings, ScoringSettings, SignalPolicy
from services.scoring.worker import METADATA_LIMIT, PartitionFilters

TP = TopicPartition("ingest", 3)


def _core(fraction: float = 0.3) -> ScoringCore:
    policy = SignalPolicy(mode="top_fraction", top_fraction=fraction)
    # The model is never loaded: only the filters are exercised.
    return ScoringCore(
        ScoringSettings(steps=["heuristics", "ask_llm"], ask_llm=AskLLMSettings(policy=policy)),
        backend=_no_model,
    )


def _no_model() -> LMBackend:
    raise AssertionError("no model needed")


def _scores(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.betavariate(2, 5) for _ in range(n)]


def _decide(adapter: PartitionFilters, tp: TopicPartition, scores: list[float]) -> list[bool]:
    adapter.on_record(tp, 0)
    assert adapter._current is not None
    return adapter._current["ask_llm"].decide(scores)


@pytest.mark.parametrize("seen", [3, 200])  # before and after P²'s five-value warm-up
def test_a_restored_partition_decides_exactly_as_the_uninterrupted_one(seen: int) -> None:
    stream = _scores(1, seen + 300)
    a = PartitionFilters(_core())
    a.restore(TP, "")
    _decide(a, TP, stream[:seen])
    committed = a.snapshot(TP)
    assert 0 < len(committed.encode()) < METADATA_LIMIT

    b = PartitionFilters(_core())
    b.restore(TP, committed)
    rest = [stream[i : i + 10] for i in range(seen, len(stream), 10)]
    assert [_decide(b, TP, c) for c in rest] == [_decide(a, TP, c) for c in rest]
    # and a fresh estimate would not have
    fresh = PartitionFilters(_core())
    fresh.restore(TP, "")
    if seen > 5:
        assert [_decide(fresh, TP, c) for c in rest] != [_decide(a, TP, c) for c in rest]


def test_partitions_keep_separate_estimates() -> None:
    a = PartitionFilters(_core())
    other = TopicPartition("ingest", 4)
    a.restore(TP, "")
    a.restore(other, "")
    _decide(a, TP, _scores(2, 100))
    assert a.snapshot(TP) != a.snapshot(other)
    a.forget([TP])
    assert a.snapshot(TP) == ""


def test_state_of_another_configuration_or_garbage_starts_afresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = PartitionFilters(_core(fraction=0.5))
    other.restore(TP, "")
    _decide(other, TP, _scores(3, 50))
    fresh = PartitionFilters(_core()).core.new_filters()["ask_llm"].state()
    for metadata in (other.snapshot(TP), "not json", '{"v": 99, "filters": {}}'):
        b = PartitionFilters(_core())
        b.restore(TP, metadata)
        assert b._by_tp[TP]["ask_llm"].state() == fresh
    assert "fresh start" in caplog.text


def test_no_top_fraction_no_state() -> None:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    a = PartitionFilters(core)
    a.restore(TP, "")
    a.on_record(TP, 0)
    assert a.snapshot(TP) == ""
