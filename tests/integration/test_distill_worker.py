"""The distillation stage end to end over a real Kafka-protocol broker (Tansu) with real
S3 (moto): every sample comes out once as a teacher pair whose top-k payload is an S3
object that decodes back to the response; a batch with a promptless sample goes to the
dead-letter topic; Prometheus reports samples and generated tokens."""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaProducer

from services.distill.codec import TOPK_KEY, TOPK_URI_KEY, load_topk
from services.distill.core import RESPONSE_TOKENS_KEY, STAGE, DistillCore
from services.distill.settings import DistillSettings
from services.distill.store import S3ObjectStore
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.domain import Action, Sample
from services.runtime.kafka_stage import H_DLQ_REASON, StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.integration.kafka_util import decode_all, read_topic, unique
from tests.support.servers import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Give one tip for sleeping well.",
    "What is two plus two?",
]


def test_distill_worker_end_to_end(
    kafka_bootstrap: str, s3_server: Server, torch_backend: TorchBackend
) -> None:
    ingest, out_topic = unique("ingest"), unique("distilled")
    ensure_topics(kafka_bootstrap, [ingest, out_topic, f"{ingest}.dlq"], partitions=2)
    # SFT prompts and documents used as prompts, two per batch; then a bad batch.
    samples = [
        Sample(id=f"p{i}", prompt=p) if i % 2 else Sample(id=f"p{i}", text=p)
        for i, p in enumerate(PROMPTS)
    ]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, samples, batch_size=2, batch_prefix="good")
    orphan = [Sample(id="x0", prompt="Hi?"), Sample(id="x1", response="no prompt here")]
    publish(producer, ingest, orphan, batch_size=2, batch_prefix="bad")
    producer.close()

    bucket = unique("topk")
    settings = DistillSettings.model_validate(
        {
            "generation": {"max_new_tokens": 6, "top_logprobs": 4},
            "topk_store": {
                "inline_max_bytes": 0,  # every payload to S3
                "s3": {
                    "endpoint": s3_server.address,
                    "bucket": bucket,
                    "access_key": "test",
                    "secret_key": "test",
                    "secure": False,
                },
            },
        }
    )
    store = S3ObjectStore(settings.topk_store.s3)
    store.client.make_bucket(bucket)
    metrics = StageMetrics(STAGE)
    core = DistillCore(settings, backend=torch_backend, store=store, metrics=metrics)
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        input_topic=ingest,
        output_topic=out_topic,
        group_id=unique("distill"),
    )
    worker = StageWorker(core, kafka, metrics, stage=STAGE)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=20), daemon=True)
    thread.start()
    try:
        out = read_topic(
            kafka_bootstrap,
            out_topic,
            expect=len(PROMPTS),
            timeout_s=300,
            count=lambda r: len(decode_all([r])[0].samples),
        )
        dlq = read_topic(kafka_bootstrap, f"{ingest}.dlq", expect=1, timeout_s=60)
    finally:
        worker.request_stop()
        thread.join(60)
    assert not thread.is_alive()

    got = {s.id: s for b in decode_all(out) for s in b.samples}
    assert sorted(got) == sorted(s.id for s in samples)
    for i, prompt in enumerate(PROMPTS):
        s = got[f"p{i}"]
        assert (s.prompt, s.text) == (prompt, "")
        assert s.response
        event = s.lineage[-1]
        assert (event.stage, event.action) == (STAGE, Action.CHANGED)
        assert event.model_version == torch_backend.model_version
        assert TOPK_KEY not in s.metadata
        assert s.metadata[TOPK_URI_KEY].startswith(f"s3://{bucket}/")
        topk = load_topk(s, store)
        assert topk.k == 4 and len(topk.tokens) == int(s.metadata[RESPONSE_TOKENS_KEY])
        assert torch_backend.decode(topk.tokens.tolist()) == s.response

    assert [dict(r.headers)[H_DLQ_REASON].decode() for r in dlq] == ["invalid"]
    registry = metrics.registry
    label = {"stage": STAGE}
    counted = {**label, "transport": "kafka"}
    assert registry.get_sample_value("sluice_stage_samples_in_total", counted) == len(PROMPTS)
    assert registry.get_sample_value("sluice_stage_generated_tokens_total", label) == sum(
        int(s.metadata[RESPONSE_TOKENS_KEY]) for s in got.values()
    )
    assert registry.get_sample_value("sluice_generation_seconds_count", label) == 2
    step = {"stage": STAGE, "step": STAGE, "transport": "kafka"}
    assert registry.get_sample_value("sluice_step_samples_total", {**step, "outcome": "in"}) == 4
    assert registry.get_sample_value("sluice_step_samples_total", {**step, "outcome": "kept"}) == 4
