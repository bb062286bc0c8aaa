"""Exactly-once shards: the sink's commit protocol on a ``Target``.

A commit (1) writes each open shard under ``_tmp/<writer>/``, (2) moves it to its final
name ``<partition>/part-<writer>-<seq>-<i>.parquet``, then (3) claims
``_manifests/<writer>/<seq>.json`` with a write that fails if the name is taken. Only the
manifest makes shards part of the dataset; readers list manifests, never folders
(``services.sink.reader``). The manifest records the input offsets ``[start, end)`` the
commit covers, so on start (``recover``) the writer:

- seeks every input partition to the highest ``end`` any manifest committed: rows of a
  committed manifest are never read again, rows after it always are;
- deletes its own shards numbered above its last manifest and its tmp files: what a kill
  between (2) and (3) left behind is never visible and never mistaken for data;
- continues its numbering and cumulative counts from its last manifest.

A second writer with the same ``writer_id`` (a zombie) loses the manifest claim and stops
(FailedPrecondition) instead of committing rows twice.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from services.runtime.domain import Sample
from services.runtime.errors import FailedPrecondition
from services.sink.core import (
    MANIFESTS,
    TMP,
    Manifest,
    ShardFile,
    StageCounts,
    TopicPartition,
    manifest_key,
    partition_value,
    resume_offsets,
    row_bytes,
    schema,
    shard_key,
    shard_seq,
    to_row,
)
from services.sink.metrics import SinkMetrics
from services.sink.settings import SinkSettings
from services.sink.target import Target

log = logging.getLogger(__name__)


def load_manifests(target: Target, writer: str | None = None) -> list[Manifest]:
    """Every committed manifest (of one writer, or all), in (writer, seq) order."""
    prefix = f"{MANIFESTS}/{writer}/" if writer else f"{MANIFESTS}/"
    out = [
        Manifest.from_json(json.loads(target.get(k)))
        for k in target.keys(prefix)
        if k.endswith(".json")
    ]
    return sorted(out, key=lambda m: (m.writer, m.seq))


@dataclass
class _Open:
    """What has been read since the last commit."""

    opened_at: float | None = None
    input: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)
    rows: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    bytes: int = 0
    counts: StageCounts = field(default_factory=StageCounts)


class ShardWriter:
    def __init__(
        self, target: Target, settings: SinkSettings, metrics: SinkMetrics | None = None
    ) -> None:
        self.target = target
        self.settings = settings
        self.metrics = metrics
        self.writer = settings.writer
        self.seq = 0  # last committed
        self.total_rows = 0
        self.totals = StageCounts()
        self.score_names: list[str] = list(settings.score_columns)
        self._open = _Open()

    # -- start ---------------------------------------------------------------
    def recover(self) -> dict[TopicPartition, int]:
        """Load the committed state, clean up what a killed run left, and return where each
        input partition resumes (partitions no manifest names: absent)."""
        every = load_manifests(self.target)
        mine = [m for m in every if m.writer == self.writer]
        if mine:
            last = mine[-1]
            self.seq, self.total_rows, self.totals = last.seq, last.total_rows, last.totals
            if not self.settings.score_columns:
                self.score_names = list(last.score_columns)
        for key in self.target.keys(f"{TMP}/{self.writer}/"):
            self.target.delete(key)
        for key in self.target.keys(""):
            n = shard_seq(key, self.writer)
            if n is not None and n > self.seq:
                log.info("removing uncommitted shard %s", key)
                self.target.delete(key)
        self._open = _Open()
        return resume_offsets(every)

    # -- input ---------------------------------------------------------------
    def add(
        self, tp: TopicPartition, offset: int, samples: list[Sample], *, write: bool = True
    ) -> None:
        """The samples of the record at ``offset`` of ``tp`` (none for a dead record):
        buffered as rows (``write``) or only counted (an upstream dropped topic)."""
        o = self._open
        if o.opened_at is None:
            o.opened_at = time.monotonic()
        start, _ = o.input.get(tp, (offset, offset))
        o.input[tp] = (start, offset + 1)
        now = datetime.now(UTC)
        for s in samples:
            o.counts.observe(s)
            if not write:
                continue
            if not self.settings.score_columns:
                for name in s.scores:
                    if name not in self.score_names:
                        self.score_names.append(name)
            value = partition_value(s, self.settings.partition_by, now)
            o.rows.setdefault(value, []).append(
                to_row(s, tp[1], offset, self.settings.weight_score)
            )
            o.bytes += row_bytes(s)
        if self.metrics is not None and not write:
            self.metrics.counted.inc(len(samples))

    @property
    def pending(self) -> bool:
        return bool(self._open.input)

    def due(self) -> bool:
        o = self._open
        if o.opened_at is None:
            return False
        age = time.monotonic() - o.opened_at
        return o.bytes >= self.settings.roll.max_bytes or age >= self.settings.roll.max_seconds

    # -- commit --------------------------------------------------------------
    def commit(self) -> Manifest | None:
        """Write, publish and commit what is open (nothing to do: None)."""
        o = self._open
        if not o.input:
            return None
        started = time.perf_counter()
        seq = self.seq + 1
        names = sorted(self.score_names) if not self.settings.score_columns else self.score_names
        sch = schema(names)
        files: list[ShardFile] = []
        for i, (value, part) in enumerate(sorted(o.rows.items())):
            table = pa.Table.from_pylist(part, schema=sch)
            buf = io.BytesIO()
            pq.write_table(
                table,
                buf,
                compression="zstd",
                compression_level=self.settings.compression_level,
            )
            data = buf.getvalue()
            key = shard_key(value, self.writer, seq, i)
            tmp = f"{TMP}/{self.writer}/{seq:010d}-{i:03d}.parquet"
            self.target.put(tmp, data)
            self.target.publish(tmp, key)
            files.append(ShardFile(key, value, len(part), len(data)))
        rows = sum(f.rows for f in files)
        totals = StageCounts()
        totals.merge(self.totals)
        totals.merge(o.counts)
        manifest = Manifest(
            writer=self.writer,
            seq=seq,
            input=dict(o.input),
            files=files,
            score_columns=names,
            commit=o.counts,
            totals=totals,
            rows=rows,
            total_rows=self.total_rows + rows,
        )
        if not self.target.put_if_absent(manifest_key(self.writer, seq), manifest.encode()):
            raise FailedPrecondition(
                f"manifest {seq} of writer {self.writer!r} is already committed: another "
                "sink runs with this writer_id; this one stops"
            )
        self.seq, self.total_rows, self.totals = seq, manifest.total_rows, totals
        self._open = _Open()
        if self.metrics is not None:
            self.metrics.rows.inc(rows)
            self.metrics.bytes.inc(sum(f.bytes for f in files))
            self.metrics.files.inc(len(files))
            self.metrics.manifests.inc()
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self.metrics.last_commit.labels(self.writer).set_to_current_time()
        log.info(
            "committed manifest %d of %s: %d rows in %d files", seq, self.writer, rows, len(files)
        )
        return manifest
