"""The density worker's pieces around the stage loop, against an in-memory store: pass 1's
per-partition sketches and their checkpoints, pass 2 waiting for the merged sketch, and the
merge command being a no-op on a merged version."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kafka.structs import TopicPartition

from services.density.core import DensityCore
from services.density.settings import DensitySettings, SketchSettings
from services.density.state import SketchState, combine
from services.density.store import Checkpoint
from services.density.worker import (
    PartitionSketches,
    StoreLoader,
    merge_command,
    wait_for_reference,
)
from services.runtime.errors import FailedPrecondition, NotFound
from tests.unit.density.mixture import mixture

T0, T1 = TopicPartition("in", 0), TopicPartition("in", 1)
SKETCH = SketchSettings(
    name="w", version=3, hash="pstable", dim=384, rows=16, buckets=128, width=1.4
)


class MemoryStore:
    """The SketchStore calls the worker makes, in memory (checkpoints go through bytes, as
    they would through S3)."""

    def __init__(self) -> None:
        self.ckpts: dict[tuple[str, int], bytes] = {}
        self.merged: dict[int, SketchState] = {}
        self.puts = 0
        self.misses = 0

    def latest_checkpoint(
        self, name: str, fp: str, version: int, topic: str, partition: int
    ) -> Checkpoint | None:
        data = self.ckpts.get((topic, partition))
        return Checkpoint.from_bytes(data) if data else None

    def put_checkpoint(self, ckpt: Checkpoint) -> str:
        self.puts += 1
        self.ckpts[(ckpt.topic, ckpt.partition)] = ckpt.to_bytes()
        return f"{ckpt.label}/{ckpt.offset}"

    def is_merged(self, name: str, fp: str, version: int) -> bool:
        return version in self.merged

    def load_merged(self, name: str, fp: str, version: int | None = None) -> SketchState:
        found = self.merged.get(version or max(self.merged, default=0))
        if found is None:
            self.misses += 1
            raise NotFound(f"no merged sketch {name} v{version}")
        return found

    def merge_checkpoints(self, *_: Any, **__: Any) -> SketchState:
        raise AssertionError("a merged version must not be merged again")


def _core(mode: str = "two_pass_build", **kw: Any) -> DensityCore:
    return DensityCore(DensitySettings(mode=mode, sketch=SKETCH, calibration_size=32, **kw))  # type: ignore[arg-type]


def _feed(p: PartitionSketches, tp: TopicPartition, offset: int, samples: list[Any]) -> None:
    p.on_record(tp, offset)
    p.process(samples)


def test_each_partition_is_sketched_and_checkpointed_apart() -> None:
    core, store = _core(), MemoryStore()
    p = PartitionSketches(core, store)  # type: ignore[arg-type]
    data = mixture(seed=1, big=60, small=(20,)).samples()
    assert p.on_assigned([T0, T1]) == {T0: 0, T1: 0}  # nothing checkpointed: from the start
    _feed(p, T0, 0, data[:30])
    _feed(p, T1, 0, data[30:50])
    _feed(p, T0, 1, data[50:])
    p.checkpoint({T0: 2, T1: 1})
    assert store.puts == 2
    p.checkpoint({T0: 2, T1: 1})  # nothing advanced: nothing written
    assert store.puts == 2
    saved = {tp: store.latest_checkpoint("w", "", 3, tp.topic, tp.partition) for tp in (T0, T1)}
    assert {tp: (c.offset, c.state.n) for tp, c in saved.items() if c} == {
        T0: (2, 60),
        T1: (1, 20),
    }
    # The partitions' checkpoints add up to one sketch of everything.
    whole = _core()
    whole.build_batch(data, whole.vectors(data))
    merged = combine([c.state for c in saved.values() if c], ["a", "b"])
    np.testing.assert_array_equal(merged.sketch.counts, whole.state().sketch.counts)
    np.testing.assert_array_equal(merged.calibration.keys, whole.state().calibration.keys)


def test_a_new_owner_resumes_at_the_checkpoint_and_never_counts_twice() -> None:
    store = MemoryStore()
    data = mixture(seed=2, big=40, small=(10,)).samples()
    first = PartitionSketches(_core(), store)  # type: ignore[arg-type]
    first.on_assigned([T0])
    _feed(first, T0, 5, data[:20])  # offsets may skip (transaction markers)
    first.checkpoint({T0: 6})
    _feed(first, T0, 6, data[20:30])  # not checkpointed: lost with the worker
    first.on_revoked([T0])
    assert first.held == {}

    second = PartitionSketches(_core(), store)  # type: ignore[arg-type]
    assert second.on_assigned([T0]) == {T0: 6}
    held = second.held[T0].state
    assert held is not None and held.n == 20
    _feed(second, T0, 5, data[:20])  # a redelivered record already in the sketch: skipped
    _feed(second, T0, 6, data[20:30])
    assert held.n == 30
    second.checkpoint({T0: 7})
    ckpt = store.latest_checkpoint("w", "", 3, "in", 0)
    assert ckpt is not None and (ckpt.offset, ckpt.state.n) == (7, 30)


def test_a_record_of_an_unassigned_partition_is_a_bug() -> None:
    p = PartitionSketches(_core(), MemoryStore())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not assigned"):
        p.on_record(T1, 0)
    with pytest.raises(RuntimeError, match="without its partition"):
        p.process([])


def test_a_checkpoint_from_another_embedding_model_is_refused() -> None:
    store = MemoryStore()
    p = PartitionSketches(_core(), store)  # type: ignore[arg-type]
    p.on_assigned([T0])
    _feed(p, T0, 0, mixture(seed=3, big=8, small=()).samples())
    p.checkpoint({T0: 1})
    other = _core(embedding={"model": "other/model"})
    with pytest.raises(FailedPrecondition, match="embedded with"):
        PartitionSketches(other, store).on_assigned([T0])  # type: ignore[arg-type]


def test_pass_2_waits_for_the_merged_sketch_within_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    core = _core("two_pass_sample")
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s
        if now[0] >= 25:  # the build Job merges while pass 2 waits
            store.merged[3] = core.new_state("w", 3)

    with caplog.at_level("INFO"):
        got = wait_for_reference(core, store, 60, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert got.version == 3 and store.misses == 3
    assert "waiting for the merged sketch" in caplog.text

    never = MemoryStore()
    now[0] = 0.0

    def tick(s: float) -> None:
        now[0] += s

    with pytest.raises(NotFound):
        wait_for_reference(core, never, 25, sleep=tick, clock=lambda: now[0])  # type: ignore[arg-type]
    assert never.misses == 4 and now[0] == 25  # looked at 0, 10, 20, 25 s, then gave up


def test_merge_command_leaves_a_merged_version_alone(capsys: pytest.CaptureFixture[str]) -> None:
    store = MemoryStore()
    core = DensityCore(_core().settings, loader=StoreLoader(store))  # type: ignore[arg-type]
    store.merged[3] = core.new_state("w", 3)
    assert merge_command(core, core.settings) == 0
    assert "already merged" in capsys.readouterr().out
