"""What Sluice's guarantees rest on, checked on the broker the suite runs against.

The Kafka-protocol stand-ins fell short exactly here (../shared/INFRA.md): Tansu never made a
transactional write visible and mis-reported end offsets; noida-db never expired a SIGKILLed
group member. On real Apache Kafka:

- a consumer killed with SIGKILL loses its partitions to a live member of the group within the
  session timeout the consumer asked for (not the rebalance timeout, which is far longer here);
- a transactional write is invisible to ``read_committed`` readers until the commit, while
  ``read_uncommitted`` readers see it at once; aborted records are never visible to them;
- end offsets are exact (the operator's lag is end minus committed);
- a three-broker cluster with replication factor 3 loses no acknowledged write when a broker
  is killed and restarted.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from services.runtime.kafka_stage import ensure_topics
from tests.integration.kafka_util import unique
from tests.support.kafka_broker import KafkaCluster, _cluster_id

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SESSION_MS = 6000  # the broker's default group.min.session.timeout.ms
REBALANCE_MS = 120_000  # max.poll.interval.ms = the rebalance timeout, far above the session


def _victim(bootstrap: str, topic: str, group: str, ready: Path) -> subprocess.Popen[bytes]:
    """A group member in its own process: joins, touches ``ready`` once it owns partitions,
    then keeps polling (and heartbeating) until it is killed."""
    code = textwrap.dedent(
        f"""
        import pathlib
        from kafka import KafkaConsumer
        c = KafkaConsumer({topic!r}, bootstrap_servers={bootstrap.split(",")!r},
                          group_id={group!r}, session_timeout_ms={SESSION_MS},
                          heartbeat_interval_ms=1000, max_poll_interval_ms={REBALANCE_MS},
                          enable_auto_commit=False)
        while True:
            c.poll(timeout_ms=200)
            if c.assignment():
                pathlib.Path({str(ready)!r}).touch()
        """
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


def test_sigkilled_member_loses_its_partitions_within_the_session_timeout(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, group = unique("sess"), unique("sess-grp")
    ensure_topics(kafka_bootstrap, [topic], partitions=4)
    ready = tmp_path / "ready"
    victim = _victim(kafka_bootstrap, topic, group, ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert victim.poll() is None, "the victim consumer exited on its own"
            assert time.monotonic() < deadline, "the victim never got an assignment"
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        survivor = KafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap.split(","),
            group_id=group,
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=REBALANCE_MS,
            enable_auto_commit=False,
        )
        try:
            owned: set[TopicPartition] = set()
            while len(owned) < 4 and time.monotonic() - killed_at < REBALANCE_MS / 1000:
                survivor.poll(timeout_ms=200)
                owned = survivor.assignment()
            took = time.monotonic() - killed_at
        finally:
            survivor.close()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert owned == {TopicPartition(topic, p) for p in range(4)}
    # The dead member is expired by its session timeout; a broker that waited for it to
    # rejoin would hold the group for the rebalance timeout (120 s) instead. The slack covers
    # one join/sync round and a slow CI machine, and stays far below the rebalance timeout.
    assert took < SESSION_MS / 1000 + 15, f"partitions came back after {took:.1f} s"


def _read_all(bootstrap: str, topic: str, isolation: str, quiet_s: float = 3.0) -> list[bytes]:
    """Every value of ``topic`` visible at ``isolation``, reading until ``quiet_s`` passes with
    nothing new."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
    )
    out: list[bytes] = []
    try:
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            for records in consumer.poll(timeout_ms=300).values():
                out.extend(r.value for r in records)
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def test_transactional_writes_are_visible_to_read_committed_only_after_commit(
    kafka_bootstrap: str,
) -> None:
    topic = unique("txn")
    ensure_topics(kafka_bootstrap, [topic], partitions=2)
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap.split(","),
        transactional_id=unique("txn-id"),
        acks="all",
    )
    try:
        producer.init_transactions()
        # An aborted transaction: read_uncommitted sees it, read_committed never does.
        producer.begin_transaction()
        for i in range(5):
            producer.send(topic, value=f"aborted-{i}".encode(), partition=i % 2)
        producer.flush()
        producer.abort_transaction()

        producer.begin_transaction()
        for i in range(10):
            producer.send(topic, value=f"committed-{i}".encode(), partition=i % 2)
        producer.flush()  # written to the log, transaction still open
        before_commit = _read_all(kafka_bootstrap, topic, "read_committed")
        uncommitted = _read_all(kafka_bootstrap, topic, "read_uncommitted")
        producer.commit_transaction()
    finally:
        producer.close()
    after_commit = _read_all(kafka_bootstrap, topic, "read_committed")

    committed = {f"committed-{i}".encode() for i in range(10)}
    aborted = {f"aborted-{i}".encode() for i in range(5)}
    assert before_commit == []
    assert set(uncommitted) == committed | aborted  # the writes are in the log
    assert sorted(after_commit) == sorted(committed)  # each exactly once, none aborted


def test_end_offsets_are_exact_with_multi_record_batches(kafka_bootstrap: str) -> None:
    """Tansu reported 'start of the last batch + 1'; the operator's lag needs the true end."""
    topic = unique("ends")
    ensure_topics(kafka_bootstrap, [topic], partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap.split(","), linger_ms=50)
    for _i in range(37):
        producer.send(topic, value=b"x" * 100, partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap.split(","))
    try:
        tp = TopicPartition(topic, 0)
        assert consumer.end_offsets([tp])[tp] == 37
    finally:
        consumer.close()


def test_three_broker_cluster_keeps_acknowledged_writes_across_a_broker_kill(
    kafka_cluster: KafkaCluster,
) -> None:
    bootstrap = kafka_cluster.bootstrap.split(",")
    topic = unique("rf3")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])
        described = admin.describe_topics([topic])[0]
        assert all(len(p["replica_nodes"]) == 3 for p in described["partitions"])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=10)
    for i in range(300):
        producer.send(topic, value=f"m{i}".encode())
    producer.flush()
    victim = kafka_cluster.nodes[0]
    victim.kill()  # SIGKILL one broker; two in-sync replicas remain, so writes go on
    for i in range(300, 600):
        producer.send(topic, value=f"m{i}".encode())
    producer.flush()
    victim.launch(kafka_cluster.heap)  # back on the same ports and data
    kafka_cluster.wait_ready(nodes=[victim])
    for i in range(600, 700):
        producer.send(topic, value=f"m{i}".encode())
    producer.flush()
    producer.close()
    got = _read_all(kafka_cluster.bootstrap, topic, "read_committed")
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(700))


def test_cluster_runs_three_brokers_and_a_controller_quorum(kafka_cluster: KafkaCluster) -> None:
    assert len(kafka_cluster.nodes) == 3 and all(n.running for n in kafka_cluster.nodes)
    admin = KafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap.split(","))
    try:
        assert {b["broker_id"] for b in admin.describe_cluster()["brokers"]} == {1, 2, 3}
    finally:
        admin.close()


def test_cluster_ids_never_start_with_a_dash() -> None:
    """`kafka-storage format --cluster-id -xyz` reads the id as an option: 1 in 64 random
    ids would fail a cluster's start (it did, in a fresh-clone run)."""
    ids = {_cluster_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
