"""Crash and shutdown behaviour of a real worker process on the real broker.

kill -9 in the middle of a stream, restart, under both delivery guarantees:

- exactly_once (the default): a read_committed reader sees every sample exactly once, with
  no repeated batch at all, however many times the worker is killed;
- at_least_once: nothing is lost, and the only repeats are whole batches re-sent with the
  same deterministic batch id, so a reader that keeps the first copy of each batch id sees
  every sample exactly once.

SIGTERM: the worker exits 0 having committed everything it produced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from kafka import KafkaProducer

from services.runtime.domain import Sample
from services.runtime.kafka_stage import ensure_topics, publish
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = pytest.mark.integration

BATCHES, PER_BATCH = 150, 40
ROOT = Path(__file__).resolve().parents[2]


def _worker(
    bootstrap: str,
    ingest: str,
    out: str,
    dropped: str,
    group: str,
    log: Path,
    guarantee: str = "exactly_once",
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SLUICE_SCORING_KAFKA__PROCESSING_GUARANTEE": guarantee,
        # the same identity on every restart: fences the killed incarnation at once
        "SLUICE_SCORING_KAFKA__INSTANCE_ID": f"{group}-worker-0",
        "SLUICE_SCORING_STEPS": json.dumps(["heuristics"]),
        "SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_SCORING_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_SCORING_KAFKA__OUTPUT_TOPIC": out,
        "SLUICE_SCORING_KAFKA__GROUP_ID": group,
        "SLUICE_SCORING_KAFKA__MAX_POLL_RECORDS": "1",
        "SLUICE_SCORING_DROPPED_TOPIC": dropped,
        "SLUICE_SCORING_METRICS__ENABLED": "false",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.scoring", "worker"],
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def _count(records: list) -> int:  # type: ignore[type-arg]
    return sum(len(b.samples) for b in decode_all(records))


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_kill9_then_restart_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path, guarantee: str
) -> None:
    ingest, out, dropped, group = unique("ing"), unique("out"), unique("drop"), unique("grp")
    ensure_topics(kafka_bootstrap, [ingest, out, dropped, f"{ingest}.dlq"], partitions=3)
    docs = [
        line.strip()
        for line in Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    ]
    samples = [Sample(id=f"s{i:05d}", text=docs[i % len(docs)]) for i in range(BATCHES * PER_BATCH)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, samples, batch_size=PER_BATCH)
    producer.close()
    total = len(samples)

    first = _worker(kafka_bootstrap, ingest, out, dropped, group, tmp_path / "w1.log", guarantee)
    # wait until the first worker is well into the stream, then kill -9
    deadline = time.monotonic() + 120
    progressed = 0
    while time.monotonic() < deadline and progressed < total // 5:
        progressed = _count(read_topic(kafka_bootstrap, out, expect=1, timeout_s=2)) + _count(
            read_topic(kafka_bootstrap, dropped, expect=1, timeout_s=2)
        )
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert 0 < progressed < total, (
        f"first worker processed {progressed}/{total}: no mid-stream kill"
    )

    second = _worker(kafka_bootstrap, ingest, out, dropped, group, tmp_path / "w2.log", guarantee)
    try:
        deadline = time.monotonic() + 180
        seen_ids: set[str] = set()
        while time.monotonic() < deadline and len(seen_ids) < total:
            recs = read_topic(kafka_bootstrap, out, expect=1, timeout_s=2) + read_topic(
                kafka_bootstrap, dropped, expect=1, timeout_s=2
            )
            seen_ids = {s.id for b in decode_all(recs) for s in b.samples}
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()

    records = read_topic(kafka_bootstrap, out, expect=1, timeout_s=3) + read_topic(
        kafka_bootstrap, dropped, expect=1, timeout_s=3
    )
    batches = decode_all(records)
    by_id: dict[str, list[list[str]]] = defaultdict(list)
    for b in batches:
        by_id[b.batch_id].append([s.id for s in b.samples])
    if guarantee == "exactly_once":
        repeated = {bid: len(c) for bid, c in by_id.items() if len(c) > 1}
        assert not repeated, f"a read_committed reader saw repeated batches: {repeated}"
        seen = [s.id for b in batches for s in b.samples]
        assert sorted(seen) == sorted(s.id for s in samples), "lost or duplicated samples"
    # repeats (at_least_once only) are whole batches, identical under the same id
    for copies in by_id.values():
        assert all(c == copies[0] for c in copies)
    deduped = [sid for copies in by_id.values() for sid in copies[0]]
    assert sorted(deduped) == sorted(s.id for s in samples), "lost or duplicated samples"

    # SIGTERM committed everything: a third worker in the group finds nothing to do
    before = len(batches)
    log3 = tmp_path / "w3.log"
    third = _worker(kafka_bootstrap, ingest, out, dropped, group, log3, guarantee)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and f"assigned: {ingest}-" not in log3.read_text():
        time.sleep(0.2)
    assert f"assigned: {ingest}-" in log3.read_text(), log3.read_text()[-3000:]
    time.sleep(2)  # a few polls after owning every partition: nothing arrives
    third.send_signal(signal.SIGTERM)
    assert third.wait(30) == 0
    after = len(read_topic(kafka_bootstrap, out, expect=1, timeout_s=3)) + len(
        read_topic(kafka_bootstrap, dropped, expect=1, timeout_s=3)
    )
    assert after == before
