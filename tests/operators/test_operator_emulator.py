"""The operator end to end: the chart's rendered manifests applied to the Kubernetes API
emulator (kmock), the operator (kopf's KopfRunner, and ``python -m operators`` as a process)
scaling them on offsets from a real broker.

- the chart renders every stage Deployment and, for the autoscaled ones, a SluiceScaler
  pointing at it; the operator names each scaler's consumer group through the stage registry
  (for two-pass density: ``<group>.sample.<sketch>.v<N>``, the group pass 2 commits);
- lag produced on the broker scales the chart's ``scoring`` Deployment from zero up to its
  partition count and ``density`` up to its maximum; Events and /metrics say so;
- committing density's offsets under its configured ``group`` (the group it does NOT commit
  in two-pass mode) changes nothing; committing them under the sample group scales it down;
  consuming scoring's scales it to zero after idleSeconds;
- the operator only ever PATCHes ``deployments/<name>/scale``: no create, patch or delete of
  any Deployment, Service or other object the chart rendered;
- a scaler whose broker is down keeps its target's replicas and reports
  LagSourceAvailable=False; one whose target is missing waits (TargetNotFound);
- operators/examples/values.yaml's two-pass density starts: the chart's build Job commands
  (pass 1, merge) then its Deployment's (pass 2) run as the pods would, against the broker
  and an S3 server, while the operator scales the Deployment on the sample group's lag.

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
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from operators import GROUP, PLURAL, VERSION
from operators.handlers import OperatorApp, build_registry, kopf_settings
from operators.settings import LagClientSettings, OperatorSettings
from tests.deploy.chart import NAMESPACE, needs_helm, render_docs
from tests.operators.cluster import EmulatedCluster, Kubelet, api, apply, wait_for
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, needs_helm]

NS = NAMESPACE  # the namespace the chart is rendered for
ROOT = Path(__file__).resolve().parents[2]

# Fast policy for tests: no warm-up, short cooldowns and idle time.
FAST = {
    "warmupSeconds": 0,
    "scaleUpCooldownSeconds": 0,
    "scaleDownCooldownSeconds": 1,
    "idleSeconds": 2,
}


@pytest.fixture
def cluster() -> Iterator[EmulatedCluster]:
    with EmulatedCluster() as c:
        yield c


@pytest.fixture
def kubeconfig(cluster: EmulatedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = cluster.write_kubeconfig(tmp_path / "kubeconfig", NS)
    # kopf's login reads $KUBECONFIG when the operator starts.
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def render_chart(tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    """``helm template`` with ``values`` (a file: --set would turn numbers into strings)."""
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return render_docs(values_files=(path,))


def stage_values(topic: str, group: str, **autoscaling: Any) -> dict[str, Any]:
    scaling = {"enabled": True, **FAST, **autoscaling} if autoscaling else {"enabled": False}
    return {
        "enabled": True,
        "topics": {"input": topic, "output": f"{topic}.out", "dlq": ""},
        "group": group,
        "autoscaling": scaling,
    }


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


def _settings(kubeconfig: Path, metrics_port: int) -> OperatorSettings:
    return OperatorSettings(
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


class Cluster:
    """Reads of the emulated cluster, as the tests need them."""

    def __init__(self, kubeconfig: Path) -> None:
        self.k8s = api(kubeconfig)
        self.apps = client.AppsV1Api(self.k8s)
        self.core = client.CoreV1Api(self.k8s)
        self.custom = client.CustomObjectsApi(self.k8s)

    def replicas(self, name: str) -> int | None:
        found = [
            d for d in self.apps.list_namespaced_deployment(NS).items if d.metadata.name == name
        ]
        return found[0].spec.replicas if found else None

    def status(self, scaler: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, scaler)
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def condition(self, scaler: str, type_: str) -> dict[str, Any]:
        conditions = self.status(scaler).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    def events(self, scaler: str) -> list[client.CoreV1Event]:
        events = [
            e for e in self.core.list_namespaced_event(NS).items if e.involved_object.name == scaler
        ]
        return sorted(events, key=lambda e: e.event_time)


def test_operator_scales_the_charts_deployments_on_lag(
    cluster: EmulatedCluster, kubeconfig: Path, kafka_bootstrap: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:6]
    t_scoring, t_density = f"op-{run}-ingest", f"op-{run}-scored"
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    admin.create_topics([NewTopic(t_scoring, 4, 1), NewTopic(t_density, 2, 1)])
    admin.close()
    density_group = f"op-{run}-density"
    sample_group = f"{density_group}.sample.corpus.v1"

    values = {
        "kafka": {"bootstrapServers": kafka_bootstrap},
        # Density's pass 2 needs a store; the operator never talks to it.
        "s3": {"endpoint": "minio.storage:9000", "secure": False},
        "topics": {"create": False},
        "operator": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "stages": {
            # lag 200 at 25 per replica wants 8: capped by the topic's 4 partitions.
            "scoring": stage_values(
                t_scoring, f"op-{run}-scoring", maxReplicas=8, targetLagPerReplica=25
            ),
            # Two passes: the chart renders the sketch build Job for v1 and this Deployment
            # runs pass 2, which commits the sample group. lag 60 at 20 per replica wants 3:
            # capped by maxReplicas 2; never below 1.
            "density": {
                **stage_values(
                    t_density, density_group, minReplicas=1, maxReplicas=2, targetLagPerReplica=20
                ),
                "mode": "worker",
                "config": {"mode": "two_pass_sample", "sketch": {"name": "corpus", "version": 1}},
            },
            # Not autoscaled: the chart's replicas, untouched by the operator.
            "rewrite": {**stage_values(t_density, f"op-{run}-rewrite"), "replicas": 3},
        },
    }
    rendered = render_chart(tmp_path, values)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert {
        ("SluiceScaler", "sluice-scoring"),
        ("SluiceScaler", "sluice-density"),
        ("Job", "sluice-density-build-v1"),
        ("Deployment", "sluice-rewrite"),
    } <= kinds
    assert ("SluiceScaler", "sluice-rewrite") not in kinds

    # Two scalers the chart would not render: a dead broker, a missing target.
    (scoring_scaler,) = [
        d
        for d in rendered
        if d["kind"] == "SluiceScaler" and d["metadata"]["name"] == "sluice-scoring"
    ]
    dead_broker = f"127.0.0.1:{free_port()}"
    offline = yaml.safe_load(yaml.safe_dump(scoring_scaler))
    offline["metadata"]["name"] = "offline"
    offline["spec"]["scaleTargetRef"]["name"] = "sluice-rewrite"
    offline["spec"]["stage"]["config"]["kafka"]["bootstrap_servers"] = dead_broker
    orphan = yaml.safe_load(yaml.safe_dump(scoring_scaler))
    orphan["metadata"]["name"] = "orphan"
    orphan["spec"]["scaleTargetRef"]["name"] = "no-such-deployment"

    k = Cluster(kubeconfig)
    apply(k.k8s, [*rendered, offline, orphan])
    # Every stage Deployment exists before the operator runs, made by the chart.
    assert {k.replicas(f"sluice-{s}") for s in ("scoring", "density")} == {1}
    assert k.replicas("sluice-rewrite") == 3
    served_before = len(cluster.requests())

    metrics_port = free_port()
    settings = _settings(kubeconfig, metrics_port)
    app = OperatorApp.from_settings(settings)
    with (
        Kubelet(k.k8s, NS),
        KopfRunner(
            ["run", "--standalone", "-n", NS],
            registry=build_registry(app),
            settings=kopf_settings(settings),
            timeout=30,
        ) as runner,
    ):
        # -- each scaler reads the group its stage really commits --------------------------
        wait_for(lambda: k.status("sluice-density").get("observedLag") == 0, "density lag read")
        assert k.status("sluice-density")["consumerGroup"] == sample_group
        assert k.status("sluice-density")["topic"] == t_density
        assert k.status("sluice-scoring")["consumerGroup"] == f"op-{run}-scoring"
        # No lag: scoring goes to zero once idle, density holds its minimum.
        wait_for(lambda: k.replicas("sluice-scoring") == 0, "scoring idle to zero", timeout=30)
        assert k.replicas("sluice-density") == 1

        # -- lag appears: scale up, bounded by partitions and by maxReplicas ---------------
        _produce(kafka_bootstrap, t_scoring, 4, 200)
        _produce(kafka_bootstrap, t_density, 2, 60)
        wait_for(lambda: k.replicas("sluice-scoring") == 4, "scoring scaled to 4 partitions")
        wait_for(lambda: k.replicas("sluice-density") == 2, "density scaled to its max of 2")
        scoring = wait_for(
            lambda: (s := k.status("sluice-scoring")).get("observedLag") == 200 and s,
            "status with the whole lag",
        )
        assert scoring["partitions"] == 4 and scoring["desiredReplicas"] == 4
        assert "bounded to [0, 4] (max 8, 4 partitions)" in scoring["lastDecision"]
        assert k.condition("sluice-scoring", "LagSourceAvailable")["status"] == "True"
        assert _metric(metrics_port, "sluice_operator_lag", scaler="sluice-scoring") == 200
        assert (
            _metric(metrics_port, "sluice_operator_desired_replicas", scaler="sluice-scoring") == 4
        )

        # -- density: its configured group is not the group pass 2 commits ----------------
        _consume_all(kafka_bootstrap, t_density, 2, density_group, 60)
        time.sleep(2.5)  # a few passes, past the scale-down cooldown
        assert k.status("sluice-density")["observedLag"] == 60
        assert k.replicas("sluice-density") == 2
        _consume_all(kafka_bootstrap, t_density, 2, sample_group, 60)
        wait_for(lambda: k.replicas("sluice-density") == 1, "density back to its minimum")

        # -- scoring consumed: back to zero after idleSeconds -------------------------------
        _consume_all(kafka_bootstrap, t_scoring, 4, f"op-{run}-scoring", 200)
        wait_for(lambda: k.replicas("sluice-scoring") == 0, "scoring scaled to zero", timeout=30)
        scoring = wait_for(
            lambda: (s := k.status("sluice-scoring")).get("desiredReplicas") == 0 and s,
            "status after scaling to zero",
        )
        assert scoring["observedLag"] == 0 and scoring["lastScaleTime"] and scoring["idleSince"]
        assert k.condition("sluice-scoring", "Ready")["reason"] == "ScaledToZero"

        ups = [e.message for e in k.events("sluice-scoring") if e.reason == "ScaledUp"]
        assert any("-> 4 replicas" in m and "per replica" in m for m in ups)
        assert {"ScaledUp", "ScaledDown"} <= {e.reason for e in k.events("sluice-density")}

        # -- a dead broker keeps the replicas; a missing target is waited for ---------------
        offline_lag = wait_for(
            lambda: (
                (c := k.condition("offline", "LagSourceAvailable")).get("status") == "False" and c
            ),
            "offline scaler's lag source reported down",
        )
        assert dead_broker in offline_lag["message"]
        assert k.status("offline")["lagSource"]["failures"] >= 1
        assert _metric(metrics_port, "sluice_operator_lag_source_up", scaler="offline") == 0
        assert any(
            e.reason == "LagSourceUnavailable" and e.type == "Warning" for e in k.events("offline")
        )
        assert k.replicas("sluice-rewrite") == 3
        orphan_ready = wait_for(
            lambda: (c := k.condition("orphan", "Ready")).get("reason") == "TargetNotFound" and c,
            "TargetNotFound",
        )
        assert "no-such-deployment" in orphan_ready["message"]
        assert sum(e.reason == "TargetNotFound" for e in k.events("orphan")) == 1

        # -- the operator only ever set replicas through the scale subresource -------------
        writes = [
            (method, path)
            for method, path in cluster.requests()[served_before:]
            if method in ("POST", "PUT", "PATCH", "DELETE")
            and f"/namespaces/{NS}/{PLURAL}/" not in path  # its own scalers' status
            and not path.endswith("/events")
            # The Kubelet stand-in reports pods ready there.
            and not (path.endswith("/status") and "/deployments/" in path)
        ]
        assert writes, "no scale call seen"
        assert {m for m, _ in writes} == {"PATCH"}
        assert {p.rsplit("/", 1)[-1] for _, p in writes} == {"scale"}
    assert runner.exception is None


def test_operator_process_reports_specs_it_cannot_act_on(kubeconfig: Path, tmp_path: Path) -> None:
    """``python -m operators`` as the container runs it: an invalid policy and a two-pass
    density stage without a pinned sketch version (whose group only the store could name)
    are reported as InvalidSpec, once each, with the target untouched; it serves /healthz
    and /metrics and stops cleanly on SIGTERM."""
    k = Cluster(kubeconfig)
    values = {
        "kafka": {"bootstrapServers": f"127.0.0.1:{free_port()}"},
        "s3": {"endpoint": "minio:9000"},
        "topics": {"create": False},
        "stages": {
            "density": {
                "enabled": True,
                "autoscaling": {"enabled": True},
                "config": {"sketch": {"version": 1}},
            }
        },
    }
    rendered = render_chart(tmp_path, values)
    (density,) = [d for d in rendered if d["kind"] == "SluiceScaler"]
    broken = yaml.safe_load(yaml.safe_dump(density))
    broken["metadata"]["name"] = "broken"
    # Passes the schema as jsonschema sees it; a real API server rejects it by the CRD's CEL
    # rule (minReplicas <= maxReplicas), the operator by its typed spec.
    broken["spec"]["scaling"].update(minReplicas=3, maxReplicas=2)
    unpinned = yaml.safe_load(yaml.safe_dump(density))
    unpinned["metadata"]["name"] = "unpinned"
    del unpinned["spec"]["stage"]["config"]["sketch"]["version"]
    apply(k.k8s, [*rendered, broken, unpinned])

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

        def invalid(name: str) -> dict[str, Any]:
            c = k.condition(name, "Ready")
            return c if c.get("reason") == "InvalidSpec" else {}

        assert (
            "minReplicas (3) > maxReplicas (2)"
            in wait_for(lambda: invalid("broken"), "InvalidSpec")["message"]
        )
        assert "sketch.version" in wait_for(lambda: invalid("unpinned"), "InvalidSpec")["message"]
        time.sleep(1.5)  # a few more passes: no event spam, nothing scaled
        for name in ("broken", "unpinned"):
            assert sum(e.reason == "InvalidSpec" for e in k.events(name)) == 1
        assert k.replicas("sluice-density") == 1

        assert urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5).status == 200
        errors = _metric(
            metrics_port, "sluice_operator_reconcile_errors_total", scaler="broken", kind="spec"
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


TEXTS = [
    "The river flooded the valley after a week of heavy rain.",
    "Parliament passed the budget late on Thursday night.",
    "A new species of frog was found in the rainforest.",
    "The orchestra performed Beethoven's ninth symphony to a full hall.",
    "Engineers tested the bridge with forty loaded trucks.",
    "The chess champion resigned after a surprising queen sacrifice.",
]


def _pod_process(
    container: dict[str, Any], configs: Path, stage_env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """The container as a local process: ``python -m services.<stage> <its args>``, its
    /etc/sluice files from ``configs``, its literal env (HOME and the cache stay local)."""
    args = [a.replace("/etc/sluice", str(configs)) for a in container["args"]]
    env = {**os.environ, **stage_env}
    for e in container["env"]:
        if "value" in e and e["name"] not in ("HOME", "XDG_CACHE_HOME"):
            env[e["name"]] = e["value"]
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{env['SLUICE_SERVICE']}", *args],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def test_example_two_pass_density_starts_and_is_scaled_on_its_sample_group(
    cluster: EmulatedCluster,
    kubeconfig: Path,
    kafka_bootstrap: str,
    s3_server: Any,
    tmp_path: Path,
) -> None:
    """operators/examples/values.yaml (density only, on this broker and S3 server), applied
    to the emulator, with the chart's own commands run as the pods would run them: the build
    Job's pass 1 then merge, then the Deployment's pass 2. The operator scales the density
    Deployment on the lag of the group pass 2 really commits: up while the sketch is being
    built (nothing sampled yet), down once pass 2 has drained the topic."""
    from services.runtime.domain import Sample
    from services.runtime.kafka_stage import ensure_topics, publish

    run = uuid.uuid4().hex[:6]
    t_in, t_out, group = f"dp-{run}-scored", f"dp-{run}-sampled", f"dp-{run}-density"
    ensure_topics(kafka_bootstrap, [t_in, t_out, f"{t_in}.dlq"], partitions=2)
    samples = [Sample(id=f"s{i}", text=f"{TEXTS[i % len(TEXTS)]} (note {i})") for i in range(240)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    # One message per produce request, each acknowledged before the next: one record per
    # batch, so a broker reporting "last batch start + 1" as the end is exact too.
    messages = sum(
        publish(producer, t_in, samples[i : i + 20], batch_size=20, batch_prefix=f"m{i}-")
        for i in range(0, len(samples), 20)
    )
    producer.close()

    values = yaml.safe_load((ROOT / "operators" / "examples" / "values.yaml").read_text())
    density = values["stages"]["density"]
    density["topics"] = {"input": t_in, "output": t_out, "dlq": ""}
    density["group"] = group
    # Pass 1 stops after this long without input, counted from its start, so above the
    # group join (about 6 s on Tansu); the default 60 s suits a real drain.
    density["config"]["build_idle_timeout_s"] = 20
    density["config"]["store"] = {"create_bucket": True}
    density["autoscaling"].update(FAST, targetLagPerReplica=2)
    values["stages"]["scoring"]["enabled"] = False
    values["kafka"]["bootstrapServers"] = kafka_bootstrap
    values["s3"] = {
        "endpoint": s3_server.address,
        "secure": False,
        "bucket": f"sketches-{run}",
        "existingSecret": "",
    }
    values["topics"] = {"create": False}
    rendered = render_chart(tmp_path, values)
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    configs = tmp_path / "etc-sluice"
    configs.mkdir()
    for name, text in by_key[("ConfigMap", "sluice-density")]["data"].items():
        (configs / name).write_text(text)
    job_pod = by_key[("Job", "sluice-density-build-v1")]["spec"]["template"]["spec"]
    (build,), (merge,) = job_pod["initContainers"], job_pod["containers"]
    (sample,) = by_key[("Deployment", "sluice-density")]["spec"]["template"]["spec"]["containers"]
    s3_env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}

    k = Cluster(kubeconfig)
    apply(k.k8s, rendered)
    sample_group = f"{group}.sample.corpus.v1"
    settings = _settings(kubeconfig, free_port())
    app = OperatorApp.from_settings(settings)
    procs: list[subprocess.Popen[bytes]] = []
    with (
        Kubelet(k.k8s, NS),
        KopfRunner(
            ["run", "--standalone", "-n", NS],
            registry=build_registry(app),
            settings=kopf_settings(settings),
            timeout=30,
        ) as runner,
    ):
        try:
            # Nothing sampled yet: the whole topic is the sample group's lag.
            status = wait_for(
                lambda: (s := k.status("sluice-density")).get("observedLag") == messages and s,
                "the sample group's lag",
                timeout=30,
            )
            assert status["consumerGroup"] == sample_group
            wait_for(lambda: k.replicas("sluice-density") == 2, "density up to 2 partitions")

            # The build Job: pass 1, then the merge (an init container, then the container).
            for name, container in (("build", build), ("merge", merge)):
                log = tmp_path / f"{name}.log"
                proc = _pod_process(container, configs, s3_env, log)
                procs.append(proc)
                assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
            merged = (tmp_path / "merge.log").read_text()
            assert f"merged 2 partitions of corpus v1: n={len(samples)}" in merged, merged[-3000:]

            # The Deployment's pod: pass 2 against the merged sketch.
            log = tmp_path / "sample.log"
            procs.append(_pod_process(sample, configs, s3_env, log))
            wait_for(
                lambda: k.status("sluice-density").get("observedLag") == 0,
                "pass 2 drained its group",
                timeout=120,
            )
            wait_for(lambda: k.replicas("sluice-density") == 1, "density back to its minimum")
            assert procs[-1].poll() is None, log.read_text()[-3000:]  # pass 2 keeps running
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()

    # The groups the chart's commands committed are the ones the registry names.
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    try:
        tps = [TopicPartition(t_in, p) for p in range(2)]
        committed = admin.list_group_offsets({sample_group: tps})[sample_group]
        assert sum(committed[tp].offset for tp in tps) == messages
        # Pass 1 committed under its own group (the merge's n above proves it read it all).
        build_group = f"{group}.build.corpus.v1"
        assert any(
            o.offset > 0 for o in admin.list_group_offsets({build_group: tps})[build_group].values()
        )
        # ... and nothing ever committed the configured group itself.
        unused = admin.list_group_offsets({group: tps}).get(group, {})
        assert all(o.offset < 0 for o in unused.values())
    finally:
        admin.close()
    kept = KafkaConsumer(
        t_out, bootstrap_servers=[kafka_bootstrap], auto_offset_reset="earliest", group_id=None
    )
    try:
        assert sum(len(r) for r in kept.poll(timeout_ms=5000).values()) > 0
    finally:
        kept.close()
    assert runner.exception is None
