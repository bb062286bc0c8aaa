"""The dedup stage worker on the real broker with its state in real Redis, killed mid-stream.

A stream of first occurrences followed by planted exact and near duplicates of some of
them goes through ``python -m services.dedup worker`` (exactly-once, one partition so
"first" is well defined). The first worker is SIGKILLed after it has claimed keys in Redis
for part of the stream but before any output committed (its transaction only commits once
the input is drained), so the restarted worker re-processes samples whose keys are already
claimed, by themselves. A read_committed reader must then see every sample exactly once:
every first occurrence kept (none marked a duplicate of itself), every planted duplicate
dropped naming its original (none missed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer

from services.dedup.minhash import normalise
from services.runtime.domain import Sample
from services.runtime.kafka_stage import ensure_topics, publish
from tests.integration.kafka_util import decode_all, read_topic, unique
from tests.support.servers import Server
from tests.unit.dedup.test_minhash import jaccard

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def distinct_docs(n: int) -> list[str]:
    """Demo-corpus articles of 100+ words, no two near each other (exact Jaccard < 0.3)."""
    from services.demo.corpus import build_demo_corpus

    docs = [r.text for r in build_demo_corpus(seed=0) if r.kind == "real"]
    picked: list[str] = []
    for d in docs:
        nd = normalise(d)
        if len(nd.split()) >= 100 and all(jaccard(nd, normalise(p)) < 0.3 for p in picked):
            picked.append(d)
        if len(picked) == n:
            break
    return picked


def worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.dedup", "worker"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def test_kill9_mid_stream_then_restart(
    kafka_bootstrap: str, redis_server: Server, tmp_path: Path
) -> None:
    ingest, out, dropped, group = unique("ding"), unique("dout"), unique("ddrop"), unique("dgrp")
    ensure_topics(kafka_bootstrap, [ingest, out, dropped, f"{ingest}.dlq"], partitions=1)
    rng = random.Random(7)
    originals = [Sample(id=f"o{i:03d}", text=t) for i, t in enumerate(distinct_docs(120))]
    planted: dict[str, tuple[str, str]] = {}  # duplicate id -> (original id, level)
    dups = []
    for i, o in enumerate(rng.sample(originals, 80)):
        if i % 2:
            text, level = f"  {o.text.upper()} ", "exact"
        else:
            words = o.text.split()
            k = rng.randrange(5, len(words) - 5)
            text, level = " ".join([*words[:k], "zyzzyva", *words[k + 1 :]]), "near"
            assert jaccard(normalise(o.text), normalise(text)) >= 0.9  # the ground truth
        dups.append(Sample(id=f"d{i:03d}", text=text))
        planted[f"d{i:03d}"] = (o.id, level)
    stream = originals + dups
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, stream, batch_size=1)
    producer.close()

    prefix = f"w{uuid.uuid4().hex[:8]}:"
    env = {
        "SLUICE_DEDUP_STATE__BACKEND": "redis",
        "SLUICE_DEDUP_STATE__REDIS_URL": f"redis://{redis_server.address}/0",
        "SLUICE_DEDUP_STATE__KEY_PREFIX": prefix,
        "SLUICE_DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SLUICE_DEDUP_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_DEDUP_KAFKA__OUTPUT_TOPIC": out,
        "SLUICE_DEDUP_KAFKA__GROUP_ID": group,
        "SLUICE_DEDUP_KAFKA__INSTANCE_ID": f"{group}-0",
        "SLUICE_DEDUP_KAFKA__MAX_POLL_RECORDS": "1",
        # one transaction for the whole stream: it commits only once the input is drained
        "SLUICE_DEDUP_KAFKA__TRANSACTION_INTERVAL_MS": "100000",
        "SLUICE_DEDUP_KAFKA__TRANSACTION_TIMEOUT_MS": "150000",
        "SLUICE_DEDUP_DROPPED_TOPIC": dropped,
        "SLUICE_DEDUP_METRICS__ENABLED": "false",
    }
    r = redis.Redis.from_url(env["SLUICE_DEDUP_STATE__REDIS_URL"])
    exact_claims = f"{prefix}x*"

    def claimed() -> int:
        return sum(1 for _ in r.scan_iter(match=exact_claims, count=1000))

    first = worker(env, tmp_path / "w1.log")
    deadline = time.monotonic() + 120
    n = 0
    while time.monotonic() < deadline and n < len(stream) // 4 and first.poll() is None:
        n = claimed()
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    n = claimed()
    # keys claimed for a good part of the stream, nothing of it committed downstream
    assert len(stream) // 4 <= n < len(stream), (tmp_path / "w1.log").read_text()[-3000:]
    assert read_topic(kafka_bootstrap, out, expect=1, timeout_s=3) == []

    second = worker(env, tmp_path / "w2.log")
    try:
        deadline = time.monotonic() + 120
        seen: dict[str, list[Sample]] = {}
        while time.monotonic() < deadline and len(seen) < len(stream):
            recs = read_topic(kafka_bootstrap, out, expect=1, timeout_s=2)
            recs += read_topic(kafka_bootstrap, dropped, expect=1, timeout_s=2)
            seen = {}
            for b in decode_all(recs):
                for s in b.samples:
                    seen.setdefault(s.id, []).append(s)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()

    assert sorted(seen) == sorted(s.id for s in stream), "lost samples"
    assert all(len(copies) == 1 for copies in seen.values()), "a sample seen twice"
    kept = {sid for sid, (s,) in seen.items() if s.lineage[-1].reason == ""}
    assert kept == {o.id for o in originals}, "a first occurrence dropped, or a duplicate kept"
    for sid, (original, level) in planted.items():
        (s,) = seen[sid]
        assert (s.lineage[-1].reason, s.metadata["dedup_of"]) == (f"dedup:{level}", original)
    assert all(s.metadata.get("dedup_of") != sid for sid, (s,) in seen.items())
