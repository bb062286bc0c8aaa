"""The teacher's judgments a classifier learns from: (text, value) pairs read from a local
run's output, a Parquet export or a Kafka topic of scored samples.

The teacher is any score key a stage wrote (``ask_llm``, ``perplexity``, ``classifier``)
or an explicit label field (``kept``, a metadata field such as ``kind``). Strings become
1 when they are one of the ``positive`` values, booleans and numbers are taken as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.runtime.domain import Sample
from services.runtime.errors import ConfigError, InvalidArgument


@dataclass(frozen=True)
class TeacherSpec:
    """Which value of a record is the teacher's judgment."""

    score: str = ""
    """A score key (``scores[score]``)."""
    label_field: str = ""
    """Or a field of the record or of its metadata."""
    positive: tuple[str, ...] = ()
    """String label values that count as 'keep' (default: 'true', '1', 'yes', 'real')."""

    def __post_init__(self) -> None:
        if bool(self.score) == bool(self.label_field):
            raise ConfigError("name the teacher: a score key or a label field (exactly one)")

    @property
    def name(self) -> str:
        return self.score or f"label:{self.label_field}"


@dataclass
class Examples:
    """Texts with the teacher's value for each, and where they came from."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    skipped: int = 0

    def provenance(self, teacher: TeacherSpec, sources: list[str]) -> dict[str, Any]:
        ids_digest = hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()[:16]
        return {
            "teacher": teacher.score or teacher.label_field,
            "teacher_kind": "score" if teacher.score else "label",
            "sources": sources,
            "examples": len(self.ids),
            "skipped_without_label": self.skipped,
            "ids_sha256": ids_digest,
        }


def _to_value(v: Any, positive: tuple[str, ...]) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip().lower()
    pos = tuple(p.lower() for p in positive) or ("true", "1", "yes", "real")
    return 1.0 if s in pos else 0.0


def value_of(row: dict[str, Any], teacher: TeacherSpec) -> float | None:
    """The teacher's value in a flat record (a JSONL/Parquet row)."""
    if teacher.score:
        scores = row.get("scores")
        v = scores.get(teacher.score) if isinstance(scores, dict) else None
        if v is None:  # a flattened export: one column per score
            v = row.get(teacher.score)
        return _to_value(v, ())
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    v = row.get(teacher.label_field, meta.get(teacher.label_field) if meta else None)
    return _to_value(v, teacher.positive)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"{path}:{n}: not JSON: {exc.msg}") from exc
                if isinstance(row, dict):
                    yield row


def _text(row: dict[str, Any]) -> str:
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        return text
    prompt, response = row.get("prompt") or "", row.get("response") or ""
    return f"{prompt}\n\n{response}".strip()


def from_files(
    path: Path, teacher: TeacherSpec, texts: Path | None = None, text_field: str = "text"
) -> Examples:
    """Examples from a JSONL/Parquet file of scored records; a file without texts (a local
    run's scores.jsonl) takes them from ``texts`` (its input corpus), joined by id."""
    corpus: dict[str, str] = {}
    if texts is not None:
        for i, row in enumerate(_rows(texts), start=1):
            sid = str(row.get("id") or f"line-{i:07d}")
            corpus[sid] = str(row.get(text_field) or _text(row))
    out = Examples()
    for row in _rows(path):
        sid = str(row.get("id", ""))
        if str(row.get("reason", "")).startswith("input:"):
            continue
        text = corpus.get(sid) or _text(row)
        v = value_of(row, teacher)
        if not text or v is None:
            out.skipped += 1
            continue
        out.ids.append(sid)
        out.texts.append(text)
        out.values.append(v)
    if not out.ids and texts is None:
        raise InvalidArgument(
            f"{path} gave no (text, {teacher.name}) pairs; a scores.jsonl needs --texts "
            "(the corpus it scored)"
        )
    return out


def from_samples(
    samples: Iterable[tuple[str, Sample]], teacher: TeacherSpec, stage: str
) -> Examples:
    """Examples from (topic, sample) pairs read from Kafka. ``kept`` as a label field is the
    stage's decision (its last lineage event, else the topic's name)."""
    from services.runtime.replay import stage_decision

    out = Examples()
    seen: set[str] = set()
    for topic, s in samples:
        if s.id in seen:
            continue
        seen.add(s.id)
        if teacher.score:
            v = s.scores.get(teacher.score)
        elif teacher.label_field == "kept":
            v = float(stage_decision(s, stage, topic).kept)
        else:
            v = _to_value(s.metadata.get(teacher.label_field), teacher.positive)
        if v is None or not s.content.strip():
            out.skipped += 1
            continue
        out.ids.append(s.id)
        out.texts.append(s.content)
        out.values.append(float(v))
    return out
