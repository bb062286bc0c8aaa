"""Write the Grafana dashboard shipped in the chart from one list of panels.

``python scripts/build_dashboard.py`` regenerates
``charts/sluice/files/dashboards/sluice-overview.json``; ``--check`` exits 1 when the file
is stale (tests/deploy/test_static_files.py runs it). Panels are declared here rather than
edited as JSON so every query stays readable and reviewable; tests/integration/test_dashboard.py
runs each query against a real Prometheus scraping real services.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "charts/sluice/files/dashboards/sluice-overview.json"
WINDOW = "$__rate_interval"

# (title, unit, [(legend, expr)], kind, width)
PANELS: list[tuple[str, str, list[tuple[str, str]], str, int]] = [
    (
        "Samples in / out per stage (per second)",
        "ops",
        [
            (
                "{{stage}} {{transport}} in",
                f"sum by (stage, transport) (rate(sluice_stage_samples_in_total[{WINDOW}]))",
            ),
            (
                "{{stage}} {{transport}} out",
                f"sum by (stage, transport) (rate(sluice_stage_samples_out_total[{WINDOW}]))",
            ),
        ],
        "timeseries",
        12,
    ),
    (
        "Retention per stage (kept / in)",
        "percentunit",
        [
            (
                "{{stage}} {{transport}} samples",
                f"sum by (stage, transport) (rate(sluice_stage_samples_out_total[{WINDOW}])) / "
                f"sum by (stage, transport) (rate(sluice_stage_samples_in_total[{WINDOW}]))",
            ),
            (
                "{{stage}} {{transport}} tokens",
                f"sum by (stage, transport) (rate(sluice_stage_tokens_out_total[{WINDOW}])) / "
                f"sum by (stage, transport) (rate(sluice_stage_tokens_in_total[{WINDOW}]))",
            ),
        ],
        "timeseries",
        12,
    ),
    (
        "Drops by reason (per second)",
        "ops",
        [
            (
                "{{stage}} {{reason}}",
                f"sum by (stage, reason) (rate(sluice_stage_samples_dropped_total[{WINDOW}]))",
            )
        ],
        "timeseries",
        12,
    ),
    (
        "Samples per step and outcome (per second)",
        "ops",
        [
            (
                "{{stage}}/{{step}} {{outcome}}",
                f"sum by (stage, step, outcome) (rate(sluice_step_samples_total[{WINDOW}]))",
            )
        ],
        "timeseries",
        12,
    ),
    (
        "Ask-LLM P(yes): median and 10th/90th percentiles",
        "none",
        [
            (
                f"{{{{stage}}}} p{q}",
                f"histogram_quantile(0.{q}, sum by (stage, le) "
                f"(rate(sluice_score_ask_llm_bucket[{WINDOW}])))",
            )
            for q in (10, 50, 90)
        ],
        "timeseries",
        12,
    ),
    (
        "Perplexity: median and 90th percentile",
        "none",
        [
            (
                f"{{{{stage}}}} p{q}",
                f"histogram_quantile(0.{q}, sum by (stage, le) "
                f"(rate(sluice_score_perplexity_bucket[{WINDOW}])))",
            )
            for q in (50, 90)
        ],
        "timeseries",
        12,
    ),
    (
        "Batch latency p50 / p95",
        "s",
        [
            (
                f"{{{{stage}}}} p{q}",
                f"histogram_quantile(0.{q}, sum by (stage, le) "
                f"(rate(sluice_stage_batch_seconds_bucket[{WINDOW}])))",
            )
            for q in (50, 95)
        ],
        "timeseries",
        12,
    ),
    (
        "Consumer lag (messages behind the high watermark)",
        "short",
        [("{{stage}}", "sum by (stage) (sluice_stage_consumer_lag)")],
        "timeseries",
        12,
    ),
    (
        "Dead-lettered messages (last hour)",
        "short",
        [
            (
                "{{stage}} {{reason}}",
                "sum by (stage, reason) (increase(sluice_stage_dead_letters_total[1h]))",
            )
        ],
        "timeseries",
        12,
    ),
    (
        "gRPC requests by method and code (per second)",
        "reqps",
        [
            (
                "{{stage}} {{method}} {{code}}",
                f"sum by (stage, method, code) (rate(sluice_grpc_requests_total[{WINDOW}]))",
            )
        ],
        "timeseries",
        12,
    ),
    (
        "Dedup: duplicates dropped per level (per second)",
        "ops",
        [
            (
                "{{level}} {{transport}}",
                f"sum by (level, transport) (rate(sluice_dedup_duplicates_total[{WINDOW}]))",
            )
        ],
        "timeseries",
        12,
    ),
    (
        "Dedup: duplicate share of samples in, per level",
        "percentunit",
        [
            (
                "{{level}} {{transport}}",
                f"sum by (level, transport) (rate(sluice_dedup_duplicates_total[{WINDOW}])) "
                "/ ignoring (level) group_left sum by (transport) "
                f'(rate(sluice_stage_samples_in_total{{stage="dedup"}}[{WINDOW}]))',
            )
        ],
        "timeseries",
        12,
    ),
    # Every replica reports the size of the one shared store (Redis): max, not sum.
    (
        "Dedup: state keys (shared store)",
        "short",
        [("keys", "max(sluice_dedup_state_keys)")],
        "timeseries",
        12,
    ),
    (
        "Dedup: state bytes (shared store)",
        "bytes",
        [("bytes", "max(sluice_dedup_state_bytes)")],
        "timeseries",
        12,
    ),
    # The sink: what a trainer can read (committed by a manifest) and how fresh it is.
    (
        "Sink: rows, shards and manifests committed (per second)",
        "ops",
        [
            (name, f"sum(rate(sluice_sink_{metric}_total[{WINDOW}]))")
            for name, metric in (
                ("rows", "rows_written"),
                ("shards", "files_committed"),
                ("manifests", "manifests_committed"),
            )
        ],
        "timeseries",
        12,
    ),
    (
        "Sink: bytes committed (per second, compressed as stored)",
        "Bps",
        [("bytes", f"sum(rate(sluice_sink_written_bytes_total[{WINDOW}]))")],
        "timeseries",
        12,
    ),
    (
        "Sink: commit latency p50 / p95",
        "s",
        [
            (
                f"p{q}",
                f"histogram_quantile(0.{q}, sum by (le) "
                f"(rate(sluice_sink_commit_seconds_bucket[{WINDOW}])))",
            )
            for q in (50, 95)
        ],
        "timeseries",
        12,
    ),
    (
        "Sink: seconds since each writer's last commit (dataset freshness)",
        "s",
        [
            (
                "{{writer}}",
                "time() - max by (writer) (sluice_sink_last_commit_timestamp_seconds)",
            )
        ],
        "timeseries",
        12,
    ),
]


def _panel(
    i: int, title: str, unit: str, targets: list[tuple[str, str]], kind: str, w: int
) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": w, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + j),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for j, (legend, expr) in enumerate(targets)
        ],
    }


def build(
    panels: list[tuple[str, str, list[tuple[str, str]], str, int]] = PANELS,
) -> dict[str, Any]:
    return {
        "uid": "sluice-overview",
        "title": "Sluice: curation pipeline",
        "description": "Throughput, retention, drops, scores, latency, lag and replicas per stage.",
        "tags": ["sluice", "data-curation"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": [_panel(i, *p) for i, p in enumerate(panels)],
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
