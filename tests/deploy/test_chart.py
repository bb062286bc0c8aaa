"""The chart as a platform team installs it, rendered by helm with the defaults and with the
full GPU values file (charts/sluice/ci/gpu-values.yaml: every stage, GPUs, operator and
SluiceScalers, density's sketch build Job, topics Job, ServiceMonitor, PrometheusRule, PDBs,
NetworkPolicies, dashboard): every object validates strictly against the Kubernetes schemas
(SluiceScalers against their CRD), every pod meets Restricted Pod Security,
secrets travel by reference only, selectors are stable, and what each object points at (ports,
pods, Services, topics, settings) exists."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.registry import stage as stage_spec
from tests.deploy.chart import (
    CHART,
    GPU_VALUES,
    NAMESPACE,
    RELEASE,
    STAGES,
    Key,
    needs_helm,
    pod_specs,
    render,
    tool,
)

pytestmark = needs_helm

# Custom resources have no upstream schema: the PrometheusRule is checked by promtool
# (test_alerts.py), the ServiceMonitor's fields below, SluiceScalers against the chart's CRD.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("sluice.dev/v1alpha1", "SluiceScaler"),
}

# Each stage's settings class and where its settings keep the object store (if they do),
# as the registry declares them: the chart's values must validate against exactly these.
SETTINGS = {kind: stage_spec(kind).settings for kind in STAGES}
S3_BLOCK = {
    k: tuple(stage_spec(k).object_store.split(".")) for k in STAGES if stage_spec(k).object_store
}


@pytest.fixture(scope="module")
def default_objs() -> dict[Key, dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def gpu_objs() -> dict[Key, dict[str, Any]]:
    return render(values_files=(GPU_VALUES,))


@pytest.fixture(scope="module")
def gpu_values() -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())


def _by_kind(objs: dict[Key, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: o for (k, name), o in objs.items() if k == kind}


def _component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


# -- schema validity of every rendered object ----------------------------------------------


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_every_object_validates_strictly(
    which: str, default_objs: dict[Key, dict[str, Any]], gpu_objs: dict[Key, dict[str, Any]]
) -> None:
    import kubernetes_validate

    from tests.operators import schema

    objs = default_objs if which == "default" else gpu_objs
    skipped = set()
    for obj in objs.values():
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            skipped.add(obj["kind"])
            if obj["kind"] == "SluiceScaler":
                schema.validate(obj)
            continue
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    custom = {"ServiceMonitor", "PrometheusRule", "SluiceScaler"}
    assert skipped == (set() if which == "default" else custom)


def test_gpu_values_render_every_component(gpu_objs: dict[Key, dict[str, Any]]) -> None:
    kinds = {k for k, _ in gpu_objs}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "Job",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "SluiceScaler",
    }
    assert {_component(d) for d in _by_kind(gpu_objs, "Deployment").values()} == {
        *STAGES,
        "operator",
    }
    assert set(_by_kind(gpu_objs, "Job")) == {"sluice-topics", "sluice-density-build-v1"}
    assert "Secret" not in kinds  # credentials are never rendered


def test_helm_lint_strict_with_gpu_values() -> None:
    out = subprocess.run(
        [str(tool("helm")), "lint", "--strict", str(CHART), "--values", str(GPU_VALUES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- Restricted Pod Security, probes, resources ----------------------------------------------


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_every_pod_is_restricted(
    which: str, default_objs: dict[Key, dict[str, Any]], gpu_objs: dict[Key, dict[str, Any]]
) -> None:
    pods = pod_specs(default_objs if which == "default" else gpu_objs)
    assert pods
    for key, pod in pods.items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, key
        assert psc["runAsUser"] != 0 and psc["runAsGroup"] != 0, key
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, key
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), (key, host)
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], key
        # Only the operator talks to the Kubernetes API.
        assert pod["automountServiceAccountToken"] is (key == ("Deployment", "sluice-operator"))
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, key
            assert sc["readOnlyRootFilesystem"] is True, key
            assert sc["capabilities"] == {"drop": ["ALL"]}, key
            assert not sc.get("privileged"), key
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), key
            # Everything written goes to a mounted volume.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, key


def test_stage_pods_are_probed_and_resourced(gpu_objs: dict[Key, dict[str, Any]]) -> None:
    for name, deploy in _by_kind(gpu_objs, "Deployment").items():
        (c,) = deploy["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            p = c[probe]
            if "grpc" in p:  # native gRPC health on the serving port
                assert p["grpc"]["port"] == ports["grpc"], (name, probe)
            else:  # worker-only stages and the operator: HTTP on a named port
                assert p["httpGet"]["port"] in ports, (name, probe)
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), name
        assert "memory" in res["limits"], name
    for job in _by_kind(gpu_objs, "Job").values():
        pod = job["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and c["resources"]["limits"]


def test_gpu_resources_and_scheduling(
    gpu_objs: dict[Key, dict[str, Any]], gpu_values: dict[str, Any]
) -> None:
    deploys = _by_kind(gpu_objs, "Deployment")
    for stage, spec in gpu_values["stages"].items():
        pod = deploys[f"{RELEASE}-{stage}"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        resource = spec.get("gpuResource", "nvidia.com/gpu")
        if not spec.get("gpus"):  # a CPU stage in the GPU deployment (dedup)
            assert resource not in c["resources"]["limits"], stage
            continue
        assert c["resources"]["limits"][resource] == spec["gpus"], stage
        assert pod["nodeSelector"] == spec["nodeSelector"], stage
        assert pod["tolerations"] == spec["tolerations"], stage
        assert pod["runtimeClassName"] == spec["runtimeClassName"], stage
        assert pod.get("priorityClassName") == spec.get("priorityClassName"), stage
        assert pod.get("affinity") == spec.get("affinity"), stage
        if spec.get("shmSizeLimit"):
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": spec["shmSizeLimit"]}
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    spread = deploys["sluice-scoring"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == gpu_values["stages"]["scoring"]["topologySpreadConstraints"]
    # The spread's selector matches the pods it spreads.
    labels = deploys["sluice-scoring"]["spec"]["template"]["metadata"]["labels"]
    assert spread[0]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_default_stage_uses_no_gpu(default_objs: dict[Key, dict[str, Any]]) -> None:
    pod = default_objs[("Deployment", "sluice-scoring")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert not any("gpu" in r for r in c["resources"]["limits"])
    for field in ("runtimeClassName", "priorityClassName", "nodeSelector", "tolerations"):
        assert field not in pod, field


# -- secrets by reference --------------------------------------------------------------------

SECRETISH = ("KEY", "SECRET", "TOKEN", "PASSWORD")


def test_credentials_come_only_from_secret_references(
    gpu_objs: dict[Key, dict[str, Any]], gpu_values: dict[str, Any]
) -> None:
    s3 = gpu_values["s3"]
    keys = s3["existingSecretKeys"]
    for key, pod in pod_specs(gpu_objs).items():
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for name, e in env.items():
                if any(word in name for word in SECRETISH):
                    assert "value" not in e, (key, name)
                    assert set(e["valueFrom"]) == {"secretKeyRef"}, (key, name)
            # The density build Job runs the density service: it has density's store.
            stage = key[1].removeprefix(f"{RELEASE}-").removesuffix("-build-v1")
            creds = {n: e for n, e in env.items() if n.startswith("AWS_") or n.endswith("_KEY")}
            if key[1] == f"{RELEASE}-topics" or stage not in S3_BLOCK:
                assert not creds, key  # no object-store credentials where none is used
                continue
            prefix = f"SLUICE_{stage.upper()}_{'__'.join(S3_BLOCK[stage]).upper()}__"
            assert {n: e["valueFrom"]["secretKeyRef"] for n, e in creds.items()} == {
                "AWS_ACCESS_KEY_ID": {"name": s3["existingSecret"], "key": keys["accessKeyId"]},
                "AWS_SECRET_ACCESS_KEY": {
                    "name": s3["existingSecret"],
                    "key": keys["secretAccessKey"],
                },
                f"{prefix}ACCESS_KEY": {"name": s3["existingSecret"], "key": keys["accessKeyId"]},
                f"{prefix}SECRET_KEY": {
                    "name": s3["existingSecret"],
                    "key": keys["secretAccessKey"],
                },
            }


def _resolve(env: dict[str, Any], secrets: dict[str, str], pod_name: str) -> str:
    """An EnvVar's value as the kubelet gives it: Secret keys from ``secrets``, the pod name
    from the downward API."""
    ref = env.get("valueFrom")
    if ref is None:
        return str(env["value"])
    if "secretKeyRef" in ref:
        return secrets[ref["secretKeyRef"]["key"]]
    assert ref == {"fieldRef": {"fieldPath": "metadata.name"}}, env
    return pod_name


def test_no_credentials_without_a_secret() -> None:
    objs = render("stages.distill.enabled=true", "s3.endpoint=minio:9000")
    (c,) = objs[("Deployment", "sluice-distill")]["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    # The store is still configured: a MinIO without auth (or IRSA-style credentials) works.
    config = yaml.safe_load(objs[("ConfigMap", "sluice-distill")]["data"]["config.yaml"])
    assert config["topk_store"]["s3"]["endpoint"] == "minio:9000"


def test_scoring_reads_an_s3_classifier_with_the_stores_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A classifier artifact at s3://bucket/prefix is read through scoring's classifier.store:
    the chart wires the object store, its Secret and the egress to it there, as for every
    stage the registry gives an object store, and the service loads what it rendered."""
    from services.runtime.settings import load_settings
    from services.scoring.settings import ScoringSettings

    artifact = "s3://models/quality/quality-3d05cb52d0"
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "s3": {
                    "endpoint": "minio.storage:9000",
                    "secure": False,
                    "existingSecret": "models-s3",
                    "existingSecretKeys": {"accessKeyId": "id", "secretAccessKey": "secret"},
                },
                "stages": {
                    "scoring": {
                        "config": {
                            "steps": ["heuristics", "classifier"],
                            "classifier": {"artifact": artifact},
                        }
                    }
                },
            }
        )
    )
    objs = render(values_files=(values,))
    name = f"{RELEASE}-scoring"
    pod = objs[("Deployment", name)]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "models-s3", "key": "id"},
        "AWS_SECRET_ACCESS_KEY": {"name": "models-s3", "key": "secret"},
        "SLUICE_SCORING_CLASSIFIER__STORE__ACCESS_KEY": {"name": "models-s3", "key": "id"},
        "SLUICE_SCORING_CLASSIFIER__STORE__SECRET_KEY": {"name": "models-s3", "key": "secret"},
    }
    # The pod may reach the store (default policies: egress to its port from anywhere).
    egress = objs[("NetworkPolicy", name)]["spec"]["egress"]
    assert 9000 in {p["port"] for rule in egress for p in rule["ports"]}

    # What the service reads: the mounted config plus the env, the Secret resolved.
    secret = {"id": "AKIA-MODELS", "secret": "s3cr3t-MODELS"}
    for e in c["env"]:
        monkeypatch.setenv(e["name"], _resolve(e, secret, pod_name=f"{name}-7d9f-x2x4q"))
    config = tmp_path / "config.yaml"
    config.write_text(objs[("ConfigMap", name)]["data"]["config.yaml"])
    settings = load_settings(ScoringSettings, config)
    assert settings.classifier.artifact == artifact  # the bucket comes from the URI
    store = settings.classifier.store
    assert (store.endpoint, store.secure) == ("minio.storage:9000", False)
    assert store.access_key is not None and store.secret_key is not None
    assert store.access_key.get_secret_value() == "AKIA-MODELS"
    assert store.secret_key.get_secret_value() == "s3cr3t-MODELS"


@pytest.mark.parametrize(
    "value",
    [
        "s3.accessKey=AKIAEXAMPLE",
        "s3.secretAccessKey=abc",
        "s3.existingSecretKeys.password=abc",
        "s3.endpoint=https://minio:9000",  # host:port only, no scheme
    ],
)
def test_schema_rejects_clear_credentials_and_bad_store(value: str) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        render(value)


# -- settings each stage receives --------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_and_env_are_accepted_by_the_service(
    stage: str,
    gpu_objs: dict[Key, dict[str, Any]],
    gpu_values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rendered config file plus the container's environment, with the Secret's values
    resolved as the kubelet would, load into the stage's own settings class."""
    from services.runtime.settings import load_settings

    module, cls_name = SETTINGS[stage].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    name = f"{RELEASE}-{stage}"
    secret = {
        "access-key": "AKIA-TEST",
        "secret-key": "s3cr3t-TEST",
        "token": "hf-TEST",
        "password": "redis-TEST",
    }
    pod = gpu_objs[("Deployment", name)]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    for e in c["env"]:
        monkeypatch.setenv(e["name"], _resolve(e, secret, pod_name=f"{name}-7d9f-x2x4q"))
    config = tmp_path / "config.yaml"
    config.write_text(gpu_objs[("ConfigMap", name)]["data"]["config.yaml"])
    # The file is mounted where --config points.
    assert c["args"][1:] == ["--config", "/etc/sluice/config.yaml"]

    settings = load_settings(cls, config)
    spec = gpu_values["stages"][stage]
    assert settings.kafka.bootstrap_servers == gpu_values["kafka"]["bootstrapServers"]
    assert settings.kafka.input_topic == spec["topics"]["input"]
    assert settings.kafka.output_topic == spec["topics"]["output"]
    assert settings.kafka.group_id == f"sluice-{stage}"
    assert (settings.grpc.port, settings.metrics.port) == (50051, 9100)
    # The pod's name is the worker's stable identity; the delivery guarantee is the chart's.
    assert settings.kafka.instance_id == f"{name}-7d9f-x2x4q"
    assert settings.kafka.processing_guarantee == gpu_values["kafka"].get(
        "processingGuarantee", "exactly_once"
    )
    if stage in S3_BLOCK:
        store: Any = settings
        for part in S3_BLOCK[stage]:
            store = getattr(store, part)
        s3 = gpu_values["s3"]
        assert (store.endpoint, store.bucket, store.secure, store.region) == (
            s3["endpoint"],
            s3["bucket"],
            s3["secure"],
            "us-east-1",
        )
        access = store.access_key
        assert getattr(access, "get_secret_value", lambda: access)() == "AKIA-TEST"
        assert store.secret_key.get_secret_value() == "s3cr3t-TEST"


# -- topics Job ----------------------------------------------------------------------------


def _stage_topics(objs: dict[Key, dict[str, Any]]) -> set[str]:
    """Every topic the rendered stage configs name."""
    topics = set()
    for (kind, _), o in objs.items():
        if kind != "ConfigMap" or "config.yaml" not in o["data"]:
            continue
        cfg = yaml.safe_load(o["data"]["config.yaml"])
        k = cfg["kafka"]
        topics |= {k["input_topic"], k["output_topic"], k["dlq_topic"] or f"{k['input_topic']}.dlq"}
        # Drops are recorded by default (ServiceSettings.dropped_topic_name).
        dropped = str(cfg.get("dropped_topic") or f"{k['output_topic']}.dropped")
        if dropped.lower() != "none":
            topics.add(dropped)
    topics.discard("")  # a stage without an output topic (the sink)
    return topics


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_topics_job_creates_every_stage_topic(
    which: str,
    default_objs: dict[Key, dict[str, Any]],
    gpu_objs: dict[Key, dict[str, Any]],
    gpu_values: dict[str, Any],
) -> None:
    from services.cli import build_parser

    objs = default_objs if which == "default" else gpu_objs
    job = objs[("Job", "sluice-topics")]
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert set(hooks["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"][0] == "sluice"
    args = build_parser().parse_args(c["command"][1:])  # the real CLI accepts them
    assert args.command == "topics"
    extra = set(gpu_values["topics"]["extra"]) if which == "gpu" else set()
    assert set(args.topics) == _stage_topics(objs) | extra
    assert len(args.topics) == len(set(args.topics))
    assert args.partitions == (gpu_values["topics"]["partitions"] if which == "gpu" else 4)
    bootstrap = gpu_values["kafka"]["bootstrapServers"] if which == "gpu" else "kafka:9092"
    assert args.bootstrap == bootstrap
    # Created topics take the chart's message limit, not the broker's default.
    assert args.topic_config == ["max.message.bytes=8388608"]


def test_topics_job_off() -> None:
    assert not _by_kind(render("topics.create=false"), "Job")
    # Nothing enabled, nothing extra: nothing to create.
    assert not _by_kind(render("stages.scoring.enabled=false"), "Job")


# -- PDBs, NetworkPolicies -------------------------------------------------------------------


def test_pdbs_for_replicated_stages(
    gpu_objs: dict[Key, dict[str, Any]], default_objs: dict[Key, dict[str, Any]]
) -> None:
    assert not _by_kind(default_objs, "PodDisruptionBudget")  # one replica: no budget
    deploys = _by_kind(gpu_objs, "Deployment")
    pdbs = _by_kind(gpu_objs, "PodDisruptionBudget")
    scalers = {
        s["spec"]["scaleTargetRef"]["name"]: s for s in _by_kind(gpu_objs, "SluiceScaler").values()
    }
    # Fixed stages by their replicas, autoscaled ones (no spec.replicas) by their maximum.
    most = {
        n: scalers[n]["spec"]["scaling"]["maxReplicas"] if n in scalers else d["spec"]["replicas"]
        for n, d in deploys.items()
        if _component(d) != "operator"
    }
    replicated = {n for n, m in most.items() if m >= 2}
    assert (
        set(pdbs)
        == replicated
        == {"sluice-scoring", "sluice-rewrite", "sluice-density", "sluice-dedup"}
    )
    for name, pdb in pdbs.items():
        assert pdb["spec"]["selector"] == deploys[name]["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert set(_by_kind(render("podDisruptionBudget.minReplicas=1"), "PodDisruptionBudget")) == {
        "sluice-scoring"
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_network_policies(gpu_objs: dict[Key, dict[str, Any]], gpu_values: dict[str, Any]) -> None:
    # By component: one policy covers a component's pods, e.g. every density build Job's.
    policies = {
        f"{RELEASE}-{_component(p)}": p for p in _by_kind(gpu_objs, "NetworkPolicy").values()
    }
    workloads = {
        f"{RELEASE}-{_component(o)}": (
            o["spec"]["template"]["metadata"]["labels"],
            o["spec"]["template"]["spec"],
        )
        for (k, n), o in gpu_objs.items()
        if k in ("Deployment", "Job")
    }
    assert set(policies) == set(workloads)
    np = gpu_values["networkPolicy"]
    for name, policy in policies.items():
        spec = policy["spec"]
        _labels, pod = workloads[name]
        # Each policy selects exactly its own workload's pods.
        assert [n for n, (lbl, _) in workloads.items() if _selects(spec["podSelector"], lbl)] == [
            name
        ]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        ingress = {p["port"]: rule.get("from") for rule in spec["ingress"] for p in rule["ports"]}
        assert set(ingress) == ports - {"healthz"}, name  # kubelet probes need no rule
        if "grpc" in ingress:
            assert ingress["grpc"] == np["grpcFrom"]
        if "metrics" in ingress:
            assert ingress["metrics"] == np["metricsFrom"]
        egress = {
            (p["port"], p["protocol"]): rule.get("to")
            for rule in spec["egress"]
            for p in rule["ports"]
        }
        assert egress[(53, "UDP")] is None and egress[(53, "TCP")] is None  # DNS anywhere
        assert egress[(9092, "TCP")] == np["egress"]["kafka"]["to"]
        assert egress[(8080, "TCP")] == np["egress"]["extra"][0]["to"]
        # The density build Job runs the density service: it has density's store.
        has_store = name.removeprefix(f"{RELEASE}-").removesuffix("-build") in S3_BLOCK
        assert (egress.get((9000, "TCP")) == np["egress"]["objectStore"]["to"]) is has_store, name
        assert ((443, "TCP") in egress) is (name == "sluice-operator"), name
    # density runs as a worker: metrics only, no gRPC port to open.
    assert {
        p["port"] for r in policies["sluice-density"]["spec"]["ingress"] for p in r["ports"]
    } == {"metrics"}
    # The Jobs take no connections.
    assert policies["sluice-topics"]["spec"]["ingress"] == []
    assert policies["sluice-density-build"]["spec"]["ingress"] == []


def test_network_policy_ports_follow_the_endpoints() -> None:
    objs = render(
        "networkPolicy.enabled=true",
        "kafka.bootstrapServers=a:9093\\,b:9094\\,c:9093",
        "stages.density.enabled=true",
        "stages.density.config.sketch.version=1",
        "s3.endpoint=s3.example.com",
        "topics.create=false",
    )
    egress = objs[("NetworkPolicy", "sluice-density")]["spec"]["egress"]
    ports = {p["port"] for rule in egress for p in rule["ports"] if p["port"] != 53}
    assert ports == {9093, 9094, 443}  # no port in s3.endpoint + secure: HTTPS


# -- ServiceMonitor, dashboards ----------------------------------------------------------------


def test_service_monitor_scrapes_every_metrics_port(gpu_objs: dict[Key, dict[str, Any]]) -> None:
    (sm,) = _by_kind(gpu_objs, "ServiceMonitor").values()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    services = _by_kind(gpu_objs, "Service")
    selected = {
        n for n, s in services.items() if _selects(sm["spec"]["selector"], s["metadata"]["labels"])
    }
    assert selected == set(services) == {f"{RELEASE}-{s}" for s in (*STAGES, "operator")}
    for name in selected:
        assert "metrics" in {p["name"] for p in services[name]["spec"]["ports"]}, name


def test_dashboards_configmap(gpu_objs: dict[Key, dict[str, Any]]) -> None:
    cm = gpu_objs[("ConfigMap", "monitoring/sluice-dashboards")]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Sluice"}
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert files
    assert cm["data"] == {f.name: f.read_text() for f in files}
    assert sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024  # ConfigMap limit


def test_observability_objects_are_opt_in(default_objs: dict[Key, dict[str, Any]]) -> None:
    kinds = {k for k, _ in default_objs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert ("ConfigMap", "sluice-dashboards") not in default_objs


def test_network_policies_are_on_by_default_and_let_the_stage_work(
    default_objs: dict[Key, dict[str, Any]],
) -> None:
    """Off by default was a defect (issue 12): the default policies still allow what a
    stage needs: DNS, the brokers' port, gRPC from the namespace, and scrapes."""
    policies = _by_kind(default_objs, "NetworkPolicy")
    workloads = {n for (k, n) in default_objs if k in ("Deployment", "Job")}
    assert set(policies) == workloads == {"sluice-scoring", "sluice-topics"}
    spec = policies["sluice-scoring"]["spec"]
    egress = {(p["port"], p["protocol"]): r.get("to") for r in spec["egress"] for p in r["ports"]}
    assert egress == {(53, "UDP"): None, (53, "TCP"): None, (9092, "TCP"): None}
    ingress = {p["port"]: r.get("from") for r in spec["ingress"] for p in r["ports"]}
    assert ingress["grpc"] == [{"podSelector": {}}]
    # Prometheus in the monitoring namespace or the release's own may scrape.
    assert {"podSelector": {}} in ingress["metrics"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in ingress["metrics"]
    assert policies["sluice-topics"]["spec"]["ingress"] == []


# -- labels and selectors --------------------------------------------------------------------


def test_labels_and_selectors_are_stable(
    default_objs: dict[Key, dict[str, Any]], gpu_objs: dict[Key, dict[str, Any]]
) -> None:
    """Selectors hold only name/instance/component: immutable Deployment selectors must not
    change when the chart version, the app version or any value changes."""
    common = {
        "helm.sh/chart",
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
    }
    for objs in (default_objs, gpu_objs):
        for key, obj in objs.items():
            assert common <= set(obj["metadata"]["labels"]), key
            assert obj["metadata"]["namespace"] in (NAMESPACE, "monitoring", "research"), key
        services = _by_kind(objs, "Service")
        for name, deploy in _by_kind(objs, "Deployment").items():
            selector = deploy["spec"]["selector"]["matchLabels"]
            assert selector == {
                "app.kubernetes.io/name": "sluice",
                "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/component": name.removeprefix(f"{RELEASE}-"),
            }
            assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
            if name in services:
                assert services[name]["spec"]["selector"] == selector
    assert (
        default_objs[("Deployment", "sluice-scoring")]["spec"]["selector"]
        == gpu_objs[("Deployment", "sluice-scoring")]["spec"]["selector"]
    )


def test_operator_command_can_defer_to_the_image_entrypoint() -> None:
    """Tilt's restart wrapper is the image entrypoint: the chart must be able to leave the
    command out (operator.command=null, as the Tiltfile sets it) and keep the arguments."""
    objs = render("operator.enabled=true", "operator.command=null")
    (c,) = objs[("Deployment", "sluice-operator")]["spec"]["template"]["spec"]["containers"]
    assert "command" not in c
    assert c["args"] == ["--namespace", NAMESPACE]


# -- NOTES.txt -------------------------------------------------------------------------------


def test_notes_tell_how_to_publish_and_watch() -> None:
    out = subprocess.run(
        [
            str(tool("helm")),
            "install",
            "--dry-run=client",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--values",
            str(GPU_VALUES),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    notes = out.split("NOTES:", 1)[1]
    bootstrap = yaml.safe_load(GPU_VALUES.read_text())["kafka"]["bootstrapServers"]
    assert f"sluice publish corpus.jsonl --topic sluice.ingest --bootstrap {bootstrap}" in notes
    # the pipeline's first stage: dedup, which reads the ingest topic
    assert f"kubectl -n {NAMESPACE} port-forward svc/sluice-dedup 9100:9100" in notes
    assert "port-forward svc/<release>-grafana 3000:80" in notes
    assert '"Sluice: curation pipeline"' in notes  # the dashboard's title, read from its JSON
    assert "SluiceStageLagGrowing" in notes


# -- autoscaling: one owner of the pod template, every stage covered ---------------------------


@pytest.fixture(scope="module")
def autoscaled_objs(tmp_path_factory: pytest.TempPathFactory) -> dict[Key, dict[str, Any]]:
    """Every stage enabled and autoscaled, every optional object on."""
    stages: dict[str, Any] = {
        s: {"enabled": True, "autoscaling": {"enabled": True}} for s in STAGES
    }
    stages["density"]["config"] = {"sketch": {"name": "corpus", "version": 2}}
    values = {
        "s3": {"endpoint": "minio.storage:9000", "secure": False},
        "stages": stages,
        "operator": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "podDisruptionBudget": {"enabled": True},
    }
    path = tmp_path_factory.mktemp("values") / "autoscaled.yaml"
    path.write_text(yaml.safe_dump(values))
    return render(values_files=(path,))


def test_monitoring_alerts_policies_and_budgets_cover_every_autoscaled_stage(
    autoscaled_objs: dict[Key, dict[str, Any]],
) -> None:
    """The chart renders every stage Deployment, autoscaled or not, so the ServiceMonitor,
    the PrometheusRule, the NetworkPolicies and the PDBs select every stage's pods."""
    objs = autoscaled_objs
    deploys = {n: d for n, d in _by_kind(objs, "Deployment").items() if _component(d) in STAGES}
    assert {_component(d) for d in deploys.values()} == set(STAGES)
    services = _by_kind(objs, "Service")
    (sm,) = _by_kind(objs, "ServiceMonitor").values()
    (rule,) = _by_kind(objs, "PrometheusRule").values()
    rule_text = yaml.safe_dump(rule["spec"])
    policies = _by_kind(objs, "NetworkPolicy").values()
    pdbs = _by_kind(objs, "PodDisruptionBudget").values()
    for name, deploy in deploys.items():
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        # Scraped: a Service the ServiceMonitor selects routes to these pods' metrics port.
        scraped = [
            s
            for s in services.values()
            if _selects(sm["spec"]["selector"], s["metadata"]["labels"])
            and s["spec"]["selector"].items() <= pod_labels.items()
            and "metrics" in {p["name"] for p in s["spec"]["ports"]}
        ]
        assert [s["metadata"]["name"] for s in scraped] == [name], name
        # Alerted on: the rules select the scrape job that Service gives the series.
        assert f'job="{name}"' in rule_text, name
        # Fenced and protected.
        assert [p for p in policies if _selects(p["spec"]["podSelector"], pod_labels)], name
        assert [b for b in pdbs if _selects(b["spec"]["selector"], pod_labels)], name


def test_each_autoscaled_stage_gets_a_scaler_pointing_at_its_deployment(
    autoscaled_objs: dict[Key, dict[str, Any]],
) -> None:
    """The scaler carries the stage's kind and the very config its pods read; the operator
    derives from it the group the stage's workers commit (density pass 2: the sample group
    of the pinned sketch version); the Deployment leaves its replicas to the scaler."""
    from operators.crd import parse_spec
    from operators.lag import lag_target
    from services.runtime.registry import consumer_group, load_stage_settings
    from tests.operators import schema

    scalers = _by_kind(autoscaled_objs, "SluiceScaler")
    assert set(scalers) == {f"{RELEASE}-{s}" for s in STAGES}
    for name, scaler in scalers.items():
        schema.validate(scaler)
        spec = parse_spec(schema.with_defaults(schema.schema(), scaler)["spec"])
        assert spec.scale_target_ref.name == name
        deploy = autoscaled_objs[("Deployment", name)]
        assert "replicas" not in deploy["spec"], name
        kind = spec.stage.kind
        assert kind == _component(deploy)
        config = yaml.safe_load(autoscaled_objs[("ConfigMap", name)]["data"]["config.yaml"])
        assert spec.stage.config == config
        target = lag_target(kind, spec.stage.config)
        assert target.group == consumer_group(kind, load_stage_settings(kind, config))
        assert target.topic == config["kafka"]["input_topic"]
    density = lag_target("density", scalers[f"{RELEASE}-density"]["spec"]["stage"]["config"])
    assert density.group == "sluice-density.sample.corpus.v2"
    # The lag alerts name the group the registry names (sluice.committedGroup).
    (rule,) = _by_kind(autoscaled_objs, "PrometheusRule").values()
    for group in rule["spec"]["groups"]:
        stage = group["name"].removeprefix("sluice-")
        if stage not in STAGES:
            continue
        (lag,) = [r for r in group["rules"] if r["alert"] == "SluiceStageLagGrowing"]
        scaler = scalers[f"{RELEASE}-{stage}"]["spec"]["stage"]
        expected = lag_target(stage, scaler["config"]).group
        assert f"Consumer group {expected} is" in lag["annotations"]["description"], stage


def test_two_pass_density_gets_its_sketch_build_job(
    autoscaled_objs: dict[Key, dict[str, Any]],
) -> None:
    """Pass 1 (an init container) then the merge, with the stage's own settings in mode
    two_pass_build for the version pass 2 samples against; the Job's pods are not the
    stage's (no Service, PDB or Deployment selects them)."""
    from services.runtime.registry import consumer_group, load_stage_settings

    job = autoscaled_objs[("Job", f"{RELEASE}-density-build-v2")]
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
    pod = job["spec"]["template"]["spec"]
    (build,) = pod["initContainers"]
    (merge,) = pod["containers"]
    assert build["args"] == ["worker", "--config", "/etc/sluice/build.yaml"]
    assert merge["args"] == ["merge", "--config", "/etc/sluice/build.yaml"]
    deploy = autoscaled_objs[("Deployment", f"{RELEASE}-density")]
    (stage,) = deploy["spec"]["template"]["spec"]["containers"]
    for c in (build, merge):
        assert (c["image"], c["env"], c["resources"]) == (
            stage["image"],
            stage["env"],
            stage["resources"],
        )
    data = autoscaled_objs[("ConfigMap", f"{RELEASE}-density")]["data"]
    sample = load_stage_settings("density", yaml.safe_load(data["config.yaml"]))
    built = load_stage_settings("density", yaml.safe_load(data["build.yaml"]))
    assert (sample.mode, built.mode) == ("two_pass_sample", "two_pass_build")  # type: ignore[attr-defined]
    assert built.sketch == sample.sketch  # type: ignore[attr-defined]
    assert consumer_group("density", built) == "sluice-density.build.corpus.v2"
    labels = job["spec"]["template"]["metadata"]["labels"]
    for kind in ("Deployment", "PodDisruptionBudget"):
        for o in _by_kind(autoscaled_objs, kind).values():
            assert not o["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for s in _by_kind(autoscaled_objs, "Service").values():
        assert not s["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["stages.density.enabled=true"], "needs the object store"),
        (["stages.density.enabled=true", "s3.endpoint=m:9000"], "needs config.sketch.version"),
        (
            ["stages.density.enabled=true", "stages.density.config.mode=two_pass_build"],
            "sketch build Job",
        ),
        (
            [
                "stages.scoring.autoscaling.enabled=true",
                "stages.scoring.autoscaling.minReplicas=5",
            ],
            "minReplicas must not exceed maxReplicas",
        ),
        (
            [
                "stages.scoring.autoscaling.enabled=true",
                "stages.scoring.env[0].name=SLUICE_SCORING_KAFKA__GROUP_ID",
                "stages.scoring.env[0].value=elsewhere",
            ],
            "decides the consumer group",
        ),
    ],
)
def test_stage_values_that_cannot_start_fail_the_render(values: list[str], message: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(*values)
    assert message in err.value.stderr


def test_the_charts_idea_of_densitys_default_mode_is_the_services() -> None:
    """sluice.densityTwoPass treats a density config without `mode` as two_pass_sample."""
    from services.density.settings import DensitySettings

    assert DensitySettings.model_fields["mode"].default == "two_pass_sample"


def test_online_density_needs_no_store_and_no_build_job() -> None:
    objs = render("stages.density.enabled=true", "stages.density.config.mode=online")
    assert set(_by_kind(objs, "Job")) == {"sluice-topics"}
    assert "build.yaml" not in objs[("ConfigMap", "sluice-density")]["data"]


# -- transport security by Secret reference ---------------------------------------------------

SECURITY_VALUES = CHART / "ci" / "security-values.yaml"


@pytest.fixture(scope="module")
def security_objs() -> dict[Key, dict[str, Any]]:
    return render(values_files=(SECURITY_VALUES,))


def _secret_files(pod: dict[str, Any], c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Path -> (Secret, key) of every file a container sees from a Secret volume."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for m in c["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret is None:
            continue
        assert m["readOnly"] is True
        assert secret["defaultMode"] == 0o440  # group-readable: the pods' fsGroup
        for item in secret["items"]:
            files[f"{m['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def test_security_objects_validate_strictly(security_objs: dict[Key, dict[str, Any]]) -> None:
    import kubernetes_validate

    for obj in security_objs.values():
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_every_kafka_client_gets_the_security_files(
    security_objs: dict[Key, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Kafka client of the release (stages, the operator, the topics Job) is told the
    protocol, mechanism and user, and finds each file its settings name in the Secret the
    values name; nothing secret travels as a value."""
    from operators.settings import OperatorSettings
    from services.runtime.settings import KafkaClientEnv, load_settings

    values = yaml.safe_load(SECURITY_VALUES.read_text())
    sec = values["kafka"]["security"]
    want_files = {
        "CA_FILE": (sec["caSecret"]["name"], sec["caSecret"]["key"]),
        "CERT_FILE": (sec["clientCertSecret"]["name"], sec["clientCertSecret"]["certKey"]),
        "KEY_FILE": (sec["clientCertSecret"]["name"], sec["clientCertSecret"]["keyKey"]),
        "SASL_PASSWORD_FILE": (
            sec["sasl"]["passwordSecret"]["name"],
            sec["sasl"]["passwordSecret"]["key"],
        ),
    }
    clients = {
        "sluice-scoring": "SLUICE_SCORING_KAFKA__SECURITY__",
        "sluice-density": "SLUICE_DENSITY_KAFKA__SECURITY__",
        "sluice-operator": "SLUICE_OPERATOR_KAFKA__SECURITY__",
        "sluice-topics": "SLUICE_KAFKA_SECURITY__",
    }
    pods = {n: p for (_, n), p in pod_specs(security_objs).items()}
    assert set(pods) == set(clients)
    for name, prefix in clients.items():
        pod = pods[name]
        (c,) = pod["containers"]
        env = {e["name"]: e for e in c["env"]}
        files = _secret_files(pod, c)
        mine = {n.removeprefix(prefix): e["value"] for n, e in env.items() if n.startswith(prefix)}
        assert mine["PROTOCOL"] == "SASL_SSL", name
        assert mine["SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert mine["SASL_USERNAME"] == "sluice", name
        for field, ref in want_files.items():
            assert files[mine[field]] == ref, (name, field)
        for n, e in env.items():  # secrets by reference or as files, never as values
            if any(w in n for w in SECRETISH) and not n.endswith("_FILE"):
                assert "value" not in e, (name, n)

    # The settings classes accept what the chart sets.
    for n, e in {e["name"]: e for e in pods["sluice-operator"]["containers"][0]["env"]}.items():
        monkeypatch.setenv(n, _resolve(e, {}, pod_name="op"))
    op = OperatorSettings()
    assert op.kafka.security.protocol == "SASL_SSL"
    assert op.kafka.security.ca_file == "/etc/sluice-kafka/ca/ca.crt"
    for n, e in {e["name"]: e for e in pods["sluice-topics"]["containers"][0]["env"]}.items():
        monkeypatch.setenv(n, _resolve(e, {}, pod_name="topics"))
    assert KafkaClientEnv().security.sasl_password_file == "/etc/sluice-kafka/sasl/password"

    from services.density.settings import DensitySettings

    (c,) = pods["sluice-density"]["containers"]
    for e in c["env"]:
        monkeypatch.setenv(e["name"], _resolve(e, {}, pod_name="sluice-density-abc"))
    config = tmp_path / "config.yaml"
    config.write_text(security_objs[("ConfigMap", "sluice-density")]["data"]["config.yaml"])
    density = load_settings(DensitySettings, config)
    assert density.kafka.security.protocol == "SASL_SSL"
    assert density.kafka.security.key_file == "/etc/sluice-kafka/client/tls.key"
    assert density.kafka.instance_id == "sluice-density-abc"
    assert density.dropped_topic_name == ""  # dropped_topic: none


def test_grpc_tls_and_token_by_secret_reference(security_objs: dict[Key, dict[str, Any]]) -> None:
    """A stage serving gRPC gets the certificate, client CA and token files and the settings
    that name them; a worker-only stage none of it. Kubelet cannot probe gRPC over TLS, so
    such pods are probed on /metrics."""
    values = yaml.safe_load(SECURITY_VALUES.read_text())["grpc"]
    pods = {n: p for (_, n), p in pod_specs(security_objs).items()}
    pod = pods["sluice-scoring"]
    (c,) = pod["containers"]
    files = _secret_files(pod, c)
    env = {e["name"]: e.get("value") for e in c["env"]}
    p = "SLUICE_SCORING_GRPC__"
    assert env[f"{p}TLS__ENABLED"] == "true"
    tls = values["tls"]
    assert files[env[f"{p}TLS__CERT_FILE"]] == (
        tls["certSecret"]["name"],
        tls["certSecret"]["certKey"],
    )
    assert files[env[f"{p}TLS__KEY_FILE"]] == (
        tls["certSecret"]["name"],
        tls["certSecret"]["keyKey"],
    )
    assert files[env[f"{p}TLS__CLIENT_CA_FILE"]] == (
        tls["clientCaSecret"]["name"],
        tls["clientCaSecret"]["key"],
    )
    token = values["authTokenSecret"]
    assert files[env[f"{p}AUTH_TOKEN_FILE"]] == (token["name"], token["key"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe

    (worker,) = pods["sluice-density"]["containers"]
    assert not [e for e in worker["env"] if "_GRPC__" in e["name"]]
    assert not [f for f in _secret_files(pods["sluice-density"], worker) if "grpc" in f]

    from services.runtime.settings import GrpcSettings

    if "tls" in GrpcSettings.model_fields:  # the gRPC TLS settings (services/runtime)
        grpc = GrpcSettings.model_validate(
            {
                "tls": {
                    "enabled": True,
                    "cert_file": env[f"{p}TLS__CERT_FILE"],
                    "key_file": env[f"{p}TLS__KEY_FILE"],
                    "client_ca_file": env[f"{p}TLS__CLIENT_CA_FILE"],
                },
                "auth_token_file": env[f"{p}AUTH_TOKEN_FILE"],
            }
        )
        assert grpc.tls.enabled


def test_plaintext_defaults_mount_no_secrets(default_objs: dict[Key, dict[str, Any]]) -> None:
    for key, pod in pod_specs(default_objs).items():
        for c in pod["containers"]:
            assert not _secret_files(pod, c), key
            assert not [e for e in c["env"] if "_SECURITY__" in e["name"]], key
    # gRPC stays probed natively without TLS.
    (c,) = default_objs[("Deployment", "sluice-scoring")]["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["grpc"] == {"port": 50051}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["kafka.security.protocol=SASL_SSL"], "needs sasl.username and sasl.passwordSecret"),
        (
            ["kafka.security.protocol=SASL_PLAINTEXT", "kafka.security.sasl.username=u"],
            "needs sasl.username and sasl.passwordSecret",
        ),
        (["kafka.security.caSecret.name=ca"], "has no TLS"),
        (["grpc.tls.enabled=true"], "needs grpc.tls.certSecret.name"),
        (["grpc.tls.clientCaSecret.name=ca"], "grpc.tls.enabled is false"),
        (["kafka.security.protocol=TLS"], "protocol"),
        (["kafka.processingGuarantee=at_most_once"], "processingGuarantee"),
        (["kafka.security.sasl.passwordSecret.password=abc"], "password"),
    ],
)
def test_security_values_that_cannot_work_fail_the_render(values: list[str], message: str) -> None:
    with pytest.raises(subprocess.CalledProcessError, match=message):
        render(*values)
