"""Every Kubernetes API call the operator makes, through the official client.

Objects travel as plain dicts in API form (camelCase), as ``operators.desired`` builds them
and as drift compares them: responses are read raw (``_preload_content=False``), not through
the client's models. The operator creates Deployments and Services, JSON-patches the fields
it owns, sets replicas through the ``scale`` subresource, and deletes the objects of stages
that left the spec. It never creates pods.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from operators.desired import needs_update, owner_selector, update_patch, with_replicas

ObjectKind = Literal["Deployment", "Service"]


class NotOwnedError(Exception):
    """An object with the desired name exists but belongs to someone else: never adopted."""


@dataclass(frozen=True)
class ApplyResult:
    action: Literal["created", "updated", "unchanged"]
    object: dict[str, Any]
    reasons: tuple[str, ...] = ()


def api_client(kubeconfig: str = "") -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig file
    (``kubeconfig``, else $KUBECONFIG, else ~/.kube/config). A fresh client, not the global
    default configuration."""
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    return config.new_client_from_config(config_file=path)


class KubeActuator:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._apps = client.AppsV1Api(api)
        self._core = client.CoreV1Api(api)

    def close(self) -> None:
        self._api.close()

    # -- reads ---------------------------------------------------------------------------

    def get(self, kind: ObjectKind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "Deployment":
                resp = self._apps.read_namespaced_deployment(
                    name, namespace, _preload_content=False
                )
            else:
                resp = self._core.read_namespaced_service(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _json(resp)

    def list_owned(
        self, kind: ObjectKind, namespace: str, pipeline: str, uid: str
    ) -> list[dict[str, Any]]:
        """Objects of ``kind`` the operator made for this pipeline (labels and owner uid)."""
        selector = owner_selector(pipeline)
        if kind == "Deployment":
            resp = self._apps.list_namespaced_deployment(
                namespace, label_selector=selector, _preload_content=False
            )
        else:
            resp = self._core.list_namespaced_service(
                namespace, label_selector=selector, _preload_content=False
            )
        wanted = dict(pair.split("=", 1) for pair in selector.split(","))
        return [
            item
            for item in _json(resp).get("items", [])
            # Re-check what the selector asked for, and that this pipeline is the owner:
            # a same-named pipeline that was deleted and recreated has a new uid.
            if wanted.items() <= (item["metadata"].get("labels") or {}).items()
            and any(r.get("uid") == uid for r in item["metadata"].get("ownerReferences") or [])
        ]

    # -- writes --------------------------------------------------------------------------

    def apply(self, desired: dict[str, Any], *, replicas: int | None = None) -> ApplyResult:
        """Create the object, or patch it where it differs; no request when it matches.

        ``replicas`` is used only when creating a Deployment. An existing object that the
        desired owner does not own (the chart's own stage Deployment, another pipeline's,
        a hand-made one) raises NotOwnedError instead of being taken over.
        """
        kind: ObjectKind = desired["kind"]
        meta = desired["metadata"]
        live = self.get(kind, meta["namespace"], meta["name"])
        if live is None:
            body = with_replicas(desired, replicas) if replicas is not None else desired
            try:
                return ApplyResult("created", self._create(kind, meta["namespace"], body))
            except ApiException as exc:
                if exc.status != 409:  # created meanwhile: fall through to a patch
                    raise
                live = self.get(kind, meta["namespace"], meta["name"])
                if live is None:
                    raise
        owners = {r["uid"] for r in meta["ownerReferences"]}
        if not owners & {r.get("uid") for r in live["metadata"].get("ownerReferences") or []}:
            raise NotOwnedError(
                f"{kind} {meta['namespace']}/{meta['name']} exists and is not owned by "
                f"{', '.join(r['kind'] + ' ' + r['name'] for r in meta['ownerReferences'])}: "
                "rename the stage or remove the object"
            )
        reasons = needs_update(desired, live)
        if not reasons:
            return ApplyResult("unchanged", live)
        patched = self._patch(kind, meta["namespace"], meta["name"], update_patch(desired, live))
        return ApplyResult("updated", patched, tuple(reasons))

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource (what HPA does)."""
        self._apps.patch_namespaced_deployment_scale(
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )

    def delete(self, kind: ObjectKind, namespace: str, name: str) -> None:
        try:
            if kind == "Deployment":
                self._apps.delete_namespaced_deployment(name, namespace, _preload_content=False)
            else:
                self._core.delete_namespaced_service(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _create(self, kind: ObjectKind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "Deployment":
            resp = self._apps.create_namespaced_deployment(namespace, body, _preload_content=False)
        else:
            resp = self._core.create_namespaced_service(namespace, body, _preload_content=False)
        return _json(resp)

    def _patch(
        self, kind: ObjectKind, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        content = "application/json-patch+json"
        if kind == "Deployment":
            resp = self._apps.patch_namespaced_deployment(
                name, namespace, ops, _content_type=content, _preload_content=False
            )
        else:
            resp = self._core.patch_namespaced_service(
                name, namespace, ops, _content_type=content, _preload_content=False
            )
        return _json(resp)


def _json(resp: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resp.data)
    return data
