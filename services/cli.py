"""The ``sluice`` command: local runs, the demo, service processes, publishing.

sluice demo [--out DIR]                 build the demo corpus and curate it
sluice run INPUT --out DIR [--pipeline FILE | --stages a,b]
                                        curate a JSONL/Parquet file in process
sluice pipeline render-values FILE      the chart's stages values for a pipeline file
sluice serve SERVICE [serve|worker|all] run a service (gRPC and/or Kafka worker);
                                        SERVICE: a registered stage kind
sluice density merge --name N --version V   merge pass-1 sketch parts in the store
sluice publish INPUT --topic T          publish a corpus (files, globs, s3://) to a topic
sluice topics T [T ...]                 create Kafka topics (idempotent)
sluice classifier train ...             train a quality classifier on a teacher's judgments
sluice replay ...                       re-run a stage at a new version; comparison report

publish and topics connect with TLS/SASL from env SLUICE_KAFKA_SECURITY__* (PROTOCOL,
SASL_MECHANISM, SASL_USERNAME, SASL_PASSWORD_FILE, CA_FILE, CERT_FILE, KEY_FILE).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Models load from installed packages or local paths unless a hub is explicitly allowed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from services.cli_flywheel import add_parsers as add_flywheel_parsers
from services.runtime.errors import SluiceError
from services.runtime.registry import KINDS, STAGES


def _load_run_settings(  # type: ignore[no-untyped-def]
    pipeline: str | None, steps: str | None, stages: str | None = None
):
    """The run's pipeline: the file (``--pipeline``/``--config``), its stage list replaced
    by ``--stages`` (a stage the file configures keeps its config), scoring's steps by
    ``--steps``."""
    from pydantic import ValidationError

    from services.local.runner import RunSettings

    data = _read_yaml(pipeline) if pipeline else {}
    if stages:
        kinds = [s.strip() for s in stages.split(",") if s.strip()]
        configured = {
            s["kind"]: s for s in data.get("stages") or [] if isinstance(s, dict) and "kind" in s
        }
        data["stages"] = [configured.get(k, k) for k in kinds]
    try:
        settings = RunSettings.model_validate(data)
    except ValidationError as exc:
        raise SluiceError(f"invalid pipeline: {exc}") from exc
    if steps:
        scoring = next((s for s in settings.stages if s.kind == "scoring"), None)
        if scoring is None:
            raise SluiceError("--steps sets the scoring stage's steps; the pipeline has none")
        scoring.config["steps"] = [s.strip() for s in steps.split(",") if s.strip()]
        scoring.settings()  # validate now, not when the run starts
    return settings


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SluiceError(f"file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SluiceError(f"{p} must hold a mapping, got {type(data).__name__}")
    return data


def cmd_pipeline_render_values(args: argparse.Namespace) -> int:
    """The chart values of a pipeline file (``helm install -f`` them)."""
    import yaml

    from services.runtime.pipeline import Pipeline

    settings = _load_run_settings(args.pipeline, None)
    values = Pipeline.model_validate({"stages": settings.model_dump()["stages"]}).to_chart_values()
    text = yaml.safe_dump(values, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from services.local.runner import run_local

    settings = _load_run_settings(args.pipeline, args.steps, args.stages)
    report = run_local(Path(args.input), Path(args.out), settings, progress=not args.no_progress)
    _print_summary(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo.corpus import build_demo_corpus, write_jsonl
    from services.local.runner import run_local

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "input.jsonl"
    n = write_jsonl(build_demo_corpus(seed=args.seed), corpus)
    print(f"demo corpus: {n} documents (real news text from gensim + generated junk) -> {corpus}")
    settings = _load_run_settings(args.pipeline, args.steps, args.stages)
    scoring = next((st for st in settings.stages if st.kind == "scoring"), None)
    if (
        args.max_tokens
        and scoring is not None
        and "max_tokens" not in scoring.config.get("model", {})
    ):
        model = {**scoring.config.get("model", {}), "max_tokens": args.max_tokens}
        scoring.config["model"] = model
        scoring.settings()  # validate now
        print(f"scoring reads the first {args.max_tokens} tokens of each document")
    report = run_local(corpus, out, settings, progress=not args.no_progress)
    _print_summary(report)
    return 0


def _print_summary(report) -> None:  # type: ignore[no-untyped-def]
    print(
        f"\nkept {report.samples_kept}/{report.samples_in} samples "
        f"({report.retention:.1%}) in {report.seconds:.1f}s  model={report.model_version}"
    )
    print(f"{'step':<12}{'in':>8}{'kept':>8}{'retention':>11}{'seconds':>9}  top drop reasons")
    for st in report.steps:
        top = ", ".join(
            f"{k}={v}" for k, v in sorted(st.drop_reasons.items(), key=lambda kv: -kv[1])[:3]
        )
        print(
            f"{st.name:<12}{st.samples_in:>8}{st.samples_kept:>8}{st.retention:>10.1%}"
            f"{st.seconds:>9.1f}  {top}"
        )
    if report.by_label:
        print(f"\n{'label':<20}{'in':>6}{'kept':>6}")
        for k, v in report.by_label.items():
            print(f"{k:<20}{v['in']:>6}{v['kept']:>6}")
    for sig, summ in report.scores.items():
        print(
            f"score {sig}: mean={summ['mean']:.3g} p10={summ['p10']:.3g} "
            f"p50={summ['p50']:.3g} p90={summ['p90']:.3g}"
        )
    print(f"\nwrote {report.output_dir}/kept.jsonl, scores.jsonl, report.json, report.png")


def cmd_serve(args: argparse.Namespace) -> int:
    from services.runtime.app import main

    return main(args.service, [args.mode] + (["--config", args.config] if args.config else []))


def cmd_density_merge(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.density.settings import DensitySettings, SketchSettings
    from services.density.worker import build_core, merge_version, require_store, store_of
    from services.runtime.settings import load_settings

    base = load_settings(DensitySettings, args.config)
    chosen = {k: v for k, v in (("name", args.name), ("version", args.version)) if v}
    try:
        sketch = SketchSettings.model_validate({**base.sketch.model_dump(), **chosen})
    except ValidationError as exc:
        raise SluiceError(f"invalid sketch name/version: {exc}") from exc
    settings = base.model_copy(update={"sketch": sketch})
    core = build_core(settings)
    merged = merge_version(core, require_store(settings, store_of(core)), overwrite=args.force)
    print(
        f"merged {len(merged.parts)} part(s) of sketch {merged.name} v{merged.version}: "
        f"n={merged.n}, calibration points={len(merged.calibration)}, "
        f"fingerprint={merged.fingerprint}"
    )
    for part in merged.parts:
        print(f"  {part.worker_id}: n={part.n}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer
    from tqdm import tqdm

    from services.runtime.codec import BatchCodec
    from services.runtime.kafka_stage import ensure_topics
    from services.runtime.settings import KafkaClientEnv
    from services.runtime.sources import (
        PublishCheckpoint,
        list_sources,
        object_store,
        publish_files,
    )

    store = object_store(args.s3_endpoint, not args.s3_insecure)
    files = list_sources(args.input, store)
    kafka = KafkaClientEnv().kafka(args.bootstrap)
    ensure_topics(kafka, [args.topic], partitions=args.partitions)
    producer = KafkaProducer(
        **kafka.client_kwargs(),
        acks="all",
        max_request_size=args.max_message_bytes + 65536,
    )
    checkpoint = PublishCheckpoint.load(args.checkpoint)
    with tqdm(unit="doc", desc=f"publish {args.topic}", disable=args.no_progress) as bar:
        report = publish_files(
            producer,
            args.topic,
            files,
            store=store,
            checkpoint=checkpoint,
            text_field=args.text_field,
            id_field=args.id_field,
            batch_size=args.batch_size,
            codec=BatchCodec(args.max_message_bytes),
            on_samples=bar.update,
        )
    producer.close()
    invalid = sum(report.invalid.values())
    print(
        f"published {report.samples} samples from {report.files} file(s) in {report.messages} "
        f"batches to {args.topic}; skipped {invalid} invalid records"
        + (
            f" ({', '.join(f'{k}={v}' for k, v in sorted(report.invalid.items()))})"
            if invalid
            else ""
        )
    )
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from services.runtime.kafka_stage import ensure_topics
    from services.runtime.settings import KafkaClientEnv

    configs = {}
    for item in args.topic_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SluiceError(f"--topic-config wants KEY=VALUE, got {item!r}")
        configs[key.strip()] = value.strip()
    ensure_topics(
        KafkaClientEnv().kafka(args.bootstrap),
        args.topics,
        partitions=args.partitions,
        replication=args.replication,
        configs=configs,
    )
    print("ok:", ", ".join(args.topics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sluice", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def common_run(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pipeline",
            "--config",
            dest="pipeline",
            help="pipeline YAML: stages (in order, with topics and config), batch_size ...",
        )
        p.add_argument(
            "--steps", help="scoring steps, comma-separated (default heuristics,perplexity,ask_llm)"
        )
        p.add_argument(
            "--stages",
            help=f"stages in order, comma-separated (default scoring); kinds: {', '.join(KINDS)}",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("run", help="curate a JSONL/Parquet file in process")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="output directory")
    common_run(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="curate the shipped demo corpus")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="tokens of each document the scoring models read (default 128, so that the "
        "demo's two model passes per document take minutes on a 2-core CPU without bf16 "
        "hardware; 0 = the pipeline's own budget, 512 by default)",
    )
    common_run(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("serve", help="run a service process")
    p.add_argument("service", choices=KINDS)
    p.add_argument(
        "mode",
        nargs="?",
        default="all",
        help="serve, worker or all"
        + "".join(f"; {s.name} also: {', '.join(s.commands)}" for s in STAGES if s.commands),
    )
    p.add_argument("--config")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("pipeline", help="pipeline file operations")
    psub = p.add_subparsers(dest="action", required=True)
    r = psub.add_parser("render-values", help="the chart's stages values for a pipeline file")
    r.add_argument("pipeline", help="pipeline YAML (as for sluice run --pipeline)")
    r.add_argument("--out", help="write the values here instead of stdout")
    r.set_defaults(fn=cmd_pipeline_render_values)

    p = sub.add_parser("density", help="density sketch operations")
    dsub = p.add_subparsers(dest="action", required=True)
    m = dsub.add_parser("merge", help="merge the pass-1 parts of a sketch version in the store")
    m.add_argument("--name", help="sketch name (default: sketch.name of the settings)")
    m.add_argument("--version", type=int, help="version to merge (default: sketch.version)")
    m.add_argument("--config", help="YAML density settings (env SLUICE_DENSITY_* overrides)")
    m.add_argument("--force", action="store_true", help="overwrite an existing merged version")
    m.set_defaults(fn=cmd_density_merge)

    p = sub.add_parser(
        "publish",
        help="publish a corpus (file, directory, glob or s3://bucket/prefix/ of JSONL, "
        "JSONL.gz/.zst, Parquet) to a Kafka topic",
    )
    p.add_argument("input", help="file, directory, glob, or s3://bucket/prefix/")
    p.add_argument("--text-field", default="text", help="record field holding the text")
    p.add_argument(
        "--id-field", default="id", help="record field holding the id (absent: <file>-<n>)"
    )
    p.add_argument(
        "--checkpoint",
        help="progress file: an interrupted publish resumes where it stopped (at-least-once)",
    )
    p.add_argument(
        "--s3-endpoint",
        default=os.environ.get("SLUICE_S3_ENDPOINT", ""),
        help="host:port of the S3 API for s3:// inputs (keys: AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY)",
    )
    p.add_argument("--s3-insecure", action="store_true", help="plain HTTP to the S3 endpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--topic", default="sluice.ingest")
    p.add_argument(
        "--bootstrap", default=os.environ.get("SLUICE_KAFKA_BOOTSTRAP", "localhost:9092")
    )
    p.add_argument("--batch-size", type=int, default=256, help="samples per Kafka message")
    p.add_argument("--partitions", type=int, default=4, help="partitions if the topic is created")
    p.add_argument("--max-message-bytes", type=int, default=8 * 1024 * 1024)
    p.set_defaults(fn=cmd_publish)

    p = sub.add_parser("topics", help="create Kafka topics if missing")
    p.add_argument("topics", nargs="+")
    p.add_argument(
        "--bootstrap", default=os.environ.get("SLUICE_KAFKA_BOOTSTRAP", "localhost:9092")
    )
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument(
        "--replication",
        type=int,
        default=1,
        help="replication factor of created topics (production clusters: 3)",
    )
    p.add_argument(
        "--topic-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config of created topics, repeatable (e.g. max.message.bytes=8388608)",
    )
    p.set_defaults(fn=cmd_topics)
    add_flywheel_parsers(sub)  # sluice classifier train, sluice replay
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except SluiceError as exc:
        print(f"sluice: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
