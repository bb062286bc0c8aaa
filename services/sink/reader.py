"""Reading what the sink committed: the files a manifest makes part of the dataset, for
``datasets.load_dataset("parquet", data_files=...)``, ``pyarrow.dataset`` and the read API.

Always go through the manifests: a folder may also hold shards a killed sink wrote but never
committed (until that writer restarts and removes them).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from services.sink.core import Manifest, StageCounts
from services.sink.target import Target
from services.sink.writer import load_manifests

__all__ = ["committed_files", "iter_rows", "load_manifests", "summary"]


def committed_files(target: Target) -> list[str]:
    """Locations (paths or s3:// URIs) of every committed shard, in commit order."""
    return [target.location(f.key) for m in load_manifests(target) for f in m.files]


def summary(target: Target) -> dict[str, Any]:
    """The dataset as its manifests describe it: rows, files, per-stage retention and model
    versions summed over the writers (each writer's last manifest holds its totals)."""
    manifests = load_manifests(target)
    last: dict[str, Manifest] = {}
    for m in manifests:
        last[m.writer] = m
    totals = StageCounts()
    for m in last.values():
        totals.merge(m.totals)
    return {
        "rows": sum(m.total_rows for m in last.values()),
        "files": sum(len(m.files) for m in manifests),
        "manifests": len(manifests),
        "writers": sorted(last),
        **totals.to_json(),
    }


def iter_rows(
    target: Target,
    *,
    shard: str = "",
    partition: int | None = None,
    start_offset: int = 0,
    end_offset: int | None = None,
    batch_rows: int = 1024,
) -> Iterator[list[dict[str, Any]]]:
    """Committed rows in batches of up to ``batch_rows``: of one shard (its key), or of
    every shard, filtered to input ``partition`` and offsets ``[start_offset, end_offset)``.
    One row group is in memory at a time."""
    for m in load_manifests(target):
        for f in m.files:
            if shard and f.key != shard:
                continue
            pf = pq.ParquetFile(io.BytesIO(target.get(f.key)))
            for batch in pf.iter_batches(batch_size=batch_rows):
                rows = pa.Table.from_batches([batch]).to_pylist()
                if partition is not None:
                    rows = [
                        r
                        for r in rows
                        if r["input_partition"] == partition
                        and r["input_offset"] >= start_offset
                        and (end_offset is None or r["input_offset"] < end_offset)
                    ]
                if rows:
                    yield rows
