"""Replay and re-score: run a stage, at a new model or config version, over a range of a
topic (or a file) into new outputs, and compare its decisions with the version that ran
before. The loop of the data flywheel: judge, distil, replay, compare, promote.

- **Range**: per partition, from an offset or a timestamp (``offsets_for_times``) to an
  offset or a timestamp, or to the end the partition had when the replay started; records
  are read ``read_committed`` with no consumer group (a replay never moves a live stage's
  offsets).
- **Outputs**: kept samples to the output topic, dropped ones to its ``.dropped`` topic,
  under the runtime's batch ids ``<topic>-<partition>-<offset>@<stage>.<decision>``. The
  decision digest covers the new model and config version, so the replay's batches never
  look like redeliveries of the first run's; running the same replay twice repeats its own
  ids, so a reader that dedupes batch ids (``dedupe_batches``) sees one copy.
- **Baseline**: the first run's decisions, read from its output topics (kept and dropped:
  the last lineage event of the stage says which) or from a local run's ``scores.jsonl``;
  the expensive judge never runs again.
- **Report**: ``report.json`` and ``report.png``: retention per version, decisions that
  changed (kept->dropped, dropped->kept) with examples, agreement, and the correlation
  between the two versions' scores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.codec import BatchCodec
from services.runtime.domain import Action, Sample
from services.runtime.errors import ConfigError, InvalidArgument, SluiceError
from services.runtime.evaluation import roc_auc, spearman
from services.runtime.kafka_stage import decision_digest, poll_records
from services.runtime.settings import KafkaSettings
from services.runtime.stage import StageCore

log = logging.getLogger(__name__)

EXAMPLES = 5
"""Changed decisions shown per direction in the report."""


@dataclass(frozen=True)
class Bound:
    """One end of a range: an offset or a timestamp (ms since the epoch); None = open."""

    offset: int | None = None
    timestamp_ms: int | None = None


@dataclass
class Decision:
    """What one version decided for one sample."""

    kept: bool
    scores: dict[str, float]
    version: str = ""
    reason: str = ""
    text: str = ""


@dataclass
class ReplayResult:
    """The replay's own decisions, and where they went."""

    version: str
    digest: str
    decisions: dict[str, Decision] = field(default_factory=dict)
    records: int = 0
    batches_out: int = 0


# -- reading a topic range ------------------------------------------------------------------
def read_range(
    kafka: KafkaSettings,
    topic: str,
    start: Bound = Bound(),
    end: Bound = Bound(),
    *,
    poll_timeout_ms: int = 1000,
) -> Iterator[tuple[int, int, Any]]:
    """(partition, offset, record) of every committed record of ``topic`` in the range, each
    partition in offset order; stops at the range's end or the partition's end as it was
    when the read started."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(
        **kafka.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=kafka.max_message_bytes + 65536,
        max_partition_fetch_bytes=kafka.max_message_bytes + 65536,
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise InvalidArgument(f"topic {topic!r} does not exist or has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        first = consumer.beginning_offsets(tps)
        last = consumer.end_offsets(tps)  # read_committed: the last stable offset

        def position(b: Bound, default: dict[Any, int]) -> dict[Any, int]:
            if b.offset is not None:
                return {tp: max(first[tp], min(b.offset, last[tp])) for tp in tps}
            if b.timestamp_ms is not None:
                found = consumer.offsets_for_times(dict.fromkeys(tps, b.timestamp_ms))
                return {tp: (found[tp].offset if found.get(tp) else last[tp]) for tp in tps}
            return dict(default)

        lo = position(start, first)
        hi = position(end, last)
        todo = {tp for tp in tps if lo[tp] < hi[tp]}
        for tp in tps:
            consumer.seek(tp, lo[tp])
        idle = 0
        while todo and idle < 30:
            polled = poll_records(consumer, timeout_ms=poll_timeout_ms)
            idle = 0 if polled else idle + 1
            for tp, records in polled.items():
                for rec in records:
                    if tp in todo and rec.offset < hi[tp]:
                        yield tp.partition, rec.offset, rec
                if tp in todo and consumer.position(tp) >= hi[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
        if todo:
            raise SluiceError(f"replay of {topic} stopped early: no records for {idle} polls")
    finally:
        consumer.close(autocommit=False)


def read_samples(
    kafka: KafkaSettings, topics: Iterable[str], codec: BatchCodec | None = None
) -> Iterator[tuple[str, Sample]]:
    """(topic, sample) of every committed batch of ``topics``, each batch id once."""
    codec = codec or BatchCodec(kafka.max_message_bytes)
    for topic in topics:
        seen: set[str] = set()
        for _p, _o, rec in read_range(kafka, topic):
            batch = codec.decode(rec.value, rec.headers)
            if batch.batch_id in seen:
                continue
            seen.add(batch.batch_id)
            for s in batch.samples:
                yield topic, s


# -- baselines ------------------------------------------------------------------------------
def stage_decision(sample: Sample, stage: str, topic: str = "") -> Decision:
    """The decision ``stage`` made for ``sample``: its last lineage event of that stage
    (else the topic it was read from: '.dropped' topics hold drops)."""
    event = next((e for e in reversed(sample.lineage) if e.stage == stage), None)
    kept = event.action != Action.DROPPED if event else not topic.endswith(".dropped")
    return Decision(
        kept=kept,
        scores=dict(sample.scores),
        version=event.model_version if event else "",
        reason=event.reason if event else "",
        text=sample.content,
    )


def baseline_from_topics(
    kafka: KafkaSettings, topics: Iterable[str], stage: str
) -> dict[str, Decision]:
    """The first run's decisions, from its kept and dropped output topics."""
    return {s.id: stage_decision(s, stage, t) for t, s in read_samples(kafka, topics)}


def baseline_from_scores(path: Path) -> dict[str, Decision]:
    """A local run's decisions, from its scores.jsonl (id, kept, scores, reason)."""
    if not path.is_file():
        raise ConfigError(f"baseline scores file not found: {path}")
    out: dict[str, Decision] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if str(row.get("reason", "")).startswith("input:"):
                continue
            scores = {k: float(v) for k, v in (row.get("scores") or {}).items() if v is not None}
            out[str(row["id"])] = Decision(bool(row["kept"]), scores, reason=row.get("reason", ""))
    return out


# -- the replay -----------------------------------------------------------------------------
def decide(core: StageCore, samples: list[Sample], stage: str) -> list[tuple[Sample, Decision]]:
    """Run the core over one batch; each sample with its decision."""
    outcomes = core.process(samples)
    return [
        (
            o.sample,
            Decision(
                kept=o.kept,
                scores=dict(o.sample.scores),
                version=core.model_version,
                reason=o.reason,
                text=o.sample.content,
            ),
        )
        for o in outcomes
    ]


def replay_topic(
    core: StageCore,
    stage: str,
    decision_version: str,
    kafka: KafkaSettings,
    input_topic: str,
    output_topic: str,
    dropped_topic: str = "",
    start: Bound = Bound(),
    end: Bound = Bound(),
) -> ReplayResult:
    """Re-run ``core`` over ``input_topic``'s range; kept samples to ``output_topic``,
    dropped ones to ``dropped_topic`` (if set), under version-bearing batch ids."""
    from kafka import KafkaProducer

    from services.runtime.kafka_stage import ensure_topics

    if output_topic == input_topic:
        raise ConfigError("a replay writes to a new topic, not to the one it reads")
    ensure_topics(kafka, [t for t in (output_topic, dropped_topic) if t])
    codec = BatchCodec(kafka.max_message_bytes)
    digest = decision_digest(stage, decision_version)
    result = ReplayResult(version=core.model_version, digest=digest)
    producer = KafkaProducer(
        **kafka.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        max_request_size=kafka.max_message_bytes + 65536,
    )
    futures = []
    try:
        for partition, offset, rec in read_range(kafka, input_topic, start, end):
            result.records += 1
            batch = codec.decode(rec.value, rec.headers)
            decided = decide(core, batch.samples, stage)
            batch_id = f"{input_topic}-{partition}-{offset}@{stage}.{digest}"
            for topic, kept, suffix in ((output_topic, True, ""), (dropped_topic, False, "d")):
                chunk = [s for s, d in decided if d.kept == kept]
                if not topic or not chunk:
                    continue
                for value, headers in codec.encode_split(chunk, stage, batch_id + suffix):
                    futures.append(producer.send(topic, value=value, key=rec.key, headers=headers))
                    result.batches_out += 1
            for s, d in decided:
                result.decisions[s.id] = d
        producer.flush()
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()
    return result


# -- the comparison -------------------------------------------------------------------------
def pick_score_keys(
    baseline: dict[str, Decision],
    replay: dict[str, Decision],
    baseline_key: str = "",
    replay_key: str = "",
) -> tuple[str, str]:
    """The score each version is compared by: given, else the replay's newest signal
    ('classifier' if present) and the baseline's first key shared or present."""

    def keys(d: dict[str, Decision]) -> list[str]:
        seen: dict[str, None] = {}
        for dec in d.values():
            seen.update(dict.fromkeys(dec.scores))
        return list(seen)

    rk, bk = keys(replay), keys(baseline)
    if not replay_key:
        replay_key = "classifier" if "classifier" in rk else (rk[0] if rk else "")
    if not baseline_key:
        shared = [k for k in bk if k == replay_key]
        baseline_key = shared[0] if shared else (bk[0] if bk else "")
    return baseline_key, replay_key


def compare(
    baseline: dict[str, Decision],
    replay: dict[str, Decision],
    *,
    baseline_version: str = "",
    replay_version: str = "",
    baseline_key: str = "",
    replay_key: str = "",
) -> dict[str, Any]:
    """The comparison report of two versions' decisions on the samples both saw."""
    common = sorted(set(baseline) & set(replay))
    if not common:
        raise InvalidArgument(
            f"no sample is in both the baseline ({len(baseline)}) and the replay ({len(replay)})"
        )
    bk, rk = pick_score_keys(baseline, replay, baseline_key, replay_key)
    b_kept = np.array([baseline[i].kept for i in common])
    r_kept = np.array([replay[i].kept for i in common])

    def example(i: str) -> dict[str, Any]:
        b, r = baseline[i], replay[i]
        text = r.text or b.text
        return {
            "id": i,
            "text": text[:240] + ("..." if len(text) > 240 else ""),
            "baseline_score": score(b, bk),
            "replay_score": score(r, rk),
            "baseline_reason": b.reason,
            "replay_reason": r.reason,
        }

    if not bk:  # a baseline without scores (rules only): its decision is its score
        bk = "kept"

    def score(d: Decision, key: str) -> float | None:
        return float(d.kept) if key == "kept" else d.scores.get(key)

    k2d = [i for i in common if baseline[i].kept and not replay[i].kept]
    d2k = [i for i in common if not baseline[i].kept and replay[i].kept]
    pairs = [
        (bs, rs)
        for i in common
        if (bs := score(baseline[i], bk)) is not None and (rs := score(replay[i], rk)) is not None
    ]
    a = np.array([p[0] for p in pairs], dtype=np.float64)
    b = np.array([p[1] for p in pairs], dtype=np.float64)
    pearson = (
        float(np.corrcoef(a, b)[0, 1]) if len(pairs) >= 3 and a.std() > 0 and b.std() > 0 else None
    )
    rho = spearman(a, b) if len(pairs) >= 3 else float("nan")
    versions = {
        "baseline": baseline_version or _common_version(baseline, common),
        "replay": replay_version or _common_version(replay, common),
    }
    return {
        "versions": versions,
        "samples": len(common),
        "only_in_baseline": len(set(baseline) - set(replay)),
        "only_in_replay": len(set(replay) - set(baseline)),
        "retention": {"baseline": float(b_kept.mean()), "replay": float(r_kept.mean())},
        "kept": {"baseline": int(b_kept.sum()), "replay": int(r_kept.sum())},
        "agreement": float((b_kept == r_kept).mean()),
        "changed": {
            "kept_to_dropped": len(k2d),
            "dropped_to_kept": len(d2k),
            "examples": {
                "kept_to_dropped": [example(i) for i in k2d[:EXAMPLES]],
                "dropped_to_kept": [example(i) for i in d2k[:EXAMPLES]],
            },
        },
        "score_correlation": {
            "baseline_score": bk,
            "replay_score": rk,
            "pairs": len(pairs),
            "spearman": None if np.isnan(rho) else rho,
            "pearson": pearson,
            "auc_vs_baseline_decisions": _auc_or_none(
                [baseline[i].kept for i in common if rk in replay[i].scores],
                [replay[i].scores[rk] for i in common if rk in replay[i].scores],
            ),
        },
        "_scatter": {"baseline": a.tolist(), "replay": b.tolist()},
    }


def _auc_or_none(labels: list[bool], scores: list[float]) -> float | None:
    """How well the replay's score ranks what the baseline kept above what it dropped."""
    value = roc_auc(labels, scores) if labels else float("nan")
    return None if np.isnan(value) else value


def _common_version(d: dict[str, Decision], ids: list[str]) -> str:
    versions = sorted({d[i].version for i in ids if d[i].version})
    return ",".join(versions) if versions else "unknown"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """report.json (without the scatter's raw points) and report.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    scatter = report.get("_scatter", {})
    body = {k: v for k, v in report.items() if not k.startswith("_")}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(body, indent=2, allow_nan=False, default=str) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    v = report["versions"]
    names = [f"baseline\n{v['baseline'][:40]}", f"replay\n{v['replay'][:40]}"]
    ret = [report["retention"]["baseline"], report["retention"]["replay"]]
    ax1.bar(names, ret, color=["#888888", "#2a7fd4"])
    for x, r in enumerate(ret):
        ax1.text(x, r + 0.01, f"{r:.1%}", ha="center")
    ch = report["changed"]
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel("retention")
    ax1.set_title(
        f"{report['samples']} samples: kept->dropped {ch['kept_to_dropped']}, "
        f"dropped->kept {ch['dropped_to_kept']}",
        fontsize=9,
    )
    sc = report["score_correlation"]
    xs, ys = np.array(scatter.get("baseline", [])), np.array(scatter.get("replay", []))
    rho = sc["spearman"]
    if sc["baseline_score"] == "kept":  # a rules-only baseline: the score by its decision
        bins = np.linspace(0, 1, 21)
        ax2.hist(ys[xs == 1], bins=bins, alpha=0.6, label="baseline kept")
        ax2.hist(ys[xs == 0], bins=bins, alpha=0.6, label="baseline dropped")
        ax2.set_xlabel(f"replay: {sc['replay_score']}")
        ax2.set_ylabel("samples")
        ax2.legend()
        auc = sc.get("auc_vs_baseline_decisions")
        ax2.set_title(f"AUC vs baseline decisions {auc:.3f}" if auc is not None else "scores")
    else:
        if len(xs):
            ax2.scatter(xs, ys, s=8, alpha=0.6)
        ax2.set_xlabel(f"baseline: {sc['baseline_score']}")
        ax2.set_ylabel(f"replay: {sc['replay_score']}")
        ax2.set_title(f"score correlation: spearman {rho:.3f}" if rho is not None else "scores")
    fig.tight_layout()
    png_path = out_dir / "report.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
