"""Process lifecycle of a service: metrics endpoint, gRPC server and/or Kafka
stage worker, wired to one core, stopped together on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Literal

import grpc

from services.runtime.grpc_server import serve
from services.runtime.kafka_stage import BatchProcessor, StageWorker
from services.runtime.metrics import StageMetrics, serve_metrics
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

Mode = Literal["serve", "worker", "all"]
Register = Callable[[grpc.Server], list[str]]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_service(
    stage: str,
    settings: ServiceSettings,
    core: BatchProcessor,
    make_register: Callable[[StageMetrics], Register],
    mode: Mode = "all",
    dropped_topic: str = "",
    metrics: StageMetrics | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. ``serve``: gRPC only; ``worker``: Kafka only;
    ``all``: both, sharing the core (and its loaded model). ``metrics``: the process's
    registry, when the core records into it itself (e.g. generation latency)."""
    configure_logging(settings.log_level)
    metrics = metrics or StageMetrics(stage)
    if settings.metrics.enabled:
        _srv, port = serve_metrics(metrics, settings.metrics.host, settings.metrics.port)
        log.info("metrics on :%d/metrics", port)
    stop = threading.Event()
    server = None
    if mode in ("serve", "all"):
        server = serve(settings.grpc, make_register(metrics), metrics=metrics)
    worker = None
    if mode in ("worker", "all"):
        worker = StageWorker(
            core, settings.kafka, metrics, stage=stage, dropped_topic=dropped_topic
        )

    def _on_signal(*_: object) -> None:
        stop.set()
        if worker is not None:
            worker.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if worker is not None:
            worker.run()  # returns once stopped
        else:
            stop.wait()
    finally:
        if server is not None:
            server.stop()
    return 0
