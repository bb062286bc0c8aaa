"""The density stage end to end: two pass-1 workers sketch their partitions of a real
Kafka-protocol topic (Tansu) and publish parts to a real S3 server (moto); the parts are
merged; a pass-2 worker samples the same topic against the merged sketch.

Every sample comes out exactly once, kept (with its importance weight) or dropped (with
its reason); the kept fraction is near the target; the small clusters are kept far more
often than uniform sampling would keep them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from pydantic import SecretStr

from services.density.core import REASON_SUBSAMPLED, SCORE_DENSITY, SCORE_WEIGHT, DensityCore
from services.density.settings import (
    DensitySettings,
    Mode,
    SketchSettings,
    StoreSettings,
)
from services.density.store import SketchStore
from services.density.worker import DensityWorker, merge_version
from services.runtime.backends.embeddings import EmbeddingSettings, SentenceTransformerEmbedder
from services.runtime.domain import Action, Sample
from services.runtime.kafka_stage import ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from tests.integration.kafka_util import decode_all, unique, wait_committed
from tests.support.servers import Server
from tests.unit.density.mixture import mixture

pytestmark = pytest.mark.integration

RATE = 0.3
TEXTS = [
    "The river flooded the valley after a week of heavy rain.",
    "Parliament passed the budget late on Thursday night.",
    "A new species of frog was found in the rainforest.",
    "The orchestra performed Beethoven's ninth symphony to a full hall.",
    "Engineers tested the bridge with forty loaded trucks.",
    "The chess champion resigned after a surprising queen sacrifice.",
]


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(EmbeddingSettings())


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[tuple[str, str, str]]:
    ingest, sampled, dropped = unique("d-ingest"), unique("d-sampled"), unique("d-dropped")
    ensure_topics(kafka_bootstrap, [ingest, sampled, dropped, f"{ingest}.dlq"], partitions=4)
    yield ingest, sampled, dropped


def _settings(
    mode: Mode, bootstrap: str, topics: tuple[str, str, str], store: StoreSettings, worker: str
) -> DensitySettings:
    ingest, sampled, dropped = topics
    return DensitySettings(
        mode=mode,
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            input_topic=ingest,
            output_topic=sampled,
            group_id=f"{ingest}-density",
            max_poll_records=4,
            poll_timeout_ms=200,
            session_timeout_ms=6000,
        ),
        sketch=SketchSettings(name="corpus", version=1),
        store=store,
        target_rate=RATE,
        seed=11,
        worker_id=worker,
        build_idle_timeout_s=60,
        dropped_topic=dropped,
    )


def _run_pass_1(
    bootstrap: str,
    topics: tuple[str, str, str],
    store_settings: StoreSettings,
    embedder: SentenceTransformerEmbedder,
    publish_all: Callable[[], None],
) -> list[DensityWorker]:
    store = SketchStore(store_settings)
    workers = []
    for name in ("build-a", "build-b"):
        settings = _settings("two_pass_build", bootstrap, topics, store_settings, name)
        core = DensityCore(settings, embedder=embedder)
        workers.append(DensityWorker(core, StageMetrics("density"), store))
    # Both workers share one consumer group: each sketches its partitions.
    group = workers[0].stage_worker.settings.group_id
    assert workers[1].stage_worker.settings.group_id == group
    assert workers[0].stage_worker.settings.output_topic == ""  # pass 1 emits nothing
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    # Publish only once the group has settled with partitions on both workers, so that each
    # one sketches a share (otherwise the first to join may drain the topic alone).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = [w.stage_worker.assignment() for w in workers]
        if all(owned) and sum(map(len, owned)) == 4:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the group never split its partitions: {owned}")
    publish_all()
    # Stop them (as SIGTERM would) once the topic is drained: each publishes its part on
    # the way out. (Unattended, a worker stops after build_idle_timeout_s without input.)
    # (Counting what the workers read is not enough: a transaction dropped in a rebalance
    # is read again.)
    wait_committed(bootstrap, group, topics[0], timeout_s=60)
    for w in workers:
        w.request_stop()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return workers


def _read_samples(bootstrap: str, topics: list[str], expect: int) -> dict[str, list[Sample]]:
    """Samples per topic, read from the start until ``expect`` arrived in all (60 s at
    most), plus 1 s more to catch duplicates."""
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=[bootstrap],
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    out: dict[str, list[Sample]] = {t: [] for t in topics}
    deadline, extra = time.monotonic() + 60, None
    try:
        while time.monotonic() < (extra or deadline):
            for records in consumer.poll(timeout_ms=300).values():
                for batch, r in zip(decode_all(records), records, strict=True):
                    out[r.topic].extend(batch.samples)
            if extra is None and sum(map(len, out.values())) >= expect:
                extra = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


def test_two_pass_density_over_kafka_and_s3(
    kafka_bootstrap: str,
    s3_server: Server,
    topics: tuple[str, str, str],
    embedder: SentenceTransformerEmbedder,
) -> None:
    data = mixture(seed=5, big=480, small=(30, 30, 30, 30))
    samples = data.samples(prefix="vec-")
    text_samples = [Sample(id=f"text-{i}", text=t) for i, t in enumerate(TEXTS)]
    everything = samples + text_samples
    store_settings = StoreSettings(
        endpoint=s3_server.address,
        bucket=f"sketches-{uuid.uuid4().hex[:6]}",
        secure=False,
        access_key=SecretStr("test"),
        secret_key=SecretStr("test"),
        create_bucket=True,
    )

    def publish_all() -> None:
        producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
        publish(producer, topics[0], samples[:300], batch_size=40, batch_prefix="a")
        publish(producer, topics[0], text_samples, batch_size=40, batch_prefix="t")
        publish(producer, topics[0], samples[300:], batch_size=40, batch_prefix="b")
        producer.close()

    builders = _run_pass_1(kafka_bootstrap, topics, store_settings, embedder, publish_all)
    published = [w.published for w in builders]
    assert all(published), f"a pass-1 worker published nothing: {published}"
    assert sum(w.stage_worker.stats.samples_in for w in builders) >= len(everything)

    settings = _settings("two_pass_sample", kafka_bootstrap, topics, store_settings, "sample")
    core = DensityCore(settings, embedder=embedder)
    store = SketchStore(store_settings)
    merged = merge_version(core, store)
    assert merged.n == len(everything)  # every sample sketched exactly once
    assert {p.worker_id for p in merged.parts} == {"build-a", "build-b"}

    sampler = DensityWorker(core, StageMetrics("density"), store)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        out = _read_samples(kafka_bootstrap, [topics[1], topics[2]], expect=len(everything))
    finally:
        sampler.request_stop()
        thread.join(30)
    kept, dropped = out[topics[1]], out[topics[2]]
    kept_ids, dropped_ids = [s.id for s in kept], [s.id for s in dropped]
    assert len(set(kept_ids)) == len(kept_ids) and len(set(dropped_ids)) == len(dropped_ids)
    assert not set(kept_ids) & set(dropped_ids)
    assert sorted(kept_ids + dropped_ids) == sorted(s.id for s in everything)

    for s in kept:
        assert s.scores[SCORE_WEIGHT] >= 1.0 and 0 < s.scores[SCORE_DENSITY] <= 1
        assert s.lineage[-1].stage == "density" and s.lineage[-1].action == Action.KEPT
        assert "v1" in s.lineage[-1].model_version
    for s in dropped:
        assert s.lineage[-1].reason == REASON_SUBSAMPLED
        assert SCORE_WEIGHT not in s.scores

    n = len(everything)
    assert abs(len(kept) / n - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / n)
    small_ids = {s.id for s, small in zip(samples, data.small, strict=True) if small}
    small_share_in = len(small_ids) / n
    small_share_kept = sum(i in small_ids for i in kept_ids) / len(kept_ids)
    assert small_share_kept > 2 * small_share_in
    # The text samples were embedded by the model and judged like the rest.
    assert all(SCORE_DENSITY in s.scores for s in kept + dropped if s.id.startswith("text-"))
    # Decisions do not depend on partitions or batches: the API on the same merged sketch
    # keeps exactly the samples the stream kept.
    api = core.sample("", everything)
    assert {s.id for s, k in zip(everything, api.kept, strict=True) if k} == set(kept_ids)
