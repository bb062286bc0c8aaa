"""``python -m services.density [serve|worker|all|merge] [--config FILE]``: the density
service process (what the container runs).

serve   the gRPC API only         worker  the Kafka stage in the configured mode
all     both, sharing one core    merge   merge the parts of sketch.version, then exit
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from services.density.core import STAGE
from services.density.grpc_service import register
from services.density.settings import DensitySettings
from services.density.worker import DensityWorker, build_core, merge_command, store_of
from services.runtime.app import configure_logging
from services.runtime.errors import SluiceError
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics, serve_metrics
from services.runtime.settings import load_settings

log = logging.getLogger(__name__)

MODES = ("serve", "worker", "all", "merge")


def run(settings: DensitySettings, mode: str) -> int:
    configure_logging(settings.log_level)
    core = build_core(settings)
    store = store_of(core)
    if mode == "merge":
        return merge_command(core, settings)
    metrics = StageMetrics(STAGE)
    # The worker first: a missing store is a configuration error, found before serving.
    worker = DensityWorker(core, metrics, store) if mode in ("worker", "all") else None
    if settings.metrics.enabled:
        _srv, port = serve_metrics(metrics, settings.metrics.host, settings.metrics.port)
        log.info("metrics on :%d/metrics", port)
    server: RunningServer | None = None
    if mode in ("serve", "all"):
        server = serve(settings.grpc, register(core, metrics), metrics=metrics)
    stop = threading.Event()

    def _on_signal(*_: object) -> None:
        stop.set()
        if worker is not None:
            worker.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if worker is not None:
            worker.run()  # pass 1 returns once drained and published
        if worker is None or mode == "all":
            stop.wait()
    finally:
        if server is not None:
            server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m services.density",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("mode", nargs="?", default="all", choices=MODES)
    ap.add_argument("--config", help="YAML settings file (env SLUICE_DENSITY_* overrides it)")
    args = ap.parse_args(argv)
    try:
        return run(load_settings(DensitySettings, args.config), args.mode)
    except SluiceError as exc:  # a configuration or dependency problem: say it, no traceback
        log.error("density %s: %s: %s", args.mode, type(exc).__name__, exc.message)
        print(f"density {args.mode}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
