"""The sink's commit protocol on a real directory: shards appear only through manifests,
a restart resumes at the committed offsets and removes what a killed run left, a second
writer with the same id cannot commit twice, and the output loads with the readers
trainers use (pyarrow.dataset, HF datasets) with importance weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from services.runtime.domain import Action, LineageEvent, Sample
from services.runtime.errors import FailedPrecondition
from services.sink.core import StageCounts, lineage_summary, shard_key
from services.sink.reader import committed_files, iter_rows, summary
from services.sink.settings import SinkSettings
from services.sink.target import LocalTarget
from services.sink.writer import ShardWriter, load_manifests

T = "sluice.sampled"


def sample(i: int, source: str = "web", weight: float | None = 2.0) -> Sample:
    scores = {"heuristics_quality": 0.5 + i / 1000}
    if weight is not None:
        scores["density_weight"] = weight
    return Sample(
        id=f"s{i:04d}",
        text=f"document {i} " * 5,
        source=source,
        metadata={"lang": "en"},
        scores=scores,
        lineage=[
            LineageEvent("scoring", Action.KEPT, model_version="heur-1"),
            LineageEvent("density", Action.KEPT, model_version="sketch-v3"),
        ],
    )


def settings(tmp_path: Path, **kw: object) -> SinkSettings:
    return SinkSettings.model_validate({"directory": str(tmp_path / "out"), **kw})


def writer(tmp_path: Path, **kw: object) -> ShardWriter:
    s = settings(tmp_path, **kw)
    return ShardWriter(LocalTarget(s.directory), s)


def test_commit_writes_zstd_shards_per_source_and_a_manifest(tmp_path: Path) -> None:
    w = writer(tmp_path)
    assert w.recover() == {}
    w.add((T, 0), 10, [sample(1, "web"), sample(2, "books")])
    w.add((T, 1), 4, [sample(3, "web", weight=None)])
    m = w.commit()
    assert m is not None and m.seq == 1 and m.rows == 3
    assert m.input == {(T, 0): (10, 11), (T, 1): (4, 5)}
    assert sorted(f.partition for f in m.files) == ["books", "web"]
    files = committed_files(w.target)
    assert all(Path(f).is_file() for f in files)
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    table = ds.dataset(files, format="parquet").to_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["s0003"]["importance_weight"] == 1.0  # no density weight -> 1
    assert rows["s0001"]["importance_weight"] == 2.0
    assert rows["s0001"]["lineage"] == "scoring:kept>density:kept"
    assert json.loads(rows["s0001"]["metadata"]) == {"lang": "en"}
    assert rows["s0002"]["score_heuristics_quality"] == pytest.approx(0.502)
    assert (rows["s0003"]["input_partition"], rows["s0003"]["input_offset"]) == (1, 4)
    doc = json.loads((tmp_path / "out" / m.key).read_text())
    assert doc["model_versions"] == {"density": ["sketch-v3"], "scoring": ["heur-1"]}
    assert doc["retention"]["scoring"] == {"kept": 3, "dropped": 0, "retention": 1.0}
    assert w.commit() is None  # nothing open


def test_datasets_and_pyarrow_load_the_committed_shards(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    w = writer(tmp_path, partition_by="none")
    w.recover()
    for off in range(3):
        w.add((T, 0), off, [sample(off * 10 + j, weight=1.0 + j) for j in range(4)])
        w.commit()
    files = committed_files(w.target)
    assert len(files) == 3
    d = datasets.load_dataset("parquet", data_files=files, split="train")
    assert d.num_rows == 12
    assert sorted(d["importance_weight"]) == sorted([1.0, 2.0, 3.0, 4.0] * 3)
    assert set(d.column_names) >= {"id", "text", "source", "importance_weight", "lineage"}
    t = ds.dataset(files, format="parquet").to_table(columns=["id", "importance_weight"])
    assert sorted(t.column("id").to_pylist()) == sorted(d["id"])


def test_restart_resumes_at_the_manifest_and_removes_uncommitted_files(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.recover()
    w.add((T, 0), 0, [sample(0)])
    w.add((T, 0), 1, [sample(1)])
    w.commit()
    # A run killed between publishing shard 2 and claiming its manifest, and one killed
    # while writing a tmp file.
    out = tmp_path / "out"
    orphan = out / shard_key("web", "w0", 2, 0)
    orphan.write_bytes(b"half a commit")
    tmp = out / "_tmp" / "w0" / "0000000003-000.parquet"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"partial")
    other = out / shard_key("web", "w1", 5, 0)  # another writer's file: not ours to judge
    other.write_bytes(b"x")
    again = writer(tmp_path)
    assert again.recover() == {(T, 0): 2}
    assert not orphan.exists() and not tmp.exists() and other.exists()
    assert again.seq == 1 and again.total_rows == 2
    again.add((T, 0), 2, [sample(2)])
    m = again.commit()
    assert m is not None and m.seq == 2 and m.total_rows == 3
    rows = [r for batch in iter_rows(again.target) for r in batch]
    assert [r["id"] for r in rows] == ["s0000", "s0001", "s0002"]


def test_a_second_writer_with_the_same_id_cannot_commit_the_same_number(tmp_path: Path) -> None:
    a, b = writer(tmp_path), writer(tmp_path)
    a.recover()
    b.recover()
    a.add((T, 0), 0, [sample(0)])
    b.add((T, 0), 0, [sample(0)])
    assert a.commit() is not None
    with pytest.raises(FailedPrecondition, match="already committed"):
        b.commit()
    assert len(load_manifests(a.target)) == 1


def test_resume_is_the_highest_end_over_every_writer(tmp_path: Path) -> None:
    a = writer(tmp_path, writer_id="a")
    b = writer(tmp_path, writer_id="b")
    a.recover()
    b.recover()
    a.add((T, 0), 5, [sample(5)])
    a.commit()
    b.add((T, 0), 9, [sample(9)])  # the partition moved to b
    b.add((T, 1), 3, [sample(3)])
    b.commit()
    assert writer(tmp_path, writer_id="c").recover() == {(T, 0): 10, (T, 1): 4}


def test_counted_topics_give_per_stage_retention_without_rows(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.recover()
    dropped = Sample(
        id="d1",
        text="junk",
        lineage=[LineageEvent("scoring", Action.DROPPED, "heuristics:short", "heur-1")],
    )
    w.add((T, 0), 0, [sample(0), sample(1)])
    w.add(("sluice.scored.dropped", 0), 7, [dropped], write=False)
    m = w.commit()
    assert m is not None and m.rows == 2
    assert m.input[("sluice.scored.dropped", 0)] == (7, 8)
    s = summary(w.target)
    assert s["rows"] == 2
    assert s["retention"]["scoring"]["kept"] == 2
    assert s["retention"]["scoring"]["dropped"] == 1
    assert s["retention"]["scoring"]["retention"] == pytest.approx(2 / 3)


def test_roll_is_due_by_size(tmp_path: Path) -> None:
    w = writer(tmp_path, roll={"max_bytes": 1024, "max_seconds": 3600})
    w.recover()
    w.add((T, 0), 0, [sample(0)])
    assert not w.due()
    w.add((T, 0), 1, [sample(i) for i in range(1, 20)])
    assert w.due()


def test_lineage_summary_and_counts() -> None:
    s = sample(1)
    assert lineage_summary(s) == "scoring:kept>density:kept"
    c = StageCounts()
    c.observe(s)
    assert c.stages["density"].kept == 1 and c.versions["scoring"] == {"heur-1"}


def test_date_partition(tmp_path: Path) -> None:
    w = writer(tmp_path, partition_by="date")
    w.recover()
    w.add((T, 0), 0, [sample(0)])
    m = w.commit()
    assert m is not None
    (f,) = m.files
    assert len(f.partition) == 10 and f.partition[4] == "-"


def test_commit_metrics(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from services.sink.metrics import SinkMetrics

    registry = CollectorRegistry()
    s = settings(tmp_path)
    w = ShardWriter(LocalTarget(s.directory), s, SinkMetrics(registry))
    w.recover()
    w.add((T, 0), 0, [sample(0, "web"), sample(1, "books")])
    value = registry.get_sample_value
    last_commit = "sluice_sink_last_commit_timestamp_seconds"
    assert value(last_commit, {"writer": w.writer}) is None  # no commit yet: no series
    before = time.time()
    m = w.commit()
    assert m is not None
    committed_at = value(last_commit, {"writer": w.writer})
    assert committed_at is not None and before <= committed_at <= time.time()
    assert value("sluice_sink_rows_written_total") == 2
    assert value("sluice_sink_files_committed_total") == 2
    assert value("sluice_sink_manifests_committed_total") == 1
    assert value("sluice_sink_written_bytes_total") == sum(f.bytes for f in m.files) > 0
    assert value("sluice_sink_commit_seconds_count") == 1
