"""``python -m services.scoring [serve|worker|all] [--config FILE]``: the scoring
service process (what the container runs)."""

from __future__ import annotations

import argparse
import sys

from services.runtime.app import run_service
from services.runtime.settings import load_settings
from services.scoring.core import STAGE, ScoringCore
from services.scoring.grpc_service import register
from services.scoring.settings import ScoringSettings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.scoring", description=__doc__)
    ap.add_argument("mode", nargs="?", default="all", choices=["serve", "worker", "all"])
    ap.add_argument("--config", help="YAML settings file (env SLUICE_SCORING_* overrides it)")
    args = ap.parse_args(argv)
    settings = load_settings(ScoringSettings, args.config)
    core = ScoringCore(settings)
    return run_service(
        STAGE,
        settings,
        core,
        lambda m: register(core, m),
        args.mode,
        dropped_topic=settings.dropped_topic,
    )


if __name__ == "__main__":
    sys.exit(main())
