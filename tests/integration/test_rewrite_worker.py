"""The rewriting stage over a real Kafka-protocol broker (Tansu): rewritten or kept
samples come out under their own ids with a rewrite lineage event, toxic ones go to the
dropped topic with the reason, garbage goes to the dead-letter topic."""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaProducer

from services.rewrite.core import RewriteCore
from services.rewrite.settings import RewriteSettings
from services.runtime.codec import CONTENT_TYPE, H_CONTENT_TYPE, H_SCHEMA, SCHEMA_VERSION
from services.runtime.domain import Action, Sample
from services.runtime.kafka_stage import H_DLQ_REASON, StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACTS = [
    "Honey bees tell each other where flowers are with a waggle dance inside the hive.",
    "The library on Main Street will open an hour earlier on weekdays from next month.",
]
TOXIC = "What a load of bullshit, the bus was late again."


def test_rewrite_worker_end_to_end(kafka_bootstrap: str, torch_backend) -> None:  # type: ignore[no-untyped-def]
    ingest, out_topic, dropped = unique("scored"), unique("rewritten"), unique("dropped")
    ensure_topics(kafka_bootstrap, [ingest, out_topic, dropped, f"{ingest}.dlq"], partitions=2)
    samples = [Sample(id=f"doc-{i}", text=t, source="t") for i, t in enumerate(FACTS)]
    samples.append(Sample(id="doc-tox", text=TOXIC, source="t"))
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, samples[:2], batch_size=2, batch_prefix="a")
    producer.send(
        ingest,
        value=b"\x00garbage",
        headers=[(H_SCHEMA, SCHEMA_VERSION), (H_CONTENT_TYPE, CONTENT_TYPE)],
    ).get(30)
    publish(producer, ingest, samples[2:], batch_size=2, batch_prefix="b")
    producer.close()

    settings = RewriteSettings(instruction={"preset": "paraphrase"}, dropped_topic=dropped)
    settings.generation.max_new_tokens = 12
    settings.toxicity.judge = False
    settings.drift.similarity = False
    metrics = StageMetrics("rewrite")
    core = RewriteCore(settings, backend=torch_backend, metrics=metrics)
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        input_topic=ingest,
        output_topic=out_topic,
        group_id=unique("rewrite"),
    )
    worker = StageWorker(core, kafka, metrics, stage="rewrite", dropped_topic=dropped)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=120), daemon=True)
    thread.start()
    try:
        count = lambda r: len(decode_all([r])[0].samples)  # noqa: E731
        out = read_topic(kafka_bootstrap, out_topic, expect=2, timeout_s=300, count=count)
        gone = read_topic(kafka_bootstrap, dropped, expect=1, timeout_s=60, count=count)
        dlq = read_topic(kafka_bootstrap, f"{ingest}.dlq", expect=1, timeout_s=30)
    finally:
        worker.request_stop()
        thread.join(60)

    kept = {s.id: s for b in decode_all(out) for s in b.samples}
    assert set(kept) == {"doc-0", "doc-1"}
    for sid, original in zip(("doc-0", "doc-1"), FACTS, strict=True):
        event = kept[sid].lineage[-1]
        assert event.stage == "rewrite" and event.model_version == torch_backend.model_version
        if event.action == Action.CHANGED:
            assert event.parent_id == sid and kept[sid].metadata["original_text"] == original
        else:  # 12 tokens are rarely a whole paraphrase: kept unchanged, reason recorded
            assert event.action == Action.KEPT and kept[sid].text == original
            assert event.reason.startswith("rewrite:")
    (tox,) = [s for b in decode_all(gone) for s in b.samples]
    assert tox.id == "doc-tox" and tox.lineage[-1].reason == "toxicity:lexical"
    assert [dict(r.headers)[H_DLQ_REASON].decode() for r in dlq] == ["decode_error"]
    assert (
        metrics.registry.get_sample_value(
            "sluice_stage_samples_out_total", {"stage": "rewrite", "transport": "kafka"}
        )
        == 2
    )
