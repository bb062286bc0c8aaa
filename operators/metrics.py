"""The operator's Prometheus metrics, on a registry of its own (no process-global state).

Labels are the namespace and the SluiceScaler (named after the stage Deployment it scales):
bounded by what is deployed, never per message or per pod.
"""

from __future__ import annotations

import contextlib
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

_STAGE = ("namespace", "scaler")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.desired_replicas = Gauge(
            "sluice_operator_desired_replicas",
            "Replicas the planner wants for a stage.",
            _STAGE,
            registry=self.registry,
        )
        self.replicas = Gauge(
            "sluice_operator_replicas",
            "Replicas the stage's Deployment asks for now (ready + warming).",
            _STAGE,
            registry=self.registry,
        )
        self.ready_replicas = Gauge(
            "sluice_operator_ready_replicas",
            "Ready pods of a stage's Deployment.",
            _STAGE,
            registry=self.registry,
        )
        self.lag = Gauge(
            "sluice_operator_lag",
            "Messages the stage's consumer group is behind on its input topic.",
            _STAGE,
            registry=self.registry,
        )
        self.consumption_rate = Gauge(
            "sluice_operator_consumption_rate_per_replica",
            "Smoothed messages/s one busy replica consumes (0 until measured).",
            _STAGE,
            registry=self.registry,
        )
        self.lag_source_up = Gauge(
            "sluice_operator_lag_source_up",
            "1 if the last offset read for the stage succeeded, else 0.",
            _STAGE,
            registry=self.registry,
        )
        self.scale_events = Counter(
            "sluice_operator_scale_events",
            "Replica changes made, by direction (up|down).",
            (*_STAGE, "direction"),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "sluice_operator_reconcile_errors",
            "Failed reconcile steps, by kind (spec|kubernetes|lag_source).",
            ("namespace", "scaler", "kind"),
            registry=self.registry,
        )
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def forget(self, namespace: str, scaler: str) -> None:
        """Drop the series of a scaler that no longer exists."""
        labels = (namespace, scaler)
        for gauge in (
            self.desired_replicas,
            self.replicas,
            self.ready_replicas,
            self.lag,
            self.consumption_rate,
            self.lag_source_up,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for counter, values in (
            (self.scale_events, ("up", "down")),
            (self.reconcile_errors, ("spec", "kubernetes", "lag_source")),
        ):
            for value in values:
                with contextlib.suppress(KeyError):
                    counter.remove(*labels, value)
