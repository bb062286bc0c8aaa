"""The objects a stage should have: its Deployment and Service, as plain dicts. Pure.

Everything a stage's objects carry that ties them together (names, labels, selectors, owner
reference) comes from the helpers at the top, so the Deployment's selector, its pods' labels
and the Service's selector cannot drift apart. The Deployment mirrors the chart's stage
Deployment (charts/sluice/templates/deployment.yaml): Restricted Pod Security, native gRPC
probes, writable volumes for a read-only root filesystem; settings reach the service as
``SLUICE_<KIND>_*`` environment variables.

``spec.replicas`` is set only when a Deployment is created: after that the scaler owns it,
through the ``scale`` subresource, and neither ``drift`` nor ``update_patch`` touches it.

Applying: each desired object carries a hash of itself (annotation ``sluice.dev/desired-hash``).
An object needs an update when the hash differs (the spec changed, including removals) or
when a field the operator sets differs on the live object (someone edited it); otherwise the
patch is skipped. The update is a JSON patch that replaces, whole, every ``spec`` field the
operator sets, so removed entries (a node selector key, an env var) really go away, while
fields it does not set (server defaults, a Service's clusterIP, replicas) stay.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from kubernetes.utils import parse_quantity

from operators import API_VERSION, KIND
from operators.crd import PipelineSpec, StageSpec, object_name

GRPC_PORT = 50051
METRICS_PORT = 9100
HOME = "/home/sluice"
# The image's non-root user (Dockerfile: uid/gid 10001 "sluice").
RUN_AS = 10001
MANAGED_BY = "sluice-operator"
PIPELINE_LABEL = "sluice.dev/pipeline"
STAGE_LABEL = "sluice.dev/stage"
HASH_ANNOTATION = "sluice.dev/desired-hash"


def selector_labels(pipeline: str, stage: str) -> dict[str, str]:
    """The one matchLabels set of a stage: Deployment selector, pod labels, Service selector.

    Immutable once a Deployment exists (a Deployment's selector cannot change), so it holds
    only identity, never anything a spec edit could change.
    """
    return {
        "app.kubernetes.io/name": "sluice",
        "app.kubernetes.io/instance": pipeline,
        "app.kubernetes.io/component": stage,
    }


def stage_labels(pipeline: str, stage: StageSpec) -> dict[str, str]:
    """Labels of every object of a stage: the selector labels plus ownership and kind."""
    return {
        **selector_labels(pipeline, stage.name),
        "app.kubernetes.io/part-of": "sluice",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        PIPELINE_LABEL: pipeline,
        STAGE_LABEL: stage.name,
        "sluice.dev/kind": stage.kind,
    }


def owner_selector(pipeline: str) -> str:
    """Label selector of every object the operator made for ``pipeline``."""
    return f"app.kubernetes.io/managed-by={MANAGED_BY},{PIPELINE_LABEL}={pipeline}"


def owner_reference(pipeline: str, uid: str) -> dict[str, Any]:
    """The pipeline as controller owner: deleting it garbage-collects its stages' objects."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": pipeline,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(pipeline: str, uid: str, namespace: str, stage: StageSpec) -> dict[str, Any]:
    return {
        "name": object_name(pipeline, stage.name),
        "namespace": namespace,
        "labels": stage_labels(pipeline, stage),
        "ownerReferences": [owner_reference(pipeline, uid)],
    }


def stage_env(spec: PipelineSpec, stage: StageSpec) -> list[dict[str, Any]]:
    """The container's environment: the operator-owned settings, then the user's entries."""
    p = stage.env_prefix
    owned: list[tuple[str, str]] = [
        ("SLUICE_SERVICE", stage.kind),
        # The writable volumes below: the root filesystem is read-only.
        ("HOME", HOME),
        ("XDG_CACHE_HOME", f"{HOME}/.cache"),
        (p + "KAFKA__BOOTSTRAP_SERVERS", spec.kafka.bootstrap_servers),
        (p + "KAFKA__INPUT_TOPIC", stage.topics.input),
        (p + "KAFKA__OUTPUT_TOPIC", stage.topics.output),
        (p + "KAFKA__DLQ_TOPIC", stage.topics.dlq),
        (p + "KAFKA__GROUP_ID", stage.group),
        (p + "GRPC__PORT", str(GRPC_PORT)),
        (p + "METRICS__PORT", str(METRICS_PORT)),
        (p + "METRICS__ENABLED", "true"),
    ]
    env: list[dict[str, Any]] = [{"name": n, "value": v} for n, v in owned]
    env += [e.model_dump(by_alias=True, exclude_none=True) for e in stage.env]
    return env


def _resources(stage: StageSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if stage.resources.requests:
        resources["requests"] = dict(stage.resources.requests)
    limits = dict(stage.resources.limits)
    if stage.gpus > 0:
        # Quantities as strings: the API server returns them so, and drift compares values.
        limits["nvidia.com/gpu"] = str(stage.gpus)
    if limits:
        resources["limits"] = limits
    return resources


def _grpc_probe(period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "grpc": {"port": GRPC_PORT},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def desired_deployment(
    pipeline: str, uid: str, namespace: str, spec: PipelineSpec, stage: StageSpec
) -> dict[str, Any]:
    """The stage's Deployment, without ``spec.replicas`` (see ``with_replicas``)."""
    meta = _metadata(pipeline, uid, namespace, stage)
    container: dict[str, Any] = {
        "name": stage.kind,
        "image": stage.image,
        "imagePullPolicy": stage.image_pull_policy,
        "command": ["python", "-m", f"services.{stage.kind}"],
        "args": ["all"],
        "env": stage_env(spec, stage),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # grpc.health.v1: SERVING once the server is up, NOT_SERVING while draining. Startup
        # allows the warm-up time (plus a minute) before liveness takes over.
        "startupProbe": _grpc_probe(
            period=5, failures=max(12, math.ceil((stage.scaling.warmup_seconds + 60) / 5))
        ),
        "readinessProbe": _grpc_probe(period=10, failures=3),
        "livenessProbe": _grpc_probe(period=20, failures=3),
        "resources": _resources(stage),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": HOME},
            {"name": "model-cache", "mountPath": f"{HOME}/.cache"},
        ],
    }
    pod_spec: dict[str, Any] = {
        # The services never call the Kubernetes API.
        "automountServiceAccountToken": False,
        # Service links would inject SLUICE_<SERVICE>_* variables into the settings' prefix.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": stage.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "home", "emptyDir": {"sizeLimit": "256Mi"}},
            {"name": "model-cache", "emptyDir": {"sizeLimit": stage.model_cache_size_limit}},
        ],
        "nodeSelector": dict(stage.node_selector),
        "tolerations": list(stage.tolerations),
        "imagePullSecrets": [s.model_dump(by_alias=True) for s in spec.image_pull_secrets],
    }
    # A GPU pod cannot surge onto a node without a spare GPU: replace one at a time instead.
    strategy = (
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
        if stage.gpus > 0
        else {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
        }
    )
    return _hashed(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "revisionHistoryLimit": 3,
                "strategy": strategy,
                "selector": {"matchLabels": selector_labels(pipeline, stage.name)},
                "template": {
                    "metadata": {"labels": dict(meta["labels"])},
                    "spec": pod_spec,
                },
            },
        }
    )


def with_replicas(deployment: Mapping[str, Any], replicas: int) -> dict[str, Any]:
    """The Deployment to create: the desired one with its first replica count."""
    return {**deployment, "spec": {**deployment["spec"], "replicas": replicas}}


def desired_service(pipeline: str, uid: str, namespace: str, stage: StageSpec) -> dict[str, Any]:
    """The stage's ClusterIP Service: gRPC (h2c, for meshes and gateways) and metrics."""
    return _hashed(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(pipeline, uid, namespace, stage),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(pipeline, stage.name),
                "ports": [
                    {
                        "name": "grpc",
                        "port": GRPC_PORT,
                        "targetPort": "grpc",
                        "protocol": "TCP",
                        "appProtocol": "kubernetes.io/h2c",
                    },
                    {
                        "name": "metrics",
                        "port": METRICS_PORT,
                        "targetPort": "metrics",
                        "protocol": "TCP",
                        "appProtocol": "http",
                    },
                ],
            },
        }
    )


def _hashed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the hash of its content in metadata.annotations."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    obj["metadata"]["annotations"] = {HASH_ANNOTATION: digest}
    return obj


def needs_update(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Why the live object must be updated ([] = it is as desired: skip the patch)."""
    want = desired["metadata"]["annotations"][HASH_ANNOTATION]
    have = (actual.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    reasons = [] if want == have else [f"spec changed ({have} -> {want})"]
    mine = {r["uid"] for r in desired["metadata"]["ownerReferences"]}
    if not mine <= {r.get("uid") for r in actual.get("metadata", {}).get("ownerReferences") or []}:
        reasons.append("/metadata/ownerReferences")
    # Owner references are checked above: other owners may be listed too.
    meta = {k: v for k, v in desired["metadata"].items() if k != "ownerReferences"}
    return reasons + drift({**desired, "metadata": meta}, actual)


def update_patch(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch that makes ``actual`` as desired on the fields the operator owns.

    Labels and annotations are merged (others may add their own); owner references keep
    other owners; every ``spec`` key the operator sets is replaced whole. Pod-template
    annotations set by others (``kubectl rollout restart``) are kept.
    """
    meta, live_meta = desired["metadata"], actual.get("metadata", {})
    others = [
        r
        for r in live_meta.get("ownerReferences") or []
        if r.get("uid") not in {o["uid"] for o in meta["ownerReferences"]}
    ]
    ops: list[dict[str, Any]] = [
        {
            "op": "add",
            "path": "/metadata/labels",
            "value": {**(live_meta.get("labels") or {}), **meta["labels"]},
        },
        {
            "op": "add",
            "path": "/metadata/annotations",
            "value": {**(live_meta.get("annotations") or {}), **meta["annotations"]},
        },
        {
            "op": "add",
            "path": "/metadata/ownerReferences",
            "value": others + meta["ownerReferences"],
        },
    ]
    live_spec = actual.get("spec") or {}
    for key, value in desired["spec"].items():
        if key == "template":
            live_annotations = ((live_spec.get("template") or {}).get("metadata") or {}).get(
                "annotations"
            )
            if live_annotations:
                value = {
                    **value,
                    "metadata": {**value["metadata"], "annotations": live_annotations},
                }
        ops.append({"op": "add", "path": f"/spec/{key}", "value": value})
    return ops


# -- drift ----------------------------------------------------------------------------------

# Keys whose values are resource quantities ("1", "1000m" and 1 are the same amount).
_QUANTITY_PARENTS = frozenset({"requests", "limits"})


def drift(desired: Any, actual: Any, path: str = "") -> list[str]:
    """Paths where ``actual`` differs from ``desired`` on the fields ``desired`` sets.

    Fields only ``actual`` has (server defaults, status, other controllers' annotations) are
    not drift; lists must match element by element (the operator owns whole lists: env,
    ports, volumes). An empty result means the apply would be a no-op patch, so it is skipped.
    """
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return [path or "/"]
        out: list[str] = []
        for key, value in desired.items():
            sub = f"{path}/{key}"
            if key not in actual:
                # An empty map or list the server leaves out is not a difference.
                if value not in ({}, []):
                    out.append(sub)
            elif path.rsplit("/", 1)[-1] in _QUANTITY_PARENTS:
                if not _same_quantity(value, actual[key]):
                    out.append(sub)
            else:
                out += drift(value, actual[key], sub)
        return out
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [path or "/"]
        out = []
        for i, (d, a) in enumerate(zip(desired, actual, strict=True)):
            out += drift(d, a, f"{path}/{i}")
        return out
    return [] if desired == actual else [path or "/"]


def _same_quantity(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return bool(parse_quantity(a) == parse_quantity(b))
    except (ValueError, TypeError):
        return False
