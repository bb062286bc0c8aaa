"""The synthesis stage over a real Kafka-protocol broker (Tansu): the seeds pass through,
each followed by the samples generated from it (new ids, parent_id = the seed's id), and
filter rejections go to the dropped topic."""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaProducer

from services.runtime.backends.embeddings import EmbeddingSettings, create_embedder
from services.runtime.domain import Action, Sample
from services.runtime.kafka_stage import StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.synth.core import SynthCore
from services.synth.settings import SynthSettings
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = (
    "The museum reopened on Saturday after a two-year renovation that added a glass roof "
    "over the central courtyard and a new gallery for maritime history."
)


def test_synth_worker_end_to_end(kafka_bootstrap: str, torch_backend) -> None:  # type: ignore[no-untyped-def]
    ingest, out_topic, dropped = unique("scored"), unique("synth"), unique("dropped")
    ensure_topics(kafka_bootstrap, [ingest, out_topic, dropped, f"{ingest}.dlq"], partitions=2)
    # the same document twice in one batch: its second question is a near-duplicate
    seeds = [Sample(id="doc-a", text=DOC, source="news"), Sample(id="doc-b", text=DOC)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, seeds, batch_size=2)
    producer.close()

    settings = SynthSettings(methods=["grounded_qa"], dropped_topic=dropped)
    settings.generation.max_new_tokens = 24
    settings.reject_truncated = False
    settings.min_answer_overlap = 0.0
    metrics = StageMetrics("synth")
    core = SynthCore(
        settings,
        backend=torch_backend,
        embedder=create_embedder(EmbeddingSettings()),
        metrics=metrics,
    )
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        input_topic=ingest,
        output_topic=out_topic,
        group_id=unique("synth"),
    )
    worker = StageWorker(core, kafka, metrics, stage="synth", dropped_topic=dropped)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=120), daemon=True)
    thread.start()
    try:
        count = lambda r: len(decode_all([r])[0].samples)  # noqa: E731
        out = read_topic(kafka_bootstrap, out_topic, expect=3, timeout_s=300, count=count)
        gone = read_topic(kafka_bootstrap, dropped, expect=1, timeout_s=60, count=count)
    finally:
        worker.request_stop()
        thread.join(60)

    got = [s for b in decode_all(out) for s in b.samples]
    assert [s.id for s in got[:2]] == ["doc-a", "doc-b"]  # seeds first, forwarded
    assert all(s.lineage[-1].action == Action.KEPT for s in got[:2])
    (qa,) = got[2:]
    assert qa.lineage[0].action == Action.CREATED and qa.lineage[0].parent_id == "doc-a"
    assert qa.metadata["method"] == "grounded_qa" and qa.prompt and qa.response
    (dup,) = [s for b in decode_all(gone) for s in b.samples]
    assert dup.lineage[0].parent_id == "doc-b" and dup.prompt == qa.prompt
    assert dup.lineage[-1].reason == "filter:near_duplicate"
    assert (
        metrics.registry.get_sample_value(
            "sluice_stage_samples_dropped_total",
            {"stage": "synth", "reason": "filter:near_duplicate", "transport": "kafka"},
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value("sluice_stage_generated_tokens_total", {"stage": "synth"})
        or 0
    ) > 0
