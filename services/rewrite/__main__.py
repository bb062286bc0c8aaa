"""``python -m services.rewrite [serve|worker|all] [--config FILE]``: the rewriting
service process (what the container runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc

from services.rewrite.core import STAGE, RewriteCore
from services.rewrite.grpc_service import register
from services.rewrite.settings import RewriteSettings
from services.runtime.app import run_service
from services.runtime.metrics import StageMetrics
from services.runtime.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.rewrite", description=__doc__)
    ap.add_argument("mode", nargs="?", default="all", choices=["serve", "worker", "all"])
    ap.add_argument("--config", help="YAML settings file (env SLUICE_REWRITE_* overrides it)")
    args = ap.parse_args(argv)
    settings = load_settings(RewriteSettings, args.config)
    core = RewriteCore(settings)
    # The core records generation and per-step counts itself, in every mode (worker too).
    metrics = StageMetrics(STAGE)
    core.bind_metrics(metrics)

    def make_register(m: StageMetrics) -> Callable[[grpc.Server], list[str]]:
        return register(core, m)

    return run_service(
        STAGE,
        settings,
        core,
        make_register,
        args.mode,
        dropped_topic=settings.dropped_topic,
        metrics=metrics,
    )


if __name__ == "__main__":
    sys.exit(main())
