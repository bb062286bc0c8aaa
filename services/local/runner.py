"""The local embedded run: ``sluice run INPUT --out DIR``.

Reads JSONL or Parquet, pushes batches through the configured stages in
process (an in-process bus: each stage's kept output is the next stage's
input, exactly as on Kafka), and writes kept.jsonl, scores.jsonl and the
report. Bad input records are not fatal and not lost: each is listed in
scores.jsonl with an ``input:<why>`` reason.

The density stage needs the whole of its input before it can decide (two passes: sketch
everything scoring kept, then subsample it by inverse density), so scoring's kept samples
wait in memory, with their embeddings computed once, until scoring has finished.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import Field
from tqdm import tqdm

from services.density.core import DensityCore
from services.density.settings import DensitySettings
from services.distill.settings import DistillSettings
from services.local.report import RunReport, StepReport, summarize_scores, write_report
from services.rewrite.settings import RewriteSettings
from services.runtime.domain import Outcome, Sample, step_counts
from services.runtime.errors import InvalidArgument
from services.runtime.registry import KINDS
from services.runtime.settings import StrictModel
from services.runtime.stage import StageCore
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from services.synth.settings import SynthSettings

STAGES = KINDS
# Stages that change or create samples: each batch that survived the stages before goes
# through them in order, as on the Kafka topic chain.
GENERATION_STAGES = ("rewrite", "synth", "distill")


class RunSettings(StrictModel):
    """A local run: which stages, their settings, batching."""

    stages: list[str] = Field(
        default_factory=lambda: ["scoring"],
        description="Stages in order; available: scoring, density, rewrite, synth, distill. "
        "'density' subsamples what scoring kept by inverse density; rewrite/synth/distill "
        "generate with the LLM (all off by default: they change what a run keeps and "
        "load further models).",
    )
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)  # type: ignore[arg-type]
    density: DensitySettings = Field(
        default_factory=DensitySettings,  # type: ignore[arg-type]
        description="Density settings. Locally, mode 'online' runs one pass; any other mode "
        "runs both passes in process (no broker, no object store).",
    )
    rewrite: RewriteSettings = Field(default_factory=RewriteSettings)  # type: ignore[arg-type]
    synth: SynthSettings = Field(default_factory=SynthSettings)  # type: ignore[arg-type]
    distill: DistillSettings = Field(default_factory=DistillSettings)  # type: ignore[arg-type]
    batch_size: int = Field(32, ge=1, description="Samples per in-process batch.")
    text_field: str = Field("text", description="Input field holding the document text.")
    id_field: str = Field("id", description="Input field holding the sample id (optional).")


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


def run_local(
    input_path: Path,
    out_dir: Path,
    settings: RunSettings | None = None,
    progress: bool = True,
    core: ScoringCore | None = None,
) -> RunReport:
    settings = settings or RunSettings()
    unknown = [s for s in settings.stages if s not in STAGES]
    if unknown:
        raise InvalidArgument(f"unknown stages {unknown}; available: {list(STAGES)}")
    if settings.stages != [s for s in STAGES if s in settings.stages]:
        raise InvalidArgument(f"stages run in the order {list(STAGES)}; got {settings.stages}")
    density = DensityCore(settings.density) if "density" in settings.stages else None
    chain = [
        _ChainStage(name, _generation_core(name, settings))
        for name in settings.stages
        if name in GENERATION_STAGES
    ]
    if not input_path.is_file():
        raise InvalidArgument(f"input not found: {input_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    core = core or ScoringCore(settings.scoring)
    if core.signals:
        _ = core.backend  # load the model before the progress bar starts, not inside it
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    total = count_lines(input_path)
    all_outcomes = []
    labels_in: Counter[str] = Counter()
    labels_kept: Counter[str] = Counter()
    input_errors: Counter[str] = Counter()
    seen: set[str] = set()
    n_in = n_kept = 0
    with (
        open(out_dir / "kept.jsonl", "w", encoding="utf-8") as kept_f,
        open(out_dir / "scores.jsonl", "w", encoding="utf-8") as scores_f,
        tqdm(total=total, unit="doc", desc="scoring", disable=not progress) as bar,
    ):
        batch: list[Sample] = []
        waiting: list[Sample] = []  # kept by scoring, for the density stage

        def forward(outcomes: list[Outcome]) -> None:
            """Outcomes of the selection stages on to the generation stages, then written."""
            kept = [o.sample for o in outcomes if o.kept]
            for o in outcomes:
                if not o.kept or not chain:
                    emit(o)
            for stage in chain:
                if not kept:
                    return
                results = stage.run(kept)
                for o in results:
                    if not o.kept:
                        emit(o)
                kept = [o.sample for o in results if o.kept]
            if chain:
                for sample in kept:
                    emit(Outcome(sample, True))

        def emit(o: Outcome) -> None:
            """Write a sample's final decision."""
            nonlocal n_kept
            s = o.sample
            kind = s.metadata.get("kind")
            if kind:
                labels_in[kind] += 1
                labels_kept[kind] += int(o.kept)
            if o.kept:
                n_kept += 1
                _write(kept_f, _kept_row(s))
            _write(
                scores_f,
                {"id": s.id, "kept": o.kept, "scores": _finite(s.scores), "reason": o.reason},
            )

        def flush() -> None:
            if not batch:
                return
            outcomes = core.process(batch)
            if density is not None:
                waiting.extend(o.sample for o in outcomes if o.kept)
                forward([o for o in outcomes if not o.kept])
            else:
                forward(outcomes)
            all_outcomes.extend(outcomes)
            bar.update(len(batch))
            bar.set_postfix(kept=n_kept + len(waiting))
            batch.clear()

        for rec in read_records(input_path, settings):
            n_in += 1
            error = rec.error
            if rec.sample is not None and rec.sample.id in seen:
                error = "duplicate_id"
            if error or rec.sample is None:
                reason = f"input:{error.split(':', 1)[0]}"
                input_errors[reason] += 1
                _write(
                    scores_f,
                    {
                        "id": rec.raw_id,
                        "kept": False,
                        "scores": {},
                        "reason": reason,
                        "line": rec.line,
                    },
                )
                bar.update(1)
                continue
            seen.add(rec.sample.id)
            batch.append(rec.sample)
            if len(batch) >= settings.batch_size:
                flush()
        flush()
        density_outcomes: list[Outcome] = []
        density_seconds = 0.0
        if density is not None:
            t_density = time.perf_counter()
            density_outcomes = run_density(density, waiting, settings.batch_size, progress)
            density_seconds = time.perf_counter() - t_density
            for i in range(0, len(density_outcomes), settings.batch_size):
                forward(density_outcomes[i : i + settings.batch_size])

    steps = _step_reports(core, all_outcomes, n_in, input_errors)
    if density is not None:
        steps.append(_outcome_report("density", density_outcomes, density_seconds))
    steps.extend(_outcome_report(st.name, st.outcomes, st.seconds, st.samples_in) for st in chain)
    signals = sorted({k for o in all_outcomes for k in o.sample.scores})
    report = RunReport(
        input=str(input_path),
        output_dir=str(out_dir),
        samples_in=n_in,
        samples_kept=n_kept,
        steps=steps,
        scores={
            k: summarize_scores([o.sample.scores[k] for o in all_outcomes if k in o.sample.scores])
            for k in signals
        },
        by_label={k: {"in": labels_in[k], "kept": labels_kept[k]} for k in sorted(labels_in)},
        model_version=core.model_version if all_outcomes else "",
        seconds=round(time.perf_counter() - t0, 3),
        started_at=started,
        settings=settings.model_dump(mode="json"),
    )
    write_report(report, out_dir)
    return report


def _step_reports(
    core: ScoringCore, outcomes: list[Any], n_in: int, input_errors: Counter[str]
) -> list[StepReport]:
    steps: list[StepReport] = []
    if input_errors:
        valid = n_in - sum(input_errors.values())
        steps.append(StepReport("input", n_in, valid, 0, 0, dict(input_errors), 0.0))
    counts = step_counts(outcomes, core.steps)
    alive = list(outcomes)
    for c in counts:
        dropped_here = [o for o in alive if not o.kept and o.step == c.step]
        kept_here = [o for o in alive if not (not o.kept and o.step == c.step)]
        steps.append(
            StepReport(
                name=c.step,
                samples_in=c.samples_in,
                samples_kept=c.samples_kept,
                tokens_in=sum(_words(o.sample) for o in alive),
                tokens_kept=sum(_words(o.sample) for o in kept_here),
                drop_reasons=dict(Counter(o.reason for o in dropped_here)),
                seconds=round(core.step_seconds.get(c.step, 0.0), 3),
            )
        )
        alive = kept_here
    return steps


def run_density(
    core: DensityCore, samples: list[Sample], batch_size: int, progress: bool = False
) -> list[Outcome]:
    """The density stage over a finished input: one online pass when so configured, else
    both passes (sketch everything, then subsample), embedding each sample once."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    outcomes: list[Outcome] = []
    with tqdm(total=2 * len(samples), unit="doc", desc="density", disable=not progress) as bar:
        if core.settings.mode == "online":
            for chunk in chunks:
                outcomes.extend(core.online_batch(chunk, core.vectors(chunk)))
                bar.update(2 * len(chunk))
            return outcomes
        vectors = []
        for chunk in chunks:  # pass 1
            vectors.append(core.vectors(chunk))
            core.build_batch(chunk, vectors[-1])
            bar.update(len(chunk))
        for chunk, vecs in zip(chunks, vectors, strict=True):  # pass 2
            outcomes.extend(core.sample_batch(chunk, vecs))
            bar.update(len(chunk))
    return outcomes


def _generation_core(name: str, settings: RunSettings) -> StageCore:
    if name == "rewrite":
        from services.rewrite.core import RewriteCore

        return RewriteCore(settings.rewrite)
    if name == "synth":
        from services.synth.core import SynthCore

        return SynthCore(settings.synth)
    from services.distill.store import build_core

    return build_core(settings.distill)


@dataclass
class _ChainStage:
    """A generation stage in the local chain, with what it did (for the report)."""

    name: str
    core: StageCore
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    samples_in: int = 0

    def run(self, samples: list[Sample]) -> list[Outcome]:
        self.samples_in += len(samples)
        t0 = time.perf_counter()
        results = self.core.process(samples)
        self.seconds += time.perf_counter() - t0
        self.outcomes.extend(results)
        return results


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


def _kept_row(s: Sample) -> dict[str, Any]:
    row: dict[str, Any] = {"id": s.id}
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
