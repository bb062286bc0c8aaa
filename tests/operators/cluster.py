"""A Kubernetes API for the operator's tests: kmock's KubernetesEmulator on loopback.

No kube-apiserver exists on these machines (see /work/shared/INFRA.md); kmock (by kopf's
author) serves the Kubernetes REST API from memory. Its limits shape how the tests use it:

- resources must be declared up front (with their status/scale subresources), including
  namespaces and CRDs, which kopf's observers wait for even with scanning disabled: every
  kind the chart renders is declared below, so ``apply`` can create a whole render;
- it sets no uid or resourceVersion: the tests create custom objects with both in the body
  (kopf JSON-patches with a resourceVersion test op; owner references need the uid);
- it does no schema validation, defaulting or garbage collection: ``apply`` validates custom
  objects against the CRD schema and fills in the defaults the API server would (the CRD's,
  and a Deployment's ``spec.replicas: 1``);
- it runs no controllers: ``Kubelet`` below plays the Deployment controller's part of
  reporting pods ready (status.readyReplicas = spec.replicas);
- list requests ignore label selectors (the operator filters what it lists again);
- it does not generate names from ``metadata.generateName`` (kopf's Events use it):
  ``_Emulator`` below does, as the API server would.

The emulator runs on its own event loop in a background thread, so tests are plain
synchronous code talking to it over HTTP with the official client, like the operator does.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import kmock
import yaml
from kubernetes import client, config

VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


def _info(kind: str, *, namespaced: bool = True, verbs: set[str] = VERBS, **kw: Any) -> Any:
    return kmock.ResourceInfo(
        kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=verbs, **kw
    )


# "<group>/<version>/<plural>" (core: "v1/<plural>") -> what the emulator serves.
RESOURCES: dict[str, kmock.ResourceInfo] = {
    "sluice.dev/v1alpha1/sluicescalers": _info("SluiceScaler", subresources={"status"}),
    "apps/v1/deployments": _info("Deployment", subresources={"status", "scale"}),
    "batch/v1/jobs": _info("Job", subresources={"status"}),
    "v1/services": _info("Service"),
    "v1/configmaps": _info("ConfigMap"),
    "v1/serviceaccounts": _info("ServiceAccount"),
    "v1/events": _info("Event"),
    "policy/v1/poddisruptionbudgets": _info("PodDisruptionBudget"),
    "networking.k8s.io/v1/networkpolicies": _info("NetworkPolicy"),
    "rbac.authorization.k8s.io/v1/roles": _info("Role"),
    "rbac.authorization.k8s.io/v1/rolebindings": _info("RoleBinding"),
    "monitoring.coreos.com/v1/servicemonitors": _info("ServiceMonitor"),
    "monitoring.coreos.com/v1/prometheusrules": _info("PrometheusRule"),
    "v1/namespaces": _info("Namespace", namespaced=False, verbs={"list", "watch", "get"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": _info(
        "CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}
    ),
}


class _Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the API server's name generation (``generateName``)."""

    async def _handle(self, request: kmock.Request) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        return await super()._handle(request)


class EmulatedCluster:
    """``with EmulatedCluster() as c:`` serves the API at ``c.url`` until the block ends."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._emulator: _Emulator | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = self._emulator = _Emulator()
        for key, info in RESOURCES.items():
            emulator.resources[key] = info
        async with emulator, kmock.Server(emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def requests(self) -> list[tuple[str, str]]:
        """(METHOD, path) of every request served so far, oldest first."""
        assert self._emulator is not None
        return [(str(r.method.value), r.url.path) for r in list(self._emulator)]

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [
                {
                    "name": "kmock",
                    "context": {"cluster": "kmock", "user": "test", "namespace": namespace},
                }
            ],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(doc))
        return path


def api(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def apply(api_client: client.ApiClient, objs: list[dict[str, Any]]) -> None:
    """Create every object as an API server would store it (see the module doc): custom
    objects validated against their CRD and defaulted, a uid and resourceVersion on each,
    Deployments without replicas defaulted to 1."""
    from tests.operators import schema

    plurals = {(key.rsplit("/", 1)[0], info.kind): key for key, info in RESOURCES.items()}
    for obj in objs:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        if obj["kind"] == "SluiceScaler":
            schema.validate(obj)
            obj = schema.with_defaults(schema.schema(), obj)
        if obj["kind"] == "Deployment":
            obj["spec"].setdefault("replicas", 1)
        key = plurals[(obj["apiVersion"], obj["kind"])]
        prefix, plural = key.rsplit("/", 1)
        base = "/api/v1" if prefix == "v1" else f"/apis/{prefix}"
        api_client.call_api(
            f"{base}/namespaces/{meta['namespace']}/{plural}",
            "POST",
            body=obj,
            header_params={"Content-Type": "application/json"},
            _preload_content=False,
        )


class Kubelet:
    """Plays the Deployment controller and kubelet: every Deployment's pods become ready as
    soon as they are asked for (status.replicas/readyReplicas follow spec.replicas)."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self._apps = client.AppsV1Api(api_client)
        self._namespace = namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for d in self._apps.list_namespaced_deployment(self._namespace).items:
                want = d.spec.replicas or 0
                if (d.status.ready_replicas if d.status else None) != want:
                    self._apps.patch_namespaced_deployment_status(
                        d.metadata.name,
                        self._namespace,
                        {
                            "status": {
                                "replicas": want,
                                "readyReplicas": want,
                                "availableReplicas": want,
                                "updatedReplicas": want,
                            }
                        },
                    )


T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], what: str, timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
