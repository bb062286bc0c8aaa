"""Kafka transport security on the real broker: a stage worker consumes and produces over
mutual TLS and over SASL_SSL (SCRAM), and a client without the right CA, certificate or
password is refused with ``Unavailable`` within its bootstrap timeout, not left hanging.

Every client here is built from ``KafkaSettings.client_kwargs()`` (the topics helper, the
publisher, the worker's consumer, producer and admin client); results are read back over the
broker's plain listener, which sees the same log.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from services import cli
from services.runtime.domain import Sample
from services.runtime.errors import Unavailable
from services.runtime.kafka_stage import StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSecuritySettings, KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from tests.integration.kafka_util import decode_all, read_topic, unique
from tests.support.kafka_broker import SASL_USER, KafkaCluster

pytestmark = pytest.mark.integration

TEXT = (
    "The committee met on Tuesday to review the proposal for the new library. Members "
    "discussed the budget, the timeline for construction and the plan to keep the old "
    "reading room open while the work goes on. A final vote is expected next month, after "
    "the public has had a chance to comment on the design and on the cost of the project. "
    "The mayor said the city would cover half of the cost if the state pays the rest."
)


def _password_file(tmp_path: Path, password: str) -> str:
    f = tmp_path / "kafka-password"
    f.write_text(password + "\n")  # as `kubectl create secret --from-file` often stores it
    return str(f)


def _security(
    cluster: KafkaCluster, listener: str, tmp_path: Path, **over: object
) -> tuple[str, KafkaSecuritySettings]:
    """Bootstrap address and settings of a client that ``listener`` ("ssl": mutual TLS,
    "sasl": SASL_SSL with SCRAM-SHA-512) accepts; ``over`` spoils one field."""
    tls = cluster.tls
    assert tls is not None
    if listener == "ssl":
        fields: dict[str, object] = {
            "protocol": "SSL",
            "ca_file": str(tls.ca),
            "cert_file": str(tls.client_cert),
            "key_file": str(tls.client_key),
        }
        bootstrap = cluster.ssl_bootstrap
    else:
        fields = {
            "protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": SASL_USER,
            "sasl_password_file": _password_file(tmp_path, cluster.sasl_password),
            "ca_file": str(tls.ca),
        }
        bootstrap = cluster.sasl_ssl_bootstrap
    return bootstrap, KafkaSecuritySettings.model_validate(fields | over)


def _worker(kafka: KafkaSettings, dropped: str) -> StageWorker:
    return StageWorker(
        ScoringCore(ScoringSettings(steps=["heuristics"])),
        kafka,
        StageMetrics("scoring"),
        stage="scoring",
        dropped_topic=dropped,
    )


@pytest.mark.parametrize("listener", ["ssl", "sasl"])
def test_worker_consumes_and_produces_over_tls(
    kafka_secure: KafkaCluster, tmp_path: Path, listener: str
) -> None:
    bootstrap, security = _security(kafka_secure, listener, tmp_path)
    ingest, out, dropped = unique("ingest"), unique("out"), unique("dropped")
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        security=security,
        input_topic=ingest,
        output_topic=out,
        group_id=unique("g"),
        bootstrap_timeout_ms=10000,
    )
    ensure_topics(kafka, [ingest, out, dropped, kafka.dead_letter_topic], partitions=2)
    producer = KafkaProducer(**kafka.client_kwargs(), acks="all")
    samples = [Sample(id=f"s-{i:03d}", text=TEXT) for i in range(40)]
    sent = publish(producer, ingest, samples, batch_size=5)
    producer.close()

    worker = _worker(kafka, dropped)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=6), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the worker did not finish"
    assert worker.stats.records == sent
    assert worker.stats.samples_in == len(samples)

    kept = decode_all(read_topic(kafka_secure.bootstrap, out, expect=1, timeout_s=15))
    gone = decode_all(read_topic(kafka_secure.bootstrap, dropped, expect=0, timeout_s=3))
    ids = [s.id for b in kept + gone for s in b.samples]
    assert sorted(ids) == [s.id for s in samples]
    assert kept, "nothing was kept: the test text should pass the heuristics"


@pytest.mark.parametrize(
    ("listener", "spoil", "why"),
    [
        ("sasl", {"sasl_password": "wrong", "sasl_password_file": ""}, "wrong password"),
        ("sasl", {"sasl_username": "nobody"}, "unknown user"),
        ("sasl", {"ca_file": "OTHER_CA"}, "broker certificate from an untrusted CA"),
        ("ssl", {"cert_file": "", "key_file": ""}, "no client certificate"),
        ("ssl", {"ca_file": "OTHER_CA"}, "broker certificate from an untrusted CA"),
    ],
)
def test_a_client_without_the_right_credentials_is_refused(
    kafka_secure: KafkaCluster, tmp_path: Path, listener: str, spoil: dict[str, str], why: str
) -> None:
    assert kafka_secure.tls is not None
    spoil = {k: str(kafka_secure.tls.other_ca) if v == "OTHER_CA" else v for k, v in spoil.items()}
    bootstrap, security = _security(kafka_secure, listener, tmp_path, **spoil)
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        security=security,
        input_topic=unique("ingest"),
        output_topic=unique("out"),
        group_id=unique("g"),
        bootstrap_timeout_ms=3000,
    )
    worker = _worker(kafka, "")
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach Kafka"):
        worker.run(idle_timeout_s=1)
    assert time.monotonic() - t0 < 30, f"{why}: refused, but only after a long wait"


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "PLAIN"])
def test_other_sasl_mechanisms(kafka_secure: KafkaCluster, tmp_path: Path, mechanism: str) -> None:
    bootstrap, security = _security(kafka_secure, "sasl", tmp_path, sasl_mechanism=mechanism)
    kafka = KafkaSettings(bootstrap_servers=bootstrap, security=security)
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        assert isinstance(admin.list_topics(), list)
    finally:
        admin.close()


def test_cli_topics_over_sasl_ssl_with_topic_configs(
    kafka_secure: KafkaCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart's topics Job runs: security from env, max.message.bytes set."""
    bootstrap, security = _security(kafka_secure, "sasl", tmp_path)
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__PROTOCOL", security.protocol)
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__SASL_MECHANISM", security.sasl_mechanism)
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__SASL_USERNAME", security.sasl_username)
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__SASL_PASSWORD_FILE", security.sasl_password_file)
    monkeypatch.setenv("SLUICE_KAFKA_SECURITY__CA_FILE", security.ca_file)
    topics = [unique("a"), unique("a.dropped")]
    argv = ["topics", *topics, "--bootstrap", bootstrap, "--partitions", "2"]
    assert cli.main([*argv, "--topic-config", "max.message.bytes=2097152"]) == 0

    admin = KafkaAdminClient(bootstrap_servers=kafka_secure.bootstrap.split(","))
    try:
        res = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, ["max.message.bytes"]) for t in topics]
        )
        for t in topics:
            assert res["topic"][t]["max.message.bytes"]["value"] == "2097152"
    finally:
        admin.close()
