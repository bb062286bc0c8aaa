"""The objects a stage should have, and when (and how) the live ones get patched.

The desired Deployment and Service are checked against Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict); drift and the update patch are exercised on live-looking
objects carrying what an API server adds (defaults, normalised quantities, status, others'
labels), with the patch applied by a real JSON-patch implementation.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
from typing import Any, get_args

import jsonpatch
import kubernetes_validate
import pytest

from operators import API_VERSION, KIND
from operators.crd import PipelineSpec, StageKind, parse_spec
from operators.desired import (
    HASH_ANNOTATION,
    desired_deployment,
    desired_service,
    needs_update,
    selector_labels,
    update_patch,
    with_replicas,
)
from services.runtime.settings import ServiceSettings, load_settings

UID = "0b5c7d8e-0000-4000-8000-000000000001"


def spec(**stage: Any) -> PipelineSpec:
    base = {
        "name": "scoring",
        "kind": "scoring",
        "image": "sluice:0.1.0",
        "topics": {"input": "sluice.ingest", "output": "sluice.scored"},
        "group": "sluice-scoring",
    }
    return parse_spec(
        "curate", {"kafka": {"bootstrapServers": "k1:9092,k2:9092"}, "stages": [{**base, **stage}]}
    )


def deployment(**stage: Any) -> dict[str, Any]:
    s = spec(**stage)
    return desired_deployment("curate", UID, "ns", s, s.stages[0])


def service(**stage: Any) -> dict[str, Any]:
    s = spec(**stage)
    return desired_service("curate", UID, "ns", s.stages[0])


def as_served(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as an API server returns it: defaults filled in, quantities normalised,
    server metadata and status added, another controller's label and annotation."""
    live = copy.deepcopy(obj)
    meta = live["metadata"]
    meta.update(
        uid="x", resourceVersion="42", creationTimestamp="2026-01-01T00:00:00Z", generation=3
    )
    meta["labels"]["team"] = "data"
    meta["annotations"]["deployment.kubernetes.io/revision"] = "3"
    if live["kind"] == "Deployment":
        live["spec"]["replicas"] = 3
        live["spec"]["progressDeadlineSeconds"] = 600
        pod = live["spec"]["template"]["spec"]
        pod.update(
            restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler"
        )
        for c in pod["containers"]:
            c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                c[probe]["successThreshold"] = 1
                c[probe]["grpc"]["service"] = ""
            limits = c["resources"].get("limits", {})
            if "cpu" in limits:
                limits["cpu"] = "1" if limits["cpu"] == "1000m" else limits["cpu"]
        # The API server drops empty maps and lists.
        for key in ("nodeSelector", "tolerations", "imagePullSecrets"):
            if not pod[key]:
                del pod[key]
        live["status"] = {"replicas": 3, "readyReplicas": 2}
    else:
        live["spec"].update(clusterIP="10.0.0.7", clusterIPs=["10.0.0.7"], sessionAffinity="None")
    return live


# -- the desired objects ------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [0, 2])
def test_desired_objects_are_valid_kubernetes(gpus: int) -> None:
    d = with_replicas(
        deployment(
            gpus=gpus,
            env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}],
        ),
        1,
    )
    kubernetes_validate.validate(d, "1.33.0", strict=True)
    kubernetes_validate.validate(service(), "1.33.0", strict=True)


def test_one_selector_ties_the_objects_together() -> None:
    d, s = deployment(), service()
    selector = selector_labels("curate", "scoring")
    assert d["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert s["spec"]["selector"] == selector
    assert (
        d["metadata"]["labels"]
        == s["metadata"]["labels"]
        == d["spec"]["template"]["metadata"]["labels"]
    )
    for obj in (d, s):
        assert obj["metadata"]["name"] == "curate-scoring"
        assert obj["metadata"]["namespace"] == "ns"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": "curate",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_deployment_runs_the_stage_service_with_its_settings() -> None:
    d = deployment(kind="density", env=[{"name": "SLUICE_DENSITY_LOG_LEVEL", "value": "DEBUG"}])
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "services.density"]
    assert c["args"] == ["all"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SLUICE_DENSITY_KAFKA__BOOTSTRAP_SERVERS"] == "k1:9092,k2:9092"
    assert env["SLUICE_DENSITY_KAFKA__INPUT_TOPIC"] == "sluice.ingest"
    assert env["SLUICE_DENSITY_KAFKA__OUTPUT_TOPIC"] == "sluice.scored"
    assert env["SLUICE_DENSITY_KAFKA__GROUP_ID"] == "sluice-scoring"
    assert env["SLUICE_DENSITY_GRPC__PORT"] == "50051"
    assert env["SLUICE_DENSITY_METRICS__PORT"] == "9100"
    assert env["SLUICE_DENSITY_LOG_LEVEL"] == "DEBUG"  # the user's entries come last
    assert c["env"][-1]["name"] == "SLUICE_DENSITY_LOG_LEVEL"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "metrics": 9100}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 50051}
    # Restricted Pod Security.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", env["HOME"], env["XDG_CACHE_HOME"]} <= mounts
    assert "replicas" not in d["spec"]  # the scaler owns it


def test_gpus_become_limits_and_a_surge_free_rollout() -> None:
    (c,) = deployment(gpus=2, resources={"limits": {"memory": "32Gi"}})["spec"]["template"]["spec"][
        "containers"
    ]
    assert c["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "2"}
    d = deployment(gpus=1)
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (cpu,) = deployment()["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_startup_probe_allows_the_warm_up() -> None:
    (c,) = deployment(scaling={"warmupSeconds": 600})["spec"]["template"]["spec"]["containers"]
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_hash_changes_with_the_spec_only() -> None:
    h = deployment()["metadata"]["annotations"][HASH_ANNOTATION]
    assert deployment()["metadata"]["annotations"][HASH_ANNOTATION] == h
    assert deployment(image="sluice:0.2.0")["metadata"]["annotations"][HASH_ANNOTATION] != h
    # Scaling policy changes that do not change the pods do not roll them.
    assert deployment(scaling={"maxReplicas": 9})["metadata"]["annotations"][HASH_ANNOTATION] == h


# -- drift and patching -------------------------------------------------------------------------


@pytest.mark.parametrize("build", [deployment, service])
def test_a_served_copy_is_no_drift(build: Any) -> None:
    desired = build(resources={"limits": {"cpu": "1000m"}}) if build is deployment else build()
    assert needs_update(desired, as_served(desired)) == []


def test_edits_to_owned_fields_are_drift() -> None:
    desired = deployment()
    live = as_served(desired)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "someone/else:latest"
    assert needs_update(desired, live) == ["/spec/template/spec/containers/0/image"]
    live = as_served(desired)
    live["metadata"]["ownerReferences"] = []
    assert needs_update(desired, live) == ["/metadata/ownerReferences"]


def test_spec_changes_are_drift_even_when_they_remove_things() -> None:
    old = deployment(nodeSelector={"gpu": "a100", "zone": "b"})
    new = deployment(nodeSelector={"gpu": "a100"})
    reasons = needs_update(new, as_served(old))
    assert reasons and reasons[0].startswith("spec changed")


def test_update_patch_makes_live_match_and_keeps_what_others_own() -> None:
    old = deployment(
        nodeSelector={"gpu": "a100", "zone": "b"},
        env=[{"name": "SLUICE_SCORING_LOG_LEVEL", "value": "DEBUG"}],
    )
    live = as_served(old)
    live["metadata"]["ownerReferences"].append(
        {"apiVersion": "v1", "kind": "X", "name": "x", "uid": "other"}
    )
    live["spec"]["template"]["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "t"}
    new = deployment(nodeSelector={"gpu": "h100"}, image="sluice:0.2.0")

    patched = jsonpatch.apply_patch(live, update_patch(new, live))

    assert needs_update(new, patched) == []
    pod = patched["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}  # the removed key is gone
    assert "SLUICE_SCORING_LOG_LEVEL" not in {e["name"] for e in pod["containers"][0]["env"]}
    assert patched["spec"]["replicas"] == 3  # the scaler's field is untouched
    assert patched["spec"]["progressDeadlineSeconds"] == 600  # server defaults stay
    assert patched["metadata"]["labels"]["team"] == "data"
    assert patched["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert {r["uid"] for r in patched["metadata"]["ownerReferences"]} == {"other", UID}
    assert patched["spec"]["template"]["metadata"]["annotations"] == {
        "kubectl.kubernetes.io/restartedAt": "t"
    }
    assert patched["status"] == live["status"]


def test_service_patch_keeps_the_cluster_ip() -> None:
    live = as_served(service())
    live["spec"]["ports"] = live["spec"]["ports"][:1]
    desired = service()
    assert needs_update(desired, live) == ["/spec/ports"]
    patched = jsonpatch.apply_patch(live, update_patch(desired, live))
    assert needs_update(desired, patched) == []
    assert patched["spec"]["clusterIP"] == "10.0.0.7"


@pytest.mark.parametrize("kind", sorted(get_args(StageKind)))
def test_each_service_reads_the_settings_the_operator_sets(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env of a stage's container, loaded by that service's own settings class: every
    operator-set value lands where it should (a misspelt name would be silently ignored)."""
    module = importlib.import_module(f"services.{kind}.settings")
    (settings_cls,) = [
        c
        for c in vars(module).values()
        if inspect.isclass(c)
        and issubclass(c, ServiceSettings)
        and c is not ServiceSettings
        and c.__module__ == module.__name__
    ]
    d = deployment(kind=kind, topics={"input": "in.t", "output": "out.t", "dlq": "dead.t"})
    (c,) = d["spec"]["template"]["spec"]["containers"]
    prefix = f"SLUICE_{kind.upper()}_"
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for e in c["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    settings = load_settings(settings_cls)
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert (settings.kafka.input_topic, settings.kafka.output_topic) == ("in.t", "out.t")
    assert settings.kafka.dlq_topic == "dead.t"
    assert settings.kafka.group_id == "sluice-scoring"
    assert (settings.grpc.port, settings.metrics.port, settings.metrics.enabled) == (
        50051,
        9100,
        True,
    )
    assert c["command"] == ["python", "-m", f"services.{kind}"]
