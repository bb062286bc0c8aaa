"""Corpus sources for ``sluice publish`` on real files: every format streams the same
records, fields map, ids are generated when absent (stable across runs), and a checkpoint
says what a resumed publish skips."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from services.runtime.errors import NotFound
from services.runtime.sources import (
    PublishCheckpoint,
    SourceFile,
    iter_rows,
    list_sources,
    to_sample,
)

ROWS = [{"body": f"text {i}", "doc": f"d{i}"} for i in range(5)] + [{"body": "no id"}]


def write_all(root: Path) -> None:
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (root / "sub").mkdir(parents=True)
    (root / "a.jsonl").write_bytes(data + b"not json\n[1]\n")
    (root / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (root / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.Table.from_pylist(ROWS), root / "d.parquet")
    (root / "notes.txt").write_text("ignored")


def test_every_format_streams_the_same_records(tmp_path: Path) -> None:
    write_all(tmp_path)
    files = list_sources(str(tmp_path))
    assert [Path(f.uri).name for f in files] == [
        "a.jsonl",
        "b.jsonl.gz",
        "d.parquet",
        "c.jsonl.zst",
    ]
    for f in files:
        rows = [r for r in iter_rows(f) if isinstance(r, dict)]
        assert [r["body"] for r in rows] == [r["body"] for r in ROWS], f.uri
    bad = [r for r in iter_rows(files[0]) if isinstance(r, str)]
    assert [b.split(":")[0] for b in bad] == ["bad_json", "not_an_object"]
    assert [Path(f.uri).name for f in list_sources(str(tmp_path / "*.jsonl*"))] == [
        "a.jsonl",
        "b.jsonl.gz",
    ]
    with pytest.raises(NotFound):
        list_sources(str(tmp_path / "missing"))


def test_field_mapping_and_generated_ids() -> None:
    src = SourceFile("s3://bucket/in/part-7.jsonl.zst")
    assert src.stem == "part-7"
    s = to_sample({"body": "hello", "doc": "x1"}, 1, src, "body", "doc")
    assert not isinstance(s, str) and (s.id, s.text) == ("x1", "hello")
    g = to_sample({"body": "hello"}, 42, src, "body", "doc")
    assert not isinstance(g, str) and g.id == "part-7-00000042"
    assert to_sample({"text": "x"}, 1, src, "body", "doc") == "no_body"


def test_checkpoint_skips_done_files_and_published_records(tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    a, b = SourceFile("a.jsonl"), SourceFile("b.jsonl")
    ck = PublishCheckpoint.load(str(path))
    ck.finish(a)
    ck.advance(b, 300)
    again = PublishCheckpoint.load(str(path))
    assert again.skip(a) is None
    assert again.skip(b) == 300
    assert again.skip(SourceFile("c.jsonl")) == 0
