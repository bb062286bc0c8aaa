"""Every query of the shipped Grafana dashboard returns data from real services.

A real scoring service process (gRPC + Kafka worker + /metrics) curates a small corpus
from the real broker (with one garbage message for the dead-letter panel and one gRPC
call for the request panel); a real dedup worker (state in real Redis) reads the same
corpus, which carries exact and near duplicates; a real sink worker commits scoring's
output as Parquet shards to a folder; a real Prometheus server scrapes all three; each
dashboard expression is then evaluated by that Prometheus.
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
from tests.support.servers import Server, free_port, start_prometheus, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts/sluice/files/dashboards/sluice-overview.json"
N = 48
# Stage-specific metrics without labels (or gauges) exist from process start: for their
# panels a finite value proves only that the process was scraped, so they must be positive,
# i.e. show the work this test made the stage do.
MUST_MOVE = ("sluice_dedup_", "sluice_sink_")


def _stage(module: str, mode: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as log_f:
        return subprocess.Popen(
            [sys.executable, "-m", module, mode],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log_f,
            stderr=subprocess.STDOUT,
        )


def _queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _has_data(expr: str, result: list[dict[str, Any]]) -> bool:
    values = [float(r["value"][1]) for r in result]
    if any(m in expr for m in MUST_MOVE):
        return any(math.isfinite(v) and v > 0 for v in values)
    return any(math.isfinite(v) for v in values)


def test_every_dashboard_query_returns_data(
    kafka_bootstrap: str, redis_server: Server, tmp_path: Path
) -> None:
    ingest, out, group = unique("dash-in"), unique("dash-out"), unique("dash-grp")
    deduped = unique("dash-dedup")
    topics = [ingest, out, f"{ingest}.dlq", deduped, f"{deduped}.dropped"]
    ensure_topics(kafka_bootstrap, topics, partitions=2)
    docs = [ln for ln in Path(datapath("lee_background.cor")).read_text().splitlines() if ln]
    real = [Sample(id=f"d{i}", text=" ".join(docs[i].split()[:80])) for i in range(N - 8)]
    junk = [Sample(id=f"j{i}", text="click here buy now " * 20) for i in range(8)]
    # A near duplicate: one word appended (one 5-gram of ~77 differs, Jaccard ~0.99).
    near = [Sample(id=f"n{i}", text=f"{real[i].text} indeed") for i in (0, N // 2)]
    # Two waves: Prometheus must scrape between them, or a fast worker could finish before
    # the first scrape and every rate (and so every histogram quantile) would be empty.
    # Each wave has exact (junk) and near duplicates, so dedup's per-level series exist
    # before the second wave and their rates move with it.
    first = real[: N // 2] + junk[:4] + near[:1]
    second = real[N // 2 :] + junk[4:] + near[1:]
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
    service = _stage("services.scoring", "all", env, log)
    dedup_metrics_port = free_port()
    dedup_env = {
        "SLUICE_DEDUP_STATE__BACKEND": "redis",
        "SLUICE_DEDUP_STATE__REDIS_URL": f"redis://{redis_server.address}/0",
        "SLUICE_DEDUP_STATE__KEY_PREFIX": f"{deduped}:",
        "SLUICE_DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SLUICE_DEDUP_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_DEDUP_KAFKA__OUTPUT_TOPIC": deduped,
        "SLUICE_DEDUP_KAFKA__GROUP_ID": unique("dash-dedup-grp"),
        "SLUICE_DEDUP_METRICS__PORT": str(dedup_metrics_port),
    }
    dedup_log = tmp_path / "dedup.log"
    dedup = _stage("services.dedup", "worker", dedup_env, dedup_log)
    sink_metrics_port = free_port()
    sink_env = {
        "SLUICE_SINK_DIRECTORY": str(tmp_path / "corpus"),
        "SLUICE_SINK_ROLL__MAX_SECONDS": "1",
        "SLUICE_SINK_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SLUICE_SINK_KAFKA__INPUT_TOPIC": out,
        "SLUICE_SINK_KAFKA__GROUP_ID": unique("dash-sink-grp"),
        "SLUICE_SINK_METRICS__PORT": str(sink_metrics_port),
    }
    sink_log = tmp_path / "sink.log"
    sink = _stage("services.sink", "worker", sink_env, sink_log)
    ports = (metrics_port, dedup_metrics_port, sink_metrics_port)
    prom = start_prometheus([f"127.0.0.1:{p}" for p in ports])
    try:
        wait_port(dedup_metrics_port, timeout=60, proc=dedup)
        wait_port(sink_metrics_port, timeout=60, proc=sink)
        wait_port(metrics_port, timeout=60, proc=service)
        wait_port(grpc_port, timeout=120, proc=service)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            request = scoring_pb2.ScoreRequest(signals=["heuristics"])
            request.samples.add(id="g", text=docs[0])
            stub.Score(request, timeout=60)
        kept = read_topic(kafka_bootstrap, out, expect=1, timeout_s=180)
        assert kept, log.read_text()[-3000:]
        unique_first = read_topic(kafka_bootstrap, deduped, expect=1, timeout_s=60)
        assert unique_first, dedup_log.read_text()[-3000:]
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
                if not _has_data(expr, _query(prom.address, expr.replace("$__rate_interval", "2m")))
            ]
            if not missing:
                break
            time.sleep(2)
        logs = "".join(f"\n--- {f.name}\n{f.read_text()[-2000:]}" for f in (dedup_log, sink_log))
        assert not missing, "dashboard queries without data:\n" + "\n".join(missing) + logs
        # The lag panel covers the sink too (its own Kafka loop sets the stage gauge).
        lag = _query(prom.address, 'sluice_stage_consumer_lag{stage="sink"}')
        assert {r["metric"].get("topic") for r in lag} >= {out}, lag
        # Dedup's panels break duplicates down by the level that found them: both planted.
        for title, expr in _queries():
            if "sluice_dedup_duplicates_total" in expr:
                result = _query(prom.address, expr.replace("$__rate_interval", "2m"))
                assert {r["metric"].get("level") for r in result} == {"exact", "near"}, title
    finally:
        prom.stop()
        for proc in (service, dedup, sink):
            proc.terminate()
        for proc in (service, dedup, sink):
            proc.wait(30)
