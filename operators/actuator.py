"""Every Kubernetes API call the operator makes on workloads, through the official client.

Two calls, as the HPA makes them: read the target Deployment (its asked-for and ready
replicas) and set its replicas through the ``scale`` subresource. The operator never
creates, patches or deletes a workload, and never creates pods: the chart renders the
Deployment and owns everything in it but the replica count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


@dataclass(frozen=True)
class TargetState:
    replicas: int
    """Replicas the Deployment asks for (ready + warming)."""
    ready_replicas: int


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

    def close(self) -> None:
        self._api.close()

    def target(self, namespace: str, name: str) -> TargetState | None:
        """The Deployment's replica counts; None when it does not exist (yet)."""
        try:
            resp = self._apps.read_namespaced_deployment(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        obj = json.loads(resp.data)
        # An omitted spec.replicas is defaulted to 1 by the API server.
        replicas = (obj.get("spec") or {}).get("replicas")
        ready = (obj.get("status") or {}).get("readyReplicas") or 0
        return TargetState(replicas=1 if replicas is None else int(replicas), ready_replicas=ready)

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource (what the HPA does)."""
        self._apps.patch_namespaced_deployment_scale(
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
