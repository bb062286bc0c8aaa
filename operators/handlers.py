"""kopf wiring: the handlers are small, typed, and built around one ``OperatorApp``.

Handlers are registered on a registry of their own (``build_registry``), closing over the
app, so the process holds no module-level clients and a test can run the operator with its
own settings (kopf.testing.KopfRunner(..., registry=..., settings=...)).

- login: in-cluster service account, else kubeconfig ($KUBECONFIG read at login time);
- startup/cleanup: the /metrics endpoint and the Kafka and Kubernetes clients;
- one timer per SluiceScaler, every ``reconcile_interval_seconds``: the level-based pass
  (``operators.reconcile``). It is a sync handler (kopf runs it in a worker thread): the
  official Kubernetes client and kafka-python are blocking. Its status goes through kopf's
  ``patch`` (merge-patched into the status subresource), its events through kopf.event.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from operators import GROUP, PLURAL, VERSION
from operators.actuator import KubeActuator, api_client
from operators.lag import KafkaLagSource
from operators.metrics import OperatorMetrics
from operators.reconcile import Reconciler, ScalerRef
from operators.settings import OperatorSettings


@dataclass
class OperatorApp:
    """Everything a running operator holds: settings, clients, metrics, the reconciler."""

    settings: OperatorSettings
    kube: KubeActuator
    lag_source: KafkaLagSource
    metrics: OperatorMetrics
    reconciler: Reconciler

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> OperatorApp:
        kube = KubeActuator(api_client(settings.kubeconfig))
        lag_source = KafkaLagSource(settings.kafka)
        metrics = OperatorMetrics()
        return cls(
            settings, kube, lag_source, metrics, Reconciler(kube, lag_source, metrics, settings)
        )

    def close(self) -> None:
        self.metrics.close()
        self.lag_source.close()
        self.kube.close()


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's own settings for this operator."""
    kset = kopf.OperatorSettings()
    # Watch only the namespaces given; never list namespaces or CRDs cluster-wide (the RBAC
    # does not allow it, and the operator needs no discovery beyond its own resource).
    kset.scanning.disabled = True
    # Post only the events the operator chooses (scale decisions, errors), not log lines.
    kset.posting.loggers = False
    kset.posting.level = logging.INFO
    kset.persistence.finalizer = f"{GROUP}/operator"
    return kset


def build_registry(app: OperatorApp) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(logger: kopf.Logger, **_: Any) -> None:
        if app.settings.metrics_port:
            port = app.metrics.serve(app.settings.metrics_host, app.settings.metrics_port)
            logger.info(f"metrics on {app.settings.metrics_host}:{port}/metrics")

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        app.close()

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=app.settings.reconcile_interval_seconds,
        registry=registry,
    )
    def reconcile(
        body: kopf.Body,
        spec: kopf.Spec,
        status: kopf.Status,
        meta: kopf.Meta,
        patch: kopf.Patch,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        ref = ScalerRef(
            name=str(meta.name), namespace=str(meta.namespace), generation=meta.get("generation")
        )
        # The status kopf hands over can trail the last write by a watch event; the copy kept
        # in memory from the previous pass of this process is never older.
        previous = _newest(dict(status), memo.get("status"))
        result = app.reconciler.reconcile(ref, dict(spec), previous, dt.datetime.now(dt.UTC))
        memo["status"] = result.status
        for key, value in result.status.items():
            patch.status[key] = value
        for event in result.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, optional=True)
    def deleted(meta: kopf.Meta, **_: Any) -> None:
        # The target keeps its replicas (as when an HPA is deleted); only the series go.
        app.metrics.forget(str(meta.namespace), str(meta.name))

    return registry


def _newest(status: dict[str, Any], remembered: dict[str, Any] | None) -> dict[str, Any]:
    if remembered is None:
        return status

    def stamp(s: dict[str, Any]) -> str:
        return str((s.get("sample") or {}).get("sampledAt") or "")

    return remembered if stamp(remembered) >= stamp(status) else status
