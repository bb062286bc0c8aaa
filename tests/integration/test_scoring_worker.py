"""The scoring stage end to end over the real Kafka broker:
every sample in comes out exactly once with an Ask-LLM score in [0, 1];
garbage goes to the dead-letter topic and the worker keeps going; the
Prometheus endpoint reports the counts."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.codec import CONTENT_TYPE, H_CONTENT_TYPE, H_SCHEMA, SCHEMA_VERSION
from services.runtime.domain import Action, Sample
from services.runtime.kafka_stage import H_DLQ_REASON, StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics, serve_metrics
from services.runtime.settings import KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 64
PER_BATCH = 16


def _texts(n: int) -> list[str]:
    docs = [
        line.strip()
        for line in Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    # short snippets keep the test's LLM work small: N prefill passes of ~20 words each
    return [" ".join(docs[i % len(docs)].split()[(i // len(docs)) * 7 :][:20]) for i in range(n)]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scoring_worker_end_to_end(kafka_bootstrap: str, torch_backend) -> None:  # type: ignore[no-untyped-def]
    ingest, scored = unique("ingest"), unique("scored")
    ensure_topics(kafka_bootstrap, [ingest, scored, f"{ingest}.dlq"], partitions=4)
    samples = [Sample(id=f"doc-{i:04d}", text=t, source="lee") for i, t in enumerate(_texts(N))]

    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, samples[: N // 2], batch_size=PER_BATCH, batch_prefix="a")
    # garbage in the middle of the stream: undecodable value, and no schema header
    producer.send(
        ingest,
        value=b"\x00\xffnot a protobuf\x13",
        headers=[(H_SCHEMA, SCHEMA_VERSION), (H_CONTENT_TYPE, CONTENT_TYPE)],
    ).get(30)
    producer.send(ingest, value=b'{"text": "json is not our format"}').get(30)
    publish(producer, ingest, samples[N // 2 :], batch_size=PER_BATCH, batch_prefix="b")
    producer.close()

    settings = ScoringSettings(steps=["ask_llm"])
    settings.model.max_tokens = 48
    core = ScoringCore(settings, backend=torch_backend)
    metrics = StageMetrics("scoring")
    server, port = serve_metrics(metrics, "127.0.0.1", 0)
    kafka = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        input_topic=ingest,
        output_topic=scored,
        group_id=unique("scoring"),
        max_poll_records=4,
    )
    worker = StageWorker(core, kafka, metrics, stage="scoring")
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (worker.run(idle_timeout_s=20), done.set()), daemon=True
    )
    thread.start()
    try:
        out = read_topic(
            kafka_bootstrap,
            scored,
            expect=N,
            timeout_s=600,
            count=lambda r: len(decode_all([r])[0].samples),
        )
        dlq = read_topic(kafka_bootstrap, f"{ingest}.dlq", expect=2, timeout_s=30)
        # wait until the worker has committed its last poll before scraping
        worker.request_stop()
        thread.join(60)
        assert not thread.is_alive()
        scraped = _scrape(port)
    finally:
        worker.request_stop()
        server.shutdown()

    got = [s for b in decode_all(out) for s in b.samples]
    ids = [s.id for s in got]
    assert len(ids) == N, f"{len(ids)} samples arrived, {len(set(ids))} distinct"
    assert sorted(ids) == sorted(s.id for s in samples)
    for s in got:
        assert 0.0 <= s.scores["ask_llm"] <= 1.0
        assert s.lineage[-1].stage == "scoring" and s.lineage[-1].action == Action.KEPT
        assert s.lineage[-1].model_version
    # the scores are not constant: the model really read the texts
    assert len({round(s.scores["ask_llm"], 6) for s in got}) > N // 2

    reasons = sorted(dict(r.headers)[H_DLQ_REASON].decode() for r in dlq)
    assert reasons == ["decode_error", "schema_version"]
    assert worker.stats.dead_letters == 2

    lab = (("stage", "scoring"),)
    by_transport = (("stage", "scoring"), ("transport", "kafka"))
    assert scraped[("sluice_stage_samples_in_total", by_transport)] == N
    assert scraped[("sluice_stage_samples_out_total", by_transport)] == N
    assert scraped[("sluice_stage_batches_total", lab)] == N // PER_BATCH
    assert (
        scraped[
            ("sluice_stage_dead_letters_total", (("reason", "decode_error"), ("stage", "scoring")))
        ]
        == 1
    )
    assert scraped[("sluice_score_ask_llm_count", lab)] == N
    assert scraped[("sluice_stage_tokens_in_total", by_transport)] == sum(
        len(s.text.split()) for s in samples
    )
