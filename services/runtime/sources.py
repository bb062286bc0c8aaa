"""Corpus sources for ``sluice publish``: local files and globs, or every object under an
``s3://bucket/prefix/``, in JSONL, JSONL.gz, JSONL.zst or Parquet, read as a stream.

Never the whole corpus in memory: JSONL is decompressed and parsed line by line from the
open file or HTTP response; a Parquet object (which needs random access) is spooled to a
temporary file one at a time and read a row group at a time. Field mapping
(``text_field``, ``id_field``) and generated ids (``<file stem>-<record number>``, stable
across runs, so a resumed publish repeats them) are applied here. ``PublishCheckpoint``
records which files are done and how far the current one got, so an interrupted publish
resumes where it stopped (at-least-once: the records after the last checkpoint are sent
again, with the same ids).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.objectstore import SCHEME, ObjectStore, ObjectStoreSettings, s3_errors

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")


@dataclass(frozen=True)
class SourceFile:
    """One input file: a local path or an s3:// URI."""

    uri: str

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        n = self.name
        for suffix in sorted(SUFFIXES, key=len, reverse=True):
            if n.endswith(suffix):
                return n[: -len(suffix)]
        return n


def is_corpus_file(name: str) -> bool:
    return name.endswith(SUFFIXES)


def list_sources(spec: str, store: ObjectStore | None = None) -> list[SourceFile]:
    """The files ``spec`` names, sorted: an s3://bucket/prefix (every corpus object under
    it), a directory (every corpus file in it, recursively), a glob, or one file."""
    if spec.startswith(SCHEME):
        if store is None:
            raise InvalidArgument(f"{spec}: an s3:// input needs an object store endpoint")
        bucket, _, prefix = spec.removeprefix(SCHEME).partition("/")
        with s3_errors(spec):
            names = [
                str(o.object_name)
                for o in store.client.list_objects(bucket, prefix=prefix, recursive=True)
                if o.object_name and not o.is_dir
            ]
        files = [SourceFile(f"{SCHEME}{bucket}/{n}") for n in sorted(names) if is_corpus_file(n)]
    elif os.path.isdir(spec):
        files = [
            SourceFile(str(p)) for p in sorted(Path(spec).rglob("*")) if is_corpus_file(p.name)
        ]
    elif any(c in spec for c in "*?["):
        files = [SourceFile(p) for p in sorted(glob.glob(spec, recursive=True))]
    elif os.path.isfile(spec):
        files = [SourceFile(spec)]
    else:
        raise NotFound(f"input not found: {spec}")
    if not files:
        raise NotFound(f"no JSONL/JSONL.gz/JSONL.zst/Parquet files under {spec}")
    return files


def _open_binary(src: SourceFile, store: ObjectStore | None) -> IO[bytes]:
    if not src.uri.startswith(SCHEME):
        return open(src.uri, "rb")
    assert store is not None
    bucket, _, key = src.uri.removeprefix(SCHEME).partition("/")
    with s3_errors(src.uri):
        response = store.client.get_object(bucket, key)
    return cast(IO[bytes], response)  # urllib3's response: a readable stream


def iter_rows(src: SourceFile, store: ObjectStore | None = None) -> Iterator[dict[str, Any] | str]:
    """The records of one file in order: a dict per record, or a string saying why a line
    is not one (bad JSON, not an object) so the caller can count it."""
    name = src.name
    if name.endswith(".parquet"):
        yield from _parquet_rows(src, store)
        return
    raw = _open_binary(src, store)
    try:
        stream: Any
        if name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif name.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"bad_json: {exc.msg}"
                continue
            yield row if isinstance(row, dict) else "not_an_object"
    finally:
        raw.close()


def _parquet_rows(src: SourceFile, store: ObjectStore | None) -> Iterator[dict[str, Any] | str]:
    import pyarrow.parquet as pq

    if not src.uri.startswith(SCHEME):
        yield from _batches(pq.ParquetFile(src.uri))
        return
    with tempfile.TemporaryFile() as tmp:  # one object at a time on disk, not in memory
        raw = _open_binary(src, store)
        try:
            for chunk in iter(lambda: raw.read(1 << 20), b""):
                tmp.write(chunk)
        finally:
            raw.close()
        tmp.seek(0)
        yield from _batches(pq.ParquetFile(tmp))


def _batches(pf: Any) -> Iterator[dict[str, Any] | str]:
    for batch in pf.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def to_sample(
    row: dict[str, Any], number: int, src: SourceFile, text_field: str, id_field: str
) -> Sample | str:
    """A sample from a record (``number``: its 1-based position in the file), or why not."""
    sid = row.get(id_field)
    sid = str(sid) if sid not in (None, "") else f"{src.stem}-{number:08d}"
    text = row.get(text_field)
    prompt, response = str(row.get("prompt") or ""), str(row.get("response") or "")
    if text is not None and not isinstance(text, str):
        return f"{text_field}_not_a_string"
    if not (text or "").strip() and not (prompt.strip() and response.strip()):
        return f"no_{text_field}"
    meta = row.get("metadata") or {}
    return Sample(
        id=sid,
        text=text or "",
        prompt=prompt,
        response=response,
        source=str(row.get("source") or ""),
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
    )


@dataclass
class PublishCheckpoint:
    """Progress of one publish: files done, and records of the current file sent and
    acknowledged. Saved atomically (tmp file + rename) after every acknowledged chunk."""

    path: Path | None
    done: list[str] = field(default_factory=list)
    current: str = ""
    records: int = 0

    @classmethod
    def load(cls, path: str | None) -> PublishCheckpoint:
        if not path:
            return cls(None)
        p = Path(path)
        if not p.is_file():
            return cls(p)
        data = json.loads(p.read_text())
        return cls(p, list(data["done"]), str(data["current"]), int(data["records"]))

    def skip(self, src: SourceFile) -> int | None:
        """Records of ``src`` already published (None: all of them)."""
        if src.uri in self.done:
            return None
        return self.records if src.uri == self.current else 0

    def advance(self, src: SourceFile, records: int) -> None:
        self.current, self.records = src.uri, records
        self._save()

    def finish(self, src: SourceFile) -> None:
        self.done.append(src.uri)
        self.current, self.records = "", 0
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"done": self.done, "current": self.current, "records": self.records}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.path)


def object_store(endpoint: str, secure: bool) -> ObjectStore | None:
    """The client an s3:// input is read with (keys from the environment)."""
    if not endpoint:
        return None
    return ObjectStore(ObjectStoreSettings(endpoint=endpoint, secure=secure))


@dataclass
class PublishReport:
    files: int = 0
    records: int = 0
    samples: int = 0
    messages: int = 0
    invalid: dict[str, int] = field(default_factory=dict)


def publish_files(
    producer: Any,
    topic: str,
    files: list[SourceFile],
    *,
    store: ObjectStore | None = None,
    checkpoint: PublishCheckpoint | None = None,
    text_field: str = "text",
    id_field: str = "id",
    batch_size: int = 256,
    codec: Any = None,
    flush_every: int = 16,
    on_samples: Any = None,
) -> PublishReport:
    """Publish every file's records as SampleBatch messages, checkpointing after each
    acknowledged group of ``flush_every`` batches and after each file. Batch ids are
    ``<stem>@<first record>-<n>``: a resumed publish repeats those it may have sent."""
    from services.runtime.kafka_stage import publish

    ckpt = checkpoint or PublishCheckpoint(None)
    report = PublishReport()

    def send(src: SourceFile, samples: list[Sample], start: int) -> None:
        report.messages += publish(
            producer, topic, samples, batch_size=batch_size, codec=codec,
            batch_prefix=f"{src.stem}@{start:08d}-",
        )  # fmt: skip
        report.samples += len(samples)
        if on_samples is not None:
            on_samples(len(samples))

    for src in files:
        skip = ckpt.skip(src)
        if skip is None:
            continue
        pending: list[Sample] = []
        start = number = skip
        for number, row in enumerate(iter_rows(src, store), start=1):
            if number <= skip:
                continue
            report.records += 1
            sample = (
                row if isinstance(row, str) else to_sample(row, number, src, text_field, id_field)
            )
            if isinstance(sample, str):
                reason = sample.split(":", 1)[0]
                report.invalid[reason] = report.invalid.get(reason, 0) + 1
                continue
            pending.append(sample)
            if len(pending) < batch_size * flush_every:
                continue
            send(src, pending, start)
            pending, start = [], number
            ckpt.advance(src, number)
        if pending:
            send(src, pending, start)
        ckpt.finish(src)
        report.files += 1
    return report
