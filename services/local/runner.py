"""The local embedded run: ``sluice run INPUT --out DIR [--pipeline FILE | --stages a,b]``.

Reads JSONL or Parquet and runs a pipeline (services.runtime.pipeline) in process, on an
in-process bus with the same topics as on Kafka: the corpus goes to the pipeline's source
topic, each stage reads its input topic and writes its kept samples to its output topic,
and what reaches a topic no stage reads (a sink) is the run's output. So stages run only
as the pipeline lists them (``stages: [density]`` runs density alone) and chain exactly as
their topics do. Writes kept.jsonl, scores.jsonl and the report. Bad input records are not
fatal and not lost: each is listed in scores.jsonl with an ``input:<why>`` reason.

A stage sees the whole of its input topic at once (the input is bounded), so a stage that
must see everything before deciding (density's two passes) does so through its registered
``bounded`` runner; the others process it batch by batch. Topics are held in memory.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import Field, model_validator
from tqdm import tqdm

from services.local.report import RunReport, StepReport, summarize_scores, write_report
from services.runtime.domain import Outcome, Sample, step_counts
from services.runtime.errors import InvalidArgument
from services.runtime.pipeline import Pipeline, PipelineStage
from services.runtime.registry import KINDS, stage
from services.runtime.stage import StageCore

STAGES = KINDS


class RunSettings(Pipeline):
    """A local run: the pipeline, and how the input file is read and batched.

    A top-level block named after a stage kind (``scoring: {steps: [heuristics]}``) is that
    stage's ``config``, as in earlier run files."""

    batch_size: int = Field(32, ge=1, description="Samples per in-process batch.")
    text_field: str = Field("text", description="Input field holding the document text.")
    id_field: str = Field("id", description="Input field holding the sample id (optional).")

    @model_validator(mode="before")
    @classmethod
    def _kind_blocks(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not set(data) & set(KINDS):
            return data
        data = dict(data)
        blocks = {k: data.pop(k) for k in KINDS if k in data}
        stages = Pipeline.model_validate({"stages": data.get("stages", ["scoring"])}).stages
        by_kind = {s.kind: s for s in stages}
        unused = sorted(set(blocks) - set(by_kind))
        if unused:
            raise ValueError(f"settings for {unused}, which the pipeline does not run")
        data["stages"] = [
            {**s.model_dump(), "config": {**s.config, **blocks.get(s.kind, {})}} for s in stages
        ]
        return data


@dataclass
class InputRecord:
    line: int
    sample: Sample | None
    error: str = ""
    raw_id: str = ""


def read_records(path: Path, settings: RunSettings) -> Iterator[InputRecord]:
    """Records from JSONL (one object per line) or Parquet, with per-record errors."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield _to_record(i, row, settings)
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputRecord(i, None, f"bad_json: {exc.msg}", f"line-{i:07d}")
                continue
            if not isinstance(row, dict):
                yield InputRecord(i, None, "not_an_object", f"line-{i:07d}")
                continue
            yield _to_record(i, row, settings)


def _to_record(i: int, row: dict[str, Any], settings: RunSettings) -> InputRecord:
    sid = str(row.get(settings.id_field) or f"line-{i:07d}")
    text = row.get(settings.text_field)
    prompt, response = row.get("prompt") or "", row.get("response") or ""
    if text is not None and not isinstance(text, str):
        return InputRecord(i, None, f"{settings.text_field}_not_a_string", sid)
    if not (text or "").strip() and not (str(prompt).strip() and str(response).strip()):
        return InputRecord(i, None, f"no_{settings.text_field}", sid)
    embedding = row.get("embedding")
    if embedding is not None and not _is_vector(embedding):
        return InputRecord(i, None, "embedding_not_a_list_of_numbers", sid)
    meta = row.get("metadata") or {}
    sample = Sample(
        id=sid,
        text=text or "",
        prompt=str(prompt),
        response=str(response),
        source=str(row.get("source") or ""),
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        embedding=[float(v) for v in embedding] if embedding else None,
    )
    return InputRecord(i, sample, raw_id=sid)


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )


def count_lines(path: Path) -> int | None:
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass
class _StageRun:
    """A stage of the local run, with what it did (for the report)."""

    spec: PipelineStage
    core: StageCore
    outcomes: list[Outcome]
    samples_in: int = 0
    seconds: float = 0.0


def build_cores(settings: RunSettings) -> list[StageCore]:
    """Every stage's core, from the registry, before any input is read (a configuration
    error stops the run before it writes anything)."""
    return [stage(s.kind).build_core(s.settings()) for s in settings.stages]


def run_stage(
    kind: str,
    core: StageCore,
    batches: list[list[Sample]],
    on_batch: Callable[[int], object] = lambda n: None,
) -> list[list[Outcome]]:
    """One stage over its whole (bounded) input: its registered bounded runner, else
    ``process`` batch by batch. ``on_batch(n)`` is told each time ``n`` more input samples
    are done (for progress bars)."""
    spec = stage(kind)
    if spec.bounded:
        outcomes = spec.run_bounded(core, batches)
        on_batch(sum(map(len, batches)))
        return outcomes
    results = []
    for b in batches:
        results.append(core.process(b))
        on_batch(len(b))
    return results


def run_local(
    input_path: Path,
    out_dir: Path,
    settings: RunSettings | None = None,
    progress: bool = True,
) -> RunReport:
    settings = settings or RunSettings()
    if not input_path.is_file():
        raise InvalidArgument(f"input not found: {input_path}")
    cores = build_cores(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    sinks = settings.sinks
    bus: dict[str, list[list[Sample]]] = {settings.source: []}
    labels_in: Counter[str] = Counter()
    labels_kept: Counter[str] = Counter()
    input_errors: Counter[str] = Counter()
    seen: set[str] = set()
    n_in = n_kept = 0
    runs: list[_StageRun] = []
    with (
        open(out_dir / "kept.jsonl", "w", encoding="utf-8") as kept_f,
        open(out_dir / "scores.jsonl", "w", encoding="utf-8") as scores_f,
    ):

        def emit(o: Outcome, topic: str = "") -> None:
            """Write a sample's final decision (a drop, or its arrival in a sink)."""
            nonlocal n_kept
            s = o.sample
            kind = s.metadata.get("kind")
            if kind:
                labels_in[kind] += 1
                labels_kept[kind] += int(o.kept)
            if o.kept:
                n_kept += 1
                _write(kept_f, _kept_row(s, topic if len(sinks) > 1 else ""))
            _write(
                scores_f,
                {"id": s.id, "kept": o.kept, "scores": _finite(s.scores), "reason": o.reason},
            )

        batch: list[Sample] = []
        with tqdm(
            total=count_lines(input_path), unit="doc", desc="read", disable=not progress
        ) as bar:
            for rec in read_records(input_path, settings):
                n_in += 1
                bar.update(1)
                error = rec.error
                if rec.sample is not None and rec.sample.id in seen:
                    error = "duplicate_id"
                if error or rec.sample is None:
                    reason = f"input:{error.split(':', 1)[0]}"
                    input_errors[reason] += 1
                    row = {"id": rec.raw_id, "kept": False, "scores": {}, "reason": reason}
                    _write(scores_f, {**row, "line": rec.line})
                    continue
                seen.add(rec.sample.id)
                batch.append(rec.sample)
                if len(batch) >= settings.batch_size:
                    bus[settings.source].append(batch)
                    batch = []
        if batch:
            bus[settings.source].append(batch)

        for spec, core in zip(settings.stages, cores, strict=True):
            batches = bus.get(spec.topics.input, [])
            run = _StageRun(spec, core, [], samples_in=sum(map(len, batches)))
            t_stage = time.perf_counter()
            with tqdm(
                total=run.samples_in, unit="doc", desc=spec.kind, disable=not progress
            ) as bar:
                results = run_stage(spec.kind, core, batches, bar.update)
            run.seconds = time.perf_counter() - t_stage
            out = bus.setdefault(spec.topics.output, [])
            for outcomes in results:
                run.outcomes.extend(outcomes)
                for o in outcomes:
                    if not o.kept:
                        emit(o)
                kept = [o.sample for o in outcomes if o.kept]
                if kept:
                    out.append(kept)
            runs.append(run)
        for topic in sinks:
            for kept_batch in bus.get(topic, []):
                for sample in kept_batch:
                    emit(Outcome(sample, True), topic)

    steps = [_input_report(n_in, input_errors)] if input_errors else []
    for run in runs:
        steps.extend(_stage_reports(run))
    outcomes = [o for run in runs for o in run.outcomes]
    signals = sorted({k for o in outcomes for k in o.sample.scores})
    report = RunReport(
        input=str(input_path),
        output_dir=str(out_dir),
        samples_in=n_in,
        samples_kept=n_kept,
        steps=steps,
        scores={
            k: summarize_scores([o.sample.scores[k] for o in outcomes if k in o.sample.scores])
            for k in signals
        },
        by_label={k: {"in": labels_in[k], "kept": labels_kept[k]} for k in sorted(labels_in)},
        model_version=", ".join(
            f"{r.spec.kind}={r.core.model_version}" for r in runs if r.outcomes
        ),
        seconds=round(time.perf_counter() - t0, 3),
        started_at=started,
        settings=settings.model_dump(mode="json"),
    )
    write_report(report, out_dir)
    return report


def _model_versions(runs: list[_StageRun]) -> str:
    """What decided, per stage that saw input: 'scoring=heuristics, density=...'."""
    return ", ".join(f"{r.spec.kind}={r.core.model_version}" for r in runs if r.outcomes)


def _input_report(n_in: int, input_errors: Counter[str]) -> StepReport:
    valid = n_in - sum(input_errors.values())
    return StepReport("input", n_in, valid, 0, 0, dict(input_errors), 0.0)


def _stage_reports(run: _StageRun) -> list[StepReport]:
    """A line per step the core names (its drop reasons say which step dropped), or one
    line for the stage; seconds per step where the core keeps them (``step_seconds``)."""
    steps = list(run.core.steps)
    if not steps:
        return [_outcome_report(run.spec.kind, run.outcomes, run.seconds, run.samples_in)]
    step_seconds: dict[str, float] = getattr(run.core, "step_seconds", {})
    reports: list[StepReport] = []
    alive = list(run.outcomes)
    for c in step_counts(run.outcomes, steps):
        dropped_here = [o for o in alive if not o.kept and o.step == c.step]
        kept_here = [o for o in alive if o.kept or o.step != c.step]
        seconds = step_seconds.get(c.step, run.seconds if len(steps) == 1 else 0.0)
        reports.append(
            StepReport(
                name=c.step,
                samples_in=c.samples_in,
                samples_kept=c.samples_kept,
                tokens_in=sum(_words(o.sample) for o in alive),
                tokens_kept=sum(_words(o.sample) for o in kept_here),
                drop_reasons=dict(Counter(o.reason for o in dropped_here)),
                seconds=round(seconds, 3),
            )
        )
        alive = kept_here
    return reports


def _outcome_report(
    name: str, outcomes: list[Outcome], seconds: float, samples_in: int | None = None
) -> StepReport:
    """A stage's line in the report; ``samples_in`` where the stage also creates samples
    (synthesis: its outcomes are the seeds and what it generated)."""
    kept = [o for o in outcomes if o.kept]
    return StepReport(
        name=name,
        samples_in=len(outcomes) if samples_in is None else samples_in,
        samples_kept=len(kept),
        tokens_in=sum(_words(o.sample) for o in outcomes),
        tokens_kept=sum(_words(o.sample) for o in kept),
        drop_reasons=dict(Counter(o.reason for o in outcomes if not o.kept)),
        seconds=round(seconds, 3),
    )


def _words(s: Sample) -> int:
    return len(s.content.split())


def _kept_row(s: Sample, topic: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"id": s.id}
    if topic:  # the pipeline has more than one sink: say which one
        row["topic"] = topic
    for k in ("text", "prompt", "response", "source"):
        v = getattr(s, k)
        if v:
            row[k] = v
    if s.metadata:
        row["metadata"] = s.metadata
    row["scores"] = _finite(s.scores)
    return row


def _finite(scores: dict[str, float]) -> dict[str, float | None]:
    """Strict JSON has no NaN: an undefined score (e.g. perplexity of 0 tokens) is null."""
    return {k: (v if math.isfinite(v) else None) for k, v in scores.items()}


def _write(f: TextIO, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
