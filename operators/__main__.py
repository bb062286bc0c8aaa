"""``python -m operators [-n NAMESPACE ...] [--all-namespaces]``: run the operator.

Settings come from ``SLUICE_OPERATOR_*`` environment variables (operators.settings); the flags
override the watched namespaces. One replica runs at a time (the chart's Deployment uses the
Recreate strategy), so kopf runs standalone, without peering.
"""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from operators.handlers import OperatorApp, build_registry, kopf_settings
from operators.settings import OperatorSettings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m operators", description=__doc__)
    ap.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)"
    )
    ap.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    args = ap.parse_args(argv)

    settings = OperatorSettings()
    namespaces = args.namespace or settings.namespaces
    if args.all_namespaces and args.namespace:
        ap.error("--namespace and --all-namespaces exclude each other")
    kopf.configure(verbose=settings.log_level.upper() == "DEBUG")
    logging.getLogger().setLevel(settings.log_level.upper())

    app = OperatorApp.from_settings(settings)
    liveness = (
        f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    )
    kopf.run(
        registry=build_registry(app),
        settings=kopf_settings(settings),
        standalone=True,
        clusterwide=args.all_namespaces or not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
