"""The data-flywheel commands of ``sluice``: train a classifier on a teacher's judgments,
replay a stage at a new version and compare.

sluice classifier train (--input FILE [--texts CORPUS] | --topic T ...) (--teacher KEY |
    --label-field F [--positive V ...]) --out DIR|s3://bucket/prefix [--name N] [--hidden H]
sluice replay --stage scoring --config NEW.yaml (--topic T --output-topic T2
    [--from-offset N | --from-time ISO] [--to-offset N | --to-time ISO]
    (--baseline-topics A,B | --baseline-scores scores.jsonl) | --input FILE
    --baseline-scores scores.jsonl) --report DIR

Kafka connections take TLS/SASL from env SLUICE_KAFKA_SECURITY__* (as sluice publish).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from services.runtime.errors import SluiceError


def _kafka(bootstrap: str):  # type: ignore[no-untyped-def]
    from services.runtime.settings import KafkaClientEnv

    return KafkaClientEnv().kafka(bootstrap)


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from services.runtime.backends.embeddings import EmbeddingSettings
    from services.runtime.objectstore import ObjectStoreSettings
    from services.scoring import classifier, teacher

    spec = teacher.TeacherSpec(
        score=args.teacher or "", label_field=args.label_field or "", positive=tuple(args.positive)
    )
    if args.input:
        sources = [str(Path(args.input).resolve())]
        if args.texts:
            sources.append(str(Path(args.texts).resolve()))
        ex = teacher.from_files(
            Path(args.input), spec, Path(args.texts) if args.texts else None, args.text_field
        )
    elif args.topic:
        from services.runtime.replay import read_samples

        sources = [f"kafka:{args.bootstrap}/{t}" for t in args.topic]
        ex = teacher.from_samples(
            read_samples(_kafka(args.bootstrap), args.topic), spec, args.stage
        )
    else:
        raise SluiceError("give the teacher's judgments: --input FILE or --topic T")
    if args.limit:
        ex.ids, ex.texts, ex.values = (
            ex.ids[: args.limit],
            ex.texts[: args.limit],
            ex.values[: args.limit],
        )
    print(f"{len(ex.ids)} examples labelled by {spec.name} ({ex.skipped} without a label skipped)")
    art = classifier.train(
        ex.texts,
        ex.values,
        name=args.name,
        embedding=EmbeddingSettings(model=args.embedding_model, device=args.device),
        config=classifier.TrainConfig(
            hidden=args.hidden, epochs=args.epochs, test_fraction=args.test_fraction, seed=args.seed
        ),
        threshold=args.threshold,
        lower_is_better=args.lower_is_better,
        provenance=ex.provenance(spec, sources),
    )
    store = ObjectStoreSettings(
        endpoint=os.environ.get("SLUICE_STORE_ENDPOINT", ""),
        secure=os.environ.get("SLUICE_STORE_SECURE", "true").lower() == "true",
    )
    where = classifier.save(art, args.out, store)
    m = art.metrics
    print(
        f"held-out vs teacher ({m['n_test']} samples): AUC {m['auc']:.3f}  agreement "
        f"{m['agreement']:.3f}  ECE {m['ece']:.3f}  Brier {m['brier']:.3f}"
    )
    print(f"classifier {art.version} -> {where}")
    print(f"use it: scoring settings classifier.artifact: {where}  (steps: [..., classifier])")
    return 0


def _bound(offset: int | None, when: str | None):  # type: ignore[no-untyped-def]
    from services.runtime.replay import Bound

    if offset is not None and when:
        raise SluiceError("give an offset or a time for each end of the range, not both")
    if when:
        try:
            ms = (
                int(when)
                if when.isdigit()
                else int(datetime.fromisoformat(when).timestamp() * 1000)
            )
        except ValueError as exc:
            raise SluiceError(f"not an ISO time or epoch milliseconds: {when!r}") from exc
        return Bound(timestamp_ms=ms)
    return Bound(offset=offset)


def cmd_replay(args: argparse.Namespace) -> int:
    from services.local.runner import RunSettings, read_records
    from services.runtime import replay
    from services.runtime.metrics import StageMetrics
    from services.runtime.registry import stage
    from services.runtime.settings import load_settings

    spec = stage(args.stage)
    settings = load_settings(spec.settings_class(), args.config)
    core = spec.build_core(settings, StageMetrics(args.stage))
    version = f"{core.model_version}+config.{settings.decision_fingerprint()}"
    report_dir = Path(args.report)
    if args.input:  # a local file: the replay's decisions go to the report folder
        if not args.baseline_scores:
            raise SluiceError("a file replay compares with --baseline-scores (a scores.jsonl)")
        samples = [r.sample for r in read_records(Path(args.input), RunSettings()) if r.sample]
        decisions: dict[str, Any] = {}
        report_dir.mkdir(parents=True, exist_ok=True)
        with open(report_dir / "scores.jsonl", "w", encoding="utf-8") as f:
            for i in range(0, len(samples), args.batch_size):
                for s, d in replay.decide(core, samples[i : i + args.batch_size], args.stage):
                    decisions[s.id] = d
                    row = {"id": s.id, "kept": d.kept, "scores": d.scores, "reason": d.reason}
                    f.write(json.dumps(row) + "\n")
        replay_version = core.model_version
        print(f"replayed {len(samples)} samples of {args.input} at {replay_version}")
    else:
        if not (args.topic and args.output_topic):
            raise SluiceError("a topic replay needs --topic and --output-topic (or --input FILE)")
        kafka = _kafka(args.bootstrap)
        result = replay.replay_topic(
            core,
            args.stage,
            version,
            kafka,
            args.topic,
            args.output_topic,
            args.dropped_topic
            if args.dropped_topic is not None
            else args.output_topic + ".dropped",
            _bound(args.from_offset, args.from_time),
            _bound(args.to_offset, args.to_time),
        )
        decisions, replay_version = result.decisions, result.version
        print(
            f"replayed {result.records} records ({len(decisions)} samples) of {args.topic} at "
            f"{replay_version} -> {args.output_topic} (batch ids @{args.stage}.{result.digest})"
        )
    if args.baseline_scores:
        baseline = replay.baseline_from_scores(Path(args.baseline_scores))
    elif args.baseline_topics:
        topics = [t.strip() for t in args.baseline_topics.split(",") if t.strip()]
        baseline = replay.baseline_from_topics(_kafka(args.bootstrap), topics, args.stage)
    else:
        raise SluiceError(
            "compare with --baseline-topics (the first run's outputs) or --baseline-scores"
        )
    report = replay.compare(
        baseline,
        decisions,
        replay_version=replay_version,
        baseline_version=args.baseline_version or "",
        baseline_key=args.baseline_score or "",
        replay_key=args.replay_score or "",
    )
    js, png = replay.write_report(report, report_dir)
    r, ch, sc = report["retention"], report["changed"], report["score_correlation"]
    v = report["versions"]
    print(
        f"{report['samples']} samples: retention {r['baseline']:.1%} ({v['baseline']}) "
        f"-> {r['replay']:.1%} ({v['replay']}); agreement {report['agreement']:.1%}; "
        f"kept->dropped {ch['kept_to_dropped']}, dropped->kept {ch['dropped_to_kept']}; "
        f"spearman({sc['baseline_score']}, {sc['replay_score']}) = {sc['spearman']}"
    )
    print(f"wrote {js} and {png}")
    return 0


def add_parsers(sub: Any) -> None:
    """The flywheel's subcommands, on the ``sluice`` parser's subparsers."""
    bootstrap = os.environ.get("SLUICE_KAFKA_BOOTSTRAP", "localhost:9092")
    p = sub.add_parser("classifier", help="learned quality classifier operations")
    csub = p.add_subparsers(dest="action", required=True)
    t = csub.add_parser("train", help="train a classifier on a teacher's scores or labels")
    t.add_argument(
        "--input", help="JSONL/Parquet of scored records (kept.jsonl, scores.jsonl, an export)"
    )
    t.add_argument("--texts", help="the corpus a scores.jsonl scored (its texts, joined by id)")
    t.add_argument("--text-field", default="text")
    t.add_argument(
        "--topic", action="append", default=[], help="Kafka topic of scored samples (repeatable)"
    )
    t.add_argument("--bootstrap", default=bootstrap)
    t.add_argument("--stage", default="scoring", help="whose decision a 'kept' label is")
    t.add_argument("--teacher", help="score key the teacher wrote, e.g. ask_llm")
    t.add_argument("--label-field", help="or a label field: kept, or a metadata field")
    t.add_argument(
        "--positive", action="append", default=[], help="string label value meaning keep"
    )
    t.add_argument(
        "--threshold", type=float, help="teacher score that counts as keep (default: median)"
    )
    t.add_argument("--lower-is-better", action="store_true", help="e.g. perplexity")
    t.add_argument(
        "--out", required=True, help="directory or s3://bucket/prefix (env SLUICE_STORE_ENDPOINT)"
    )
    t.add_argument("--name", default="quality")
    t.add_argument("--embedding-model", default="packaged:all-minilm-l6-v2")
    t.add_argument("--device", default="cpu")
    t.add_argument("--hidden", type=int, default=0, help="hidden units of an MLP head (0 = linear)")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--test-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=0, help="train on the first N examples only")
    t.set_defaults(fn=cmd_classifier_train)

    r = sub.add_parser("replay", help="re-run a stage at a new version over a topic range; compare")
    r.add_argument("--stage", default="scoring")
    r.add_argument("--config", help="the new version's stage settings (YAML)")
    r.add_argument("--topic", help="input topic to replay")
    r.add_argument("--input", help="or a JSONL/Parquet file (local replay)")
    r.add_argument("--output-topic", help="new topic for the replay's kept samples")
    r.add_argument(
        "--dropped-topic", help="its dropped samples (default OUTPUT.dropped; '' = none)"
    )
    r.add_argument("--from-offset", type=int)
    r.add_argument("--from-time", help="ISO time or epoch ms")
    r.add_argument("--to-offset", type=int, help="exclusive")
    r.add_argument("--to-time", help="ISO time or epoch ms, exclusive")
    r.add_argument("--baseline-topics", help="the first run's output topics, comma-separated")
    r.add_argument("--baseline-scores", help="or a local run's scores.jsonl")
    r.add_argument("--baseline-version", help="name of the baseline version in the report")
    r.add_argument("--baseline-score", help="baseline score key to correlate (default: auto)")
    r.add_argument("--replay-score", help="replay score key to correlate (default: classifier)")
    r.add_argument("--report", required=True, help="folder for report.json and report.png")
    r.add_argument("--bootstrap", default=bootstrap)
    r.add_argument("--batch-size", type=int, default=64, help="samples per batch (file replay)")
    r.set_defaults(fn=cmd_replay)
