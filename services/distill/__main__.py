"""``python -m services.distill [serve|worker|all] [--config FILE]``: the distillation
service process (what the container runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc

from services.distill.core import STAGE
from services.distill.grpc_service import register
from services.distill.settings import DistillSettings
from services.distill.store import build_core
from services.runtime.app import run_service
from services.runtime.metrics import StageMetrics
from services.runtime.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.distill", description=__doc__)
    ap.add_argument("mode", nargs="?", default="all", choices=["serve", "worker", "all"])
    ap.add_argument("--config", help="YAML settings file (env SLUICE_DISTILL_* overrides it)")
    args = ap.parse_args(argv)
    settings = load_settings(DistillSettings, args.config)
    metrics = StageMetrics(STAGE)  # the core records generation tokens and latency in it
    core = build_core(settings, metrics)

    def make_register(m: StageMetrics) -> Callable[[grpc.Server], list[str]]:
        return register(core, m)

    return run_service(STAGE, settings, core, make_register, args.mode, metrics=metrics)


if __name__ == "__main__":
    sys.exit(main())
