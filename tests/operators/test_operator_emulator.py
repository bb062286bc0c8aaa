"""The operator end to end: kopf (KopfRunner) against the Kubernetes API emulator (kmock),
offsets from a real Tansu broker.

One pipeline with two stages on their own topics, and one pipeline whose broker is down:
- the operator creates each stage's Deployment and Service (owner references, one selector);
- lag produced on the broker scales ``scoring`` from zero up to its partition count and
  ``density`` up to its maximum; Events and /metrics say so;
- consuming and committing to the end scales ``scoring`` back to zero (after idleSeconds)
  and ``density`` down to its minimum;
- a stage removed from the spec loses its Deployment and Service;
- the pipeline on a dead broker keeps its replicas and reports LagSourceAvailable=False.

Tansu's end offsets can be "start of the last batch + 1" instead of the true end (see
/work/shared/INFRA.md). The producer here flushes after every message, so every batch holds
one record and the reported end is the true end; the assertions need exact lag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from operators import GROUP, PLURAL, VERSION
from operators.handlers import OperatorApp, build_registry, kopf_settings
from operators.settings import LagClientSettings, OperatorSettings
from tests.operators import schema
from tests.operators.cluster import EmulatedCluster, Kubelet, api, wait_for
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

NS = "curation"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCluster]:
    with EmulatedCluster() as c:
        yield c


@pytest.fixture
def kubeconfig(cluster: EmulatedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = cluster.write_kubeconfig(tmp_path / "kubeconfig", NS)
    # kopf's login reads $KUBECONFIG when the operator starts.
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def _stage(name: str, kind: str, topic: str, **scaling: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "image": "registry.example/sluice:0.1.0-gpu",
        "topics": {"input": topic, "output": f"{topic}.out"},
        "group": f"{topic}-group",
        "gpus": 1,
        "scaling": {
            "warmupSeconds": 0,
            "scaleUpCooldownSeconds": 0,
            "scaleDownCooldownSeconds": 1,
            "idleSeconds": 2,
            **scaling,
        },
    }


def _pipeline(name: str, bootstrap: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SluicePipeline",
        # The emulator sets no uid/resourceVersion: a real API server would.
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": {"kafka": {"bootstrapServers": bootstrap}, "stages": stages},
    }
    schema.validate(body)  # the emulator validates nothing: the CRD schema is checked here
    return body


def _produce(bootstrap: str, topic: str, partitions: int, count: int) -> None:
    producer = KafkaProducer(bootstrap_servers=[bootstrap], linger_ms=0, acks="all")
    try:
        for i in range(count):
            producer.send(topic, value=b"batch", partition=i % partitions)
            # One record per batch: Tansu then reports the true end offset (see module doc).
            producer.flush()
    finally:
        producer.close()


def _consume_all(bootstrap: str, topic: str, partitions: int, group: str, count: int) -> None:
    """Consume the whole topic as ``group`` and commit: the group's lag becomes zero."""
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap],
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        # Manual assignment: no group join (which takes ~6 s on Tansu), commits still count.
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        seen = 0
        deadline = time.monotonic() + 20
        while seen < count and time.monotonic() < deadline:
            seen += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        assert seen == count
        consumer.commit()
    finally:
        consumer.close()


def _metric(port: int, name: str, **labels: str) -> float | None:
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def test_operator_scales_stages_on_lag(
    cluster: EmulatedCluster, kubeconfig: Path, kafka_bootstrap: str
) -> None:
    run = uuid.uuid4().hex[:6]
    t_scoring, t_density = f"op-{run}-scored", f"op-{run}-dense"
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    admin.create_topics([NewTopic(t_scoring, 4, 1), NewTopic(t_density, 2, 1)])
    admin.close()

    pipeline = _pipeline(
        "curate",
        kafka_bootstrap,
        [
            # lag 200 at 25 per replica wants 8: capped by the topic's 4 partitions.
            _stage("scoring", "scoring", t_scoring, maxReplicas=8, targetLagPerReplica=25),
            # lag 60 at 20 per replica wants 3: capped by maxReplicas 2; never below 1.
            _stage(
                "density",
                "density",
                t_density,
                minReplicas=1,
                maxReplicas=2,
                targetLagPerReplica=20,
            ),
        ],
    )
    dead_broker = f"127.0.0.1:{free_port()}"
    offline = _pipeline(
        "offline", dead_broker, [_stage("scoring", "scoring", "nowhere", minReplicas=1)]
    )

    metrics_port = free_port()
    settings = OperatorSettings(
        reconcile_interval_seconds=0.5,
        rate_window_seconds=5,
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
        liveness_port=0,
        kubeconfig=str(kubeconfig),
        kafka=LagClientSettings(
            request_timeout_ms=2000,
            bootstrap_timeout_ms=1000,
            retry_base_seconds=1,
            retry_max_seconds=2,
        ),
    )
    app = OperatorApp.from_settings(settings)
    k8s = api(kubeconfig)
    apps, core, custom = client.AppsV1Api(k8s), client.CoreV1Api(k8s), client.CustomObjectsApi(k8s)

    def deployment(name: str) -> dict[str, Any] | None:
        found = [d for d in apps.list_namespaced_deployment(NS).items if d.metadata.name == name]
        return k8s.sanitize_for_serialization(found[0]) if found else None

    def replicas(name: str) -> int | None:
        d = deployment(name)
        return None if d is None else d["spec"].get("replicas")

    def stage_status(pipeline: str, stage: str) -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, pipeline)
        stages = (obj.get("status") or {}).get("stages", [])
        return next((s for s in stages if s["name"] == stage), {})

    def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
        return next((c for c in status.get("conditions", []) if c["type"] == type_), {})

    with (
        Kubelet(k8s, NS),
        KopfRunner(
            ["run", "--standalone", "-n", NS],
            registry=build_registry(app),
            settings=kopf_settings(settings),
            timeout=30,
        ) as runner,
    ):
        for body in (pipeline, offline):
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        # -- the owned objects exist, wired to each other and to the pipeline -------------
        dep = wait_for(lambda: deployment("curate-scoring"), "Deployment curate-scoring")
        uid = pipeline["metadata"]["uid"]
        assert dep["metadata"]["ownerReferences"][0]["uid"] == uid
        assert dep["metadata"]["ownerReferences"][0]["controller"] is True
        pod = dep["spec"]["template"]
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["python", "-m", "services.scoring"]
        assert container["args"] == ["all"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS"] == kafka_bootstrap
        assert env["SLUICE_SCORING_KAFKA__INPUT_TOPIC"] == t_scoring
        assert env["SLUICE_SCORING_KAFKA__GROUP_ID"] == f"{t_scoring}-group"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["grpc"] == {"port": 50051}
        svc = wait_for(
            lambda: next(
                (
                    s
                    for s in core.list_namespaced_service(NS).items
                    if s.metadata.name == "curate-scoring"
                ),
                None,
            ),
            "Service curate-scoring",
        )
        assert svc.spec.selector == selector
        assert {p.name: p.port for p in svc.spec.ports} == {"grpc": 50051, "metrics": 9100}
        assert svc.metadata.owner_references[0].uid == uid
        wait_for(lambda: deployment("curate-density"), "Deployment curate-density")

        # No lag yet: each stage sits at its minimum.
        wait_for(lambda: stage_status("curate", "scoring").get("observedLag") == 0, "lag read")
        assert replicas("curate-scoring") == 0
        wait_for(lambda: replicas("curate-density") == 1, "density at its minimum")

        # -- lag appears: scale up, bounded by partitions and by maxReplicas ---------------
        _produce(kafka_bootstrap, t_scoring, 4, 200)
        _produce(kafka_bootstrap, t_density, 2, 60)
        wait_for(lambda: replicas("curate-scoring") == 4, "scoring scaled to 4 partitions")
        wait_for(lambda: replicas("curate-density") == 2, "density scaled to its max of 2")
        # Status is written after each pass: wait for the pass that saw all the lag.
        scoring = wait_for(
            lambda: (s := stage_status("curate", "scoring")).get("observedLag") == 200 and s,
            "status with the whole lag",
        )
        assert scoring["partitions"] == 4
        assert scoring["desiredReplicas"] == 4
        # Lag 200 at 25 per replica asks for 8; the partitions cap it.
        assert "bounded to [0, 4] (max 8, 4 partitions)" in scoring["lastDecision"]
        assert condition(scoring, "LagSourceAvailable")["status"] == "True"
        assert (
            _metric(metrics_port, "sluice_operator_lag", pipeline="curate", stage="scoring") == 200
        )
        assert (
            _metric(
                metrics_port, "sluice_operator_desired_replicas", pipeline="curate", stage="scoring"
            )
            == 4
        )
        # The offline pipeline kept its replicas and says why.
        offline_stage = wait_for(
            lambda: (
                (s := stage_status("offline", "scoring"))
                and condition(s, "LagSourceAvailable").get("status") == "False"
                and s
            ),
            "offline pipeline's lag source reported down",
        )
        assert dead_broker in condition(offline_stage, "LagSourceAvailable")["message"]
        assert offline_stage["lagSource"]["failures"] >= 1
        assert replicas("offline-scoring") == 1
        assert _metric(metrics_port, "sluice_operator_lag_source_up", pipeline="offline") == 0
        failed_reads = _metric(
            metrics_port,
            "sluice_operator_reconcile_errors_total",
            pipeline="offline",
            kind="lag_source",
        )
        assert failed_reads is not None and failed_reads >= 1

        # -- lag consumed: back to zero (scoring) and to the minimum (density) ------------
        _consume_all(kafka_bootstrap, t_scoring, 4, f"{t_scoring}-group", 200)
        _consume_all(kafka_bootstrap, t_density, 2, f"{t_density}-group", 60)
        wait_for(lambda: replicas("curate-density") == 1, "density back to its minimum")
        wait_for(lambda: replicas("curate-scoring") == 0, "scoring scaled to zero", timeout=30)
        scoring = wait_for(
            lambda: (s := stage_status("curate", "scoring")).get("desiredReplicas") == 0 and s,
            "status after scaling to zero",
        )
        assert scoring["observedLag"] == 0
        assert scoring["lastScaleTime"]
        assert scoring["idleSince"]
        assert condition(scoring, "Ready")["reason"] == "ScaledToZero"

        events = sorted(
            (e for e in core.list_namespaced_event(NS).items if e.involved_object.name == "curate"),
            key=lambda e: e.event_time,
        )
        reasons = {e.reason for e in events}
        assert {"Created", "ScaledUp", "ScaledDown"} <= reasons
        # A pass may land mid-production: the way up can take more than one step.
        ups = [
            e.message
            for e in events
            if e.reason == "ScaledUp" and e.message.startswith("scoring: ")
        ]
        assert ups[0].startswith("scoring: 0 -> ") and "lag appeared" in ups[0]
        assert any("-> 4 replicas" in m and "per replica" in m for m in ups)
        offline_events = [
            e for e in core.list_namespaced_event(NS).items if e.involved_object.name == "offline"
        ]
        assert any(
            e.reason == "LagSourceUnavailable" and e.type == "Warning" for e in offline_events
        )
        assert replicas("offline-scoring") == 1

        # Dozens of passes so far, and never a patch of a stage's Deployment or Service
        # body: nothing in them differed from the desired objects (scale and status aside).
        def object_patches(name: str) -> list[str]:
            return [
                path
                for method, path in cluster.requests()
                if method == "PATCH" and path.rsplit("/", 1)[-1] == name
            ]

        assert object_patches("curate-scoring") == []

        # -- a spec change is applied; a stage leaves the spec and its objects go -----------
        scoring_stage = {**pipeline["spec"]["stages"][0], "image": "registry.example/sluice:0.2.0"}
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "curate", {"spec": {"stages": [scoring_stage]}}
        )
        wait_for(lambda: deployment("curate-density") is None, "density Deployment deleted")
        wait_for(
            lambda: (
                not [
                    s
                    for s in core.list_namespaced_service(NS).items
                    if s.metadata.name == "curate-density"
                ]
            ),
            "density Service deleted",
        )
        image = wait_for(
            lambda: (
                (d := deployment("curate-scoring"))
                and d["spec"]["template"]["spec"]["containers"][0]["image"].endswith("0.2.0")
            ),
            "the new image applied",
        )
        assert image
        time.sleep(1)  # more passes: the change was applied once, then nothing differs
        assert len(object_patches("curate-scoring")) == 1
        assert replicas("curate-scoring") == 0  # the image change left the scaler's count alone
    assert runner.exception is None


def test_operator_process_refuses_bad_specs_and_foreign_objects(kubeconfig: Path) -> None:
    """``python -m operators`` as the container runs it: it reports an invalid spec and a
    name clash with an object it does not own (and leaves that object alone), serves
    /healthz and /metrics, and stops cleanly on SIGTERM."""
    k8s = api(kubeconfig)
    apps, core, custom = client.AppsV1Api(k8s), client.CoreV1Api(k8s), client.CustomObjectsApi(k8s)
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "taken-scoring", "namespace": NS, "labels": {"app": "mine"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "mine"}},
            "template": {
                "metadata": {"labels": {"app": "mine"}},
                "spec": {"containers": [{"name": "c", "image": "someone/else:1"}]},
            },
        },
    }
    apps.create_namespaced_deployment(NS, foreign)
    dead = f"127.0.0.1:{free_port()}"
    taken = _pipeline("taken", dead, [_stage("scoring", "scoring", "t", minReplicas=1)])
    # Passes the schema as jsonschema sees it; a real API server rejects it by the CRD's CEL
    # rule (minReplicas <= maxReplicas), the operator by its typed spec.
    broken = _pipeline(
        "broken", dead, [_stage("scoring", "scoring", "t", minReplicas=3, maxReplicas=2)]
    )

    metrics_port, liveness_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "SLUICE_OPERATOR_RECONCILE_INTERVAL_SECONDS": "0.5",
        "SLUICE_OPERATOR_METRICS_HOST": "127.0.0.1",
        "SLUICE_OPERATOR_METRICS_PORT": str(metrics_port),
        "SLUICE_OPERATOR_LIVENESS_PORT": str(liveness_port),
        "SLUICE_OPERATOR_KAFKA__BOOTSTRAP_TIMEOUT_MS": "500",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "operators", "--namespace", NS],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for body in (taken, broken):
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

        def ready(name: str) -> dict[str, Any]:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
            conditions = (obj.get("status") or {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Ready"), {})

        invalid = wait_for(
            lambda: ready("broken").get("reason") == "InvalidSpec" and ready("broken"),
            "InvalidSpec",
        )
        assert "minReplicas (3) > maxReplicas (2)" in invalid["message"]
        assert invalid["status"] == "False"

        def taken_stage() -> dict[str, Any]:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "taken")
            return next(iter((obj.get("status") or {}).get("stages", [])), {})

        clash = wait_for(
            lambda: next(
                (
                    c
                    for c in taken_stage().get("conditions", [])
                    if c.get("reason") == "ObjectNotOwned"
                ),
                None,
            ),
            "ObjectNotOwned",
        )
        assert "taken-scoring exists and is not owned" in clash["message"]
        time.sleep(1.5)  # a few more passes: the foreign object stays untouched, no event spam
        live = apps.read_namespaced_deployment("taken-scoring", NS)
        assert live.metadata.owner_references is None
        assert live.spec.template.spec.containers[0].image == "someone/else:1"
        assert live.spec.replicas == 2
        # Nothing else was made for the clashing stage either.
        services = {s.metadata.name for s in core.list_namespaced_service(NS).items}
        assert "taken-scoring" not in services
        events = core.list_namespaced_event(NS).items
        assert (
            sum(e.reason == "InvalidSpec" and e.involved_object.name == "broken" for e in events)
            == 1
        )
        assert (
            sum(e.reason == "ObjectNotOwned" and e.involved_object.name == "taken" for e in events)
            == 1
        )

        assert urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5).status == 200
        errors = _metric(
            metrics_port, "sluice_operator_reconcile_errors_total", pipeline="broken", kind="spec"
        )
        assert errors is not None and errors >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
