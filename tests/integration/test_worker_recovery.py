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
    *,
    instance: str = "worker-0",
    extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SLUICE_SCORING_KAFKA__PROCESSING_GUARANTEE": guarantee,
        # the same identity on every restart: fences the killed incarnation at once
        "SLUICE_SCORING_KAFKA__INSTANCE_ID": f"{group}-{instance}",
        "SLUICE_SCORING_STEPS": json.dumps(["heuristics"]),
        "SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_SCORING_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_SCORING_KAFKA__OUTPUT_TOPIC": out,
        "SLUICE_SCORING_KAFKA__GROUP_ID": group,
        "SLUICE_SCORING_KAFKA__MAX_POLL_RECORDS": "1",
        "SLUICE_SCORING_DROPPED_TOPIC": dropped,
        "SLUICE_SCORING_METRICS__ENABLED": "false",
        **(extra or {}),
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


def test_a_rebalance_during_an_open_transaction_outputs_nothing_twice(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """exactly_once, two workers. Worker A holds one long transaction open (interval 20 s,
    input arriving every 30 ms, so no idle poll closes it) when worker B joins and takes
    half of A's partitions, which B reads from their committed offsets (none yet). Had A
    committed that transaction after the rebalance, the broker would accept it (A commits
    under the new generation) and every record of a moved partition would be output twice;
    A must drop it instead. A read_committed reader sees every sample exactly once."""
    ingest, out, dropped, group = unique("ing"), unique("out"), unique("drop"), unique("grp")
    ensure_topics(kafka_bootstrap, [ingest, out, dropped, f"{ingest}.dlq"], partitions=4)
    slow_commits = {"SLUICE_SCORING_KAFKA__TRANSACTION_INTERVAL_MS": "20000"}
    samples = [Sample(id=f"r{i:05d}", text=f"Paragraph {i} of a report. " * 8) for i in range(2000)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all", linger_ms=0)

    def feed(part: list[Sample]) -> None:
        for i in range(0, len(part), 10):
            publish(producer, ingest, part[i : i + 10], batch_size=10, batch_prefix=f"f{i}")
            time.sleep(0.03)

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = _worker(kafka_bootstrap, ingest, out, dropped, group, logs[0], extra=slow_commits)
    workers = [a]
    try:
        deadline = time.monotonic() + 60
        while "assigned: " + ingest not in logs[0].read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        feed(samples[:600])  # A's transaction is open and holds these
        workers.append(
            _worker(
                kafka_bootstrap,
                ingest,
                out,
                dropped,
                group,
                logs[1],
                instance="worker-1",
                extra=slow_commits,
            )
        )
        feed(samples[600:])  # B joins meanwhile; A keeps polling data
        producer.close()
        deadline = time.monotonic() + 120
        seen: list[str] = []
        while time.monotonic() < deadline and len(set(seen)) < len(samples):
            recs = read_topic(kafka_bootstrap, out, expect=1, timeout_s=2) + read_topic(
                kafka_bootstrap, dropped, expect=1, timeout_s=2
            )
            seen = [s.id for b in decode_all(recs) for s in b.samples]
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w, log in zip(workers, logs, strict=True):
            assert w.wait(30) == 0, log.read_text()[-3000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    both = logs[0].read_text() + logs[1].read_text()
    assert both.count("assigned: ") >= 3, "B never took partitions from A: no rebalance"
    recs = read_topic(kafka_bootstrap, out, expect=1, timeout_s=3) + read_topic(
        kafka_bootstrap, dropped, expect=1, timeout_s=3
    )
    seen = [s.id for b in decode_all(recs) for s in b.samples]
    twice = len(seen) - len(set(seen))
    assert twice == 0, f"{twice} samples output twice"
    assert sorted(seen) == sorted(s.id for s in samples), "lost samples"
