"""Process lifecycle of a stage: metrics endpoint, gRPC server and/or Kafka stage worker,
wired to one core, stopped together on SIGTERM. The one entry point of every stage
(``python -m services.<kind>``, ``sluice serve <kind>``): each stage's ``__main__`` only
names its kind; what differs between stages is declared in the registry."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from services.runtime.errors import SluiceError
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.kafka_stage import StageWorker
from services.runtime.metrics import StageMetrics, serve_metrics
from services.runtime.registry import StageSpec, Worker, consumer_group, stage
from services.runtime.settings import ServiceSettings, load_settings
from services.runtime.stage import StageCore

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """The service process's logging, at ``settings.log_level``. The root logger's level is
    set even when it has handlers already: whoever started the process may have configured
    logging first (``sluice serve`` sets WARNING for its one-shot commands), and
    ``basicConfig`` alone then leaves that level, hiding every INFO line of a service run at
    INFO."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())


def make_worker(
    spec: StageSpec, core: StageCore, settings: ServiceSettings, metrics: StageMetrics
) -> Worker:
    """The stage's Kafka worker: its declared one, else the runtime loop committing the
    group the registry names."""
    if spec.worker:
        return spec.make_worker(core, settings, metrics)
    return stage_worker(spec.name, core, settings, metrics)


def stage_worker(
    kind: str,
    core: StageCore,
    settings: ServiceSettings,
    metrics: StageMetrics,
    **extra: Any,
) -> StageWorker:
    """The runtime loop for stage ``kind``, committing the group the registry names, its batch
    ids naming the core's model and the settings' decision fingerprint. ``extra``: what a
    stage's own worker adds (``state``, ``commit_state``)."""
    kafka = settings.kafka.model_copy(update={"group_id": consumer_group(kind, settings)})
    return StageWorker(
        core,
        kafka,
        metrics,
        stage=kind,
        dropped_topic=settings.dropped_topic_name,
        decision_version=f"{core.model_version}+config.{settings.decision_fingerprint()}",
        **extra,
    )


def run_service(kind: str, settings: ServiceSettings, mode: str = "all") -> int:
    """Run stage ``kind`` until SIGTERM/SIGINT. ``serve``: gRPC only; ``worker``: Kafka only;
    ``all``: both, sharing the core (and its loaded model). A worker that finishes on its own
    (density's pass 1 returns once its input is drained and its part published) ends a
    ``worker`` process; in ``all`` the gRPC API stays up until stopped. Modes a stage declares
    in ``commands`` (density's ``merge``) run once and exit."""
    spec = stage(kind)
    configure_logging(settings.log_level)
    metrics = StageMetrics(kind)
    core = spec.build_core(settings, metrics)  # metrics bound once, in every mode
    if mode in spec.commands:
        return spec.command(mode)(core, settings)
    if mode not in ("serve", "worker", "all"):
        raise SluiceError(f"unknown mode {mode!r} for {kind}; known: {', '.join(spec.modes)}")
    # The worker first: a configuration error (no store, no sketch) is found before serving.
    worker = make_worker(spec, core, settings, metrics) if mode in ("worker", "all") else None
    if settings.metrics.enabled:
        _srv, port = serve_metrics(metrics, settings.metrics.host, settings.metrics.port)
        log.info("metrics on %s:%d/metrics", settings.metrics.host, port)
    server: RunningServer | None = None
    if mode in ("serve", "all"):
        server = serve(settings.grpc, spec.make_register(core, metrics), metrics=metrics)
    stop = threading.Event()

    def _on_signal(*_: object) -> None:
        stop.set()
        if worker is not None:
            worker.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if worker is not None:
            worker.run()  # returns once stopped, or when a finite pass is done
        if worker is None or mode == "all":
            stop.wait()
    finally:
        if server is not None:
            server.stop()
    return 0


def main(kind: str, argv: list[str] | None = None) -> int:
    """``python -m services.<kind> [MODE] [--config FILE]``: the process a container runs."""
    spec = stage(kind)
    ap = argparse.ArgumentParser(
        prog=f"python -m services.{kind}",
        description=f"The {kind} stage: {spec.description}. serve = gRPC only, worker = "
        "Kafka only, all = both sharing one core"
        + "".join(f"; {m} = a one-shot command" for m in spec.commands)
        + ".",
    )
    ap.add_argument("mode", nargs="?", default="all", choices=spec.modes)
    ap.add_argument("--config", help=f"YAML settings file (env {spec.env_prefix}* overrides it)")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(spec.settings_class(), args.config)
        return run_service(kind, settings, args.mode)
    except SluiceError as exc:  # a configuration or dependency problem: say it, no traceback
        log.error("%s %s: %s: %s", kind, args.mode, type(exc).__name__, exc.message)
        print(f"{kind} {args.mode}: {exc.message}", file=sys.stderr)
        return 2
