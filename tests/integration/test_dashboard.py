"""Every query of the shipped Grafana dashboard returns data from real services.

A real scoring service process (gRPC + Kafka worker + /metrics) curates a small corpus
from the real broker (with one garbage message for the dead-letter panel and one gRPC
call for the request panel); a real Prometheus server scrapes it; each dashboard
expression is then evaluated by that Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from gensim.test.utils import datapath
from kafka import KafkaProducer

from services.gen.sluice.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from services.runtime.domain import Sample
from services.runtime.kafka_stage import ensure_topics, publish
from tests.integration.kafka_util import read_topic, unique
from tests.support.servers import free_port, start_prometheus, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts/sluice/files/dashboards/sluice-overview.json"
N = 48


def _queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_query_returns_data(kafka_bootstrap: str, tmp_path: Path) -> None:
    ingest, out, group = unique("dash-in"), unique("dash-out"), unique("dash-grp")
    ensure_topics(kafka_bootstrap, [ingest, out, f"{ingest}.dlq"], partitions=2)
    docs = [ln for ln in Path(datapath("lee_background.cor")).read_text().splitlines() if ln]
    samples = [Sample(id=f"d{i}", text=" ".join(docs[i].split()[:80])) for i in range(N - 8)]
    samples += [Sample(id=f"j{i}", text="click here buy now " * 20) for i in range(8)]
    # Two waves: Prometheus must scrape between them, or a fast worker could finish before
    # the first scrape and every rate (and so every histogram quantile) would be empty.
    first, second = samples[: N // 2], samples[N // 2 :]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, ingest, first, batch_size=8)

    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SLUICE_SCORING_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_SCORING_KAFKA__OUTPUT_TOPIC": out,
        "SLUICE_SCORING_KAFKA__GROUP_ID": group,
        "SLUICE_SCORING_GRPC__PORT": str(grpc_port),
        "SLUICE_SCORING_METRICS__PORT": str(metrics_port),
        "SLUICE_SCORING_MODEL__MAX_TOKENS": "96",
    }
    log = tmp_path / "service.log"
    with open(log, "wb") as log_f:
        service = subprocess.Popen(
            [sys.executable, "-m", "services.scoring", "all"],
            cwd=ROOT,
            env=env,
            stdout=log_f,
            stderr=subprocess.STDOUT,
        )
    prom = start_prometheus([f"127.0.0.1:{metrics_port}"])
    try:
        wait_port(metrics_port, timeout=60, proc=service)
        wait_port(grpc_port, timeout=120, proc=service)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            request = scoring_pb2.ScoreRequest(signals=["heuristics"])
            request.samples.add(id="g", text=docs[0])
            stub.Score(request, timeout=60)
        kept = read_topic(kafka_bootstrap, out, expect=1, timeout_s=180)
        assert kept, log.read_text()[-3000:]
        time.sleep(3)  # > 2 scrape intervals: the first wave's series are in Prometheus
        publish(producer, ingest, second, batch_size=8)
        producer.send(ingest, value=b"\x00not a batch").get(timeout=30)
        producer.close()
        more = read_topic(kafka_bootstrap, out, expect=len(kept) + 1, timeout_s=180)
        assert len(more) > len(kept), log.read_text()[-3000:]

        # Rates need two scrapes after the work: poll until every query has data.
        missing: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            missing = [
                f"{title}: {expr}"
                for title, expr in _queries()
                if not _has_finite_value(
                    _query(prom.address, expr.replace("$__rate_interval", "2m"))
                )
            ]
            if not missing:
                break
            time.sleep(2)
        assert not missing, "dashboard queries without data:\n" + "\n".join(missing)
    finally:
        prom.stop()
        service.terminate()
        service.wait(30)
