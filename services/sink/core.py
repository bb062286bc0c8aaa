"""The sink's pure logic: samples -> Parquet rows, per-stage counts from lineage, and the
manifest that commits a set of shards with the input offsets they cover.

A row holds what a trainer reads: ``id``, ``text`` or ``prompt``/``response``, ``source``,
``metadata`` (JSON text: HF ``datasets`` has no map type), one ``score_<name>`` column per
score, ``importance_weight`` (the density stage's 1/p, 1.0 where none was set, so weighted
sampling needs no special case), a compact ``lineage`` (``scoring:kept>density:kept``), and
where the sample came from in the sink's input (``input_partition``, ``input_offset``: what
the read API serves ranges of).

No Kafka, no storage here: services/sink/writer.py commits, services/sink/worker.py reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from services.runtime.domain import Action, Outcome, Sample

MANIFEST_FORMAT = "sluice.sink.manifest.v1"
MANIFESTS = "_manifests"
TMP = "_tmp"
BASE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("id", pa.string()),
    ("text", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("source", pa.string()),
    ("metadata", pa.string()),
    ("importance_weight", pa.float64()),
    ("lineage", pa.string()),
    ("input_partition", pa.int32()),
    ("input_offset", pa.int64()),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")

TopicPartition = tuple[str, int]


def score_column(name: str) -> str:
    return "score_" + re.sub(r"[^A-Za-z0-9_]+", "_", name)


def schema(score_names: Sequence[str]) -> pa.Schema:
    """Every shard's schema: the base columns, then one float64 column per score."""
    return pa.schema(
        [*(pa.field(n, t) for n, t in BASE_COLUMNS)]
        + [pa.field(score_column(s), pa.float64()) for s in score_names]
    )


def lineage_summary(sample: Sample) -> str:
    return ">".join(f"{e.stage}:{Action(e.action).name.lower()}" for e in sample.lineage)


def to_row(sample: Sample, partition: int, offset: int, weight_score: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": sample.id,
        "text": sample.text,
        "prompt": sample.prompt,
        "response": sample.response,
        "source": sample.source,
        "metadata": json.dumps(sample.metadata, sort_keys=True, ensure_ascii=False),
        "importance_weight": float(sample.scores.get(weight_score, 1.0)),
        "lineage": lineage_summary(sample),
        "input_partition": partition,
        "input_offset": offset,
    }
    for name, value in sample.scores.items():
        row[score_column(name)] = float(value)
    return row


def row_bytes(sample: Sample) -> int:
    """What a row weighs in memory, roughly (the roll size counts this)."""
    return len(sample.text) + len(sample.prompt) + len(sample.response) + 128


def partition_value(sample: Sample, partition_by: str, now: datetime | None = None) -> str:
    """The folder a sample's shard goes in ('' = the root)."""
    if partition_by == "source":
        return _UNSAFE.sub("_", sample.source) or "_unknown"
    if partition_by == "date":
        return (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    return ""


@dataclass
class StageCount:
    kept: int = 0
    dropped: int = 0

    @property
    def retention(self) -> float | None:
        seen = self.kept + self.dropped
        return self.kept / seen if seen else None


@dataclass
class StageCounts:
    """Per-stage kept/dropped counts and model versions, read off samples' lineage: a sample
    that reached the sink (or an upstream dropped topic) names every stage it passed."""

    stages: dict[str, StageCount] = field(default_factory=dict)
    versions: dict[str, set[str]] = field(default_factory=dict)

    def observe(self, sample: Sample) -> None:
        decided: dict[str, bool] = {}
        for e in sample.lineage:
            dropped = Action(e.action) == Action.DROPPED
            decided[e.stage] = decided.get(e.stage, False) or dropped
            if e.model_version:
                self.versions.setdefault(e.stage, set()).add(e.model_version)
        for st, dropped in decided.items():
            c = self.stages.setdefault(st, StageCount())
            if dropped:
                c.dropped += 1
            else:
                c.kept += 1

    def merge(self, other: StageCounts) -> None:
        for st, c in other.stages.items():
            mine = self.stages.setdefault(st, StageCount())
            mine.kept += c.kept
            mine.dropped += c.dropped
        for st, vs in other.versions.items():
            self.versions.setdefault(st, set()).update(vs)

    def to_json(self) -> dict[str, Any]:
        return {
            "retention": {
                st: {"kept": c.kept, "dropped": c.dropped, "retention": c.retention}
                for st, c in sorted(self.stages.items())
            },
            "model_versions": {st: sorted(v) for st, v in sorted(self.versions.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageCounts:
        out = cls()
        for st, c in (data.get("retention") or {}).items():
            out.stages[st] = StageCount(int(c["kept"]), int(c["dropped"]))
        for st, vs in (data.get("model_versions") or {}).items():
            out.versions[st] = set(vs)
        return out


@dataclass(frozen=True)
class ShardFile:
    key: str
    partition: str
    rows: int
    bytes: int


@dataclass
class Manifest:
    """One commit of one writer: the shards it made visible, the input offsets
    ``[start, end)`` of every topic partition it consumed since its previous commit, and
    what the corpus so far is made of (this writer's cumulative rows, per-stage retention
    and model versions). The highest ``end`` of a partition over all manifests is where that
    partition resumes: the manifests, not the consumer group, are the source of truth."""

    writer: str
    seq: int
    input: dict[TopicPartition, tuple[int, int]]
    files: list[ShardFile]
    score_columns: list[str]
    commit: StageCounts
    totals: StageCounts
    rows: int
    total_rows: int
    committed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def key(self) -> str:
        return manifest_key(self.writer, self.seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "writer": self.writer,
            "seq": self.seq,
            "committed_at": self.committed_at,
            "input": {f"{t}:{p}": list(r) for (t, p), r in sorted(self.input.items())},
            "files": [vars(f) for f in self.files],
            "rows": self.rows,
            "total_rows": self.total_rows,
            "columns": schema(self.score_columns).names,
            "score_columns": self.score_columns,
            "commit": self.commit.to_json(),
            **self.totals.to_json(),
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a sink manifest: format {data.get('format')!r}")
        inp: dict[TopicPartition, tuple[int, int]] = {}
        for tp, (start, end) in data["input"].items():
            topic, _, part = tp.rpartition(":")
            inp[(topic, int(part))] = (int(start), int(end))
        return cls(
            writer=data["writer"],
            seq=int(data["seq"]),
            input=inp,
            files=[ShardFile(**f) for f in data["files"]],
            score_columns=list(data["score_columns"]),
            commit=StageCounts.from_json(data["commit"]),
            totals=StageCounts.from_json(data),
            rows=int(data["rows"]),
            total_rows=int(data["total_rows"]),
            committed_at=data["committed_at"],
        )


def manifest_key(writer: str, seq: int) -> str:
    return f"{MANIFESTS}/{writer}/{seq:010d}.json"


def shard_key(partition: str, writer: str, seq: int, index: int) -> str:
    name = f"part-{writer}-{seq:010d}-{index:03d}.parquet"
    return f"{partition}/{name}" if partition else name


def shard_seq(key: str, writer: str) -> int | None:
    """The commit number of one of ``writer``'s shard names, None for anything else."""
    m = re.search(rf"(?:^|/)part-{re.escape(writer)}-(\d{{10}})-\d{{3}}\.parquet$", key)
    return int(m.group(1)) if m else None


def resume_offsets(manifests: Iterable[Manifest]) -> dict[TopicPartition, int]:
    """Where each input partition resumes: the highest end any manifest committed."""
    out: dict[TopicPartition, int] = {}
    for m in manifests:
        for tp, (_, end) in m.input.items():
            out[tp] = max(out.get(tp, 0), end)
    return out


class SinkCore:
    """The sink as a StageCore (what the registry builds in every mode): it decides nothing,
    every sample it is handed is kept; the writing is the worker's (services/sink/worker.py)."""

    signals: Sequence[str] = ()
    steps: Sequence[str] = ()

    def __init__(self, settings: Any, *, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics

    @property
    def model_version(self) -> str:
        return "sink-v1"

    def process(self, samples: list[Sample]) -> list[Outcome]:
        return [Outcome(s, True) for s in samples]
