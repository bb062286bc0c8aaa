"""From corpus to trainer on real servers: a corpus published from a real S3 server
(moto: JSONL.gz, JSONL.zst and Parquet objects, one without ids), scored by the heuristics
stage worker over the real broker (exactly-once), and written out by
``python -m services.sink worker`` to the same S3 server. The sink is SIGKILLed right after
its first manifest commits, mid-stream, and restarted: the committed shards must then hold
every kept sample exactly once (no duplicate, none missing), no uncommitted shard may be
left under the dataset's prefix, the manifests' per-stage retention must account for every
published sample, and the shards must load with HF ``datasets`` and ``pyarrow.dataset``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from pydantic import SecretStr

from services.cli import main as sluice
from services.demo.corpus import build_demo_corpus
from services.runtime.app import make_worker
from services.runtime.kafka_stage import ensure_topics
from services.runtime.metrics import StageMetrics
from services.runtime.objectstore import ObjectStore
from services.runtime.registry import stage
from services.runtime.settings import KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from services.sink.reader import committed_files, summary
from services.sink.settings import SinkStoreSettings
from services.sink.target import S3Target
from tests.integration.kafka_util import decode_all, read_topic, unique
from tests.support.servers import Server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


def _upload_corpus(store: ObjectStore, bucket: str) -> int:
    """Three shards of the demo corpus (real news and generated junk) in three formats;
    the Parquet one has no id column. Returns the number of records."""
    recs = build_demo_corpus(seed=0)
    rows = [{"id": r.id, "text": r.text, "source": r.source} for r in recs]
    a, b, c = rows[:150], rows[150:250], rows[250:]
    jsonl = lambda part: "".join(json.dumps(r) + "\n" for r in part).encode()  # noqa: E731
    client = store.client
    for key, data in (
        ("in/a.jsonl.gz", gzip.compress(jsonl(a))),
        ("in/b.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl(b))),
        ("in/README.txt", b"not a corpus file"),
    ):
        client.put_object(bucket, key, io.BytesIO(data), len(data))
    buf = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist([{"text": r["text"], "source": r["source"]} for r in c]), buf
    )
    data = buf.getvalue()
    client.put_object(bucket, "in/c.parquet", io.BytesIO(data), len(data))
    return len(rows)


def _sink(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.sink", "worker", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, **KEYS},
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait(cond, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            pytest.fail(
                f"sink exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_s3_corpus_scored_and_sunk_exactly_once_across_a_kill9(
    kafka_bootstrap: str, s3_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    bucket = unique("corpus")
    store_settings = SinkStoreSettings(
        endpoint=s3_server.address,
        bucket=bucket,
        prefix="curated/v1",
        secure=False,
        access_key=SecretStr("test"),
        secret_key=SecretStr("test"),
        create_bucket=True,
    )
    store = ObjectStore(store_settings)
    n = _upload_corpus(store, bucket)
    ingest, scored = unique("ingest"), unique("scored")
    dropped = f"{scored}.dropped"
    ensure_topics(kafka_bootstrap, [ingest, scored, dropped, f"{ingest}.dlq"], partitions=2)

    # 1. publish from S3, resumable: a second run with the same checkpoint sends nothing
    args = [
        "publish", f"s3://{bucket}/in/", "--topic", ingest, "--bootstrap", kafka_bootstrap,
        "--s3-endpoint", s3_server.address, "--s3-insecure", "--batch-size", "10",
        "--checkpoint", str(tmp_path / "publish.json"), "--no-progress",
    ]  # fmt: skip
    assert sluice(args) == 0
    assert sluice(args) == 0
    ckpt = json.loads((tmp_path / "publish.json").read_text())
    assert len(ckpt["done"]) == 3 and not any(u.endswith(".txt") for u in ckpt["done"])

    # 2. heuristics scoring over the real broker, exactly-once
    settings = ScoringSettings(
        steps=["heuristics"],
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            input_topic=ingest,
            output_topic=scored,
            group_id=unique("scoring"),
            max_poll_records=2,
            transaction_interval_ms=200,
        ),
    )
    metrics = StageMetrics("scoring")
    core = ScoringCore(settings, metrics=metrics)
    scorer = make_worker(stage("scoring"), core, settings, metrics)
    thread = threading.Thread(target=scorer.run, daemon=True)
    thread.start()

    # 3. the sink, killed right after its first commit, then restarted
    config = tmp_path / "sink.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap_servers": kafka_bootstrap,
                    "input_topic": scored,
                    "group_id": unique("sink"),
                    "max_poll_records": 1,
                },
                "store": {
                    "endpoint": s3_server.address,
                    "bucket": bucket,
                    "prefix": "curated/v1",
                    "secure": False,
                    "create_bucket": True,
                },
                "roll": {"max_bytes": 20000, "max_seconds": 1},
                "count_topics": [dropped],
                "writer_id": "w0",
                "metrics": {"enabled": False},
                "log_level": "INFO",
            }
        )
    )
    target = S3Target(store_settings, store)
    manifests = lambda: target.keys("_manifests/")  # noqa: E731
    log = tmp_path / "sink.log"
    first = _sink(config, log)
    try:
        _wait(lambda: len(manifests()) >= 1, 90, "the first manifest", first, log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = len(manifests())

    def accounted() -> bool:
        s = summary(target)
        sc = s["retention"].get("scoring", {})
        return sc.get("kept", 0) + sc.get("dropped", 0) >= n

    second = _sink(config, log)
    try:
        _wait(accounted, 120, "every published sample accounted for", second, log)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()
        scorer.request_stop()
        thread.join(30)

    # what scoring kept, read as a trainer-side reader of the topic would
    s = summary(target)
    kept_n = s["retention"]["scoring"]["kept"]
    out = read_topic(
        kafka_bootstrap, scored, expect=kept_n, count=lambda r: len(decode_all([r])[0].samples)
    )
    kept = [x.id for b in decode_all(out) for x in b.samples]
    assert len(kept) == len(set(kept)) == kept_n
    assert s["retention"]["scoring"]["dropped"] == n - kept_n > 0
    assert s["model_versions"]["scoring"]
    assert len(manifests()) > at_kill >= 1, "the kill was not mid-run"

    # every kept sample exactly once in the committed shards, nothing uncommitted left
    files = committed_files(target)
    local = []
    for i, uri in enumerate(files):
        key = uri.removeprefix(f"s3://{bucket}/")
        p = tmp_path / "shards" / f"{i:04d}.parquet"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(store.get(key))
        local.append(str(p))
    shards = {f"curated/v1/{k}" for k in target.keys("") if k.endswith(".parquet")}
    assert shards == {u.removeprefix(f"s3://{bucket}/") for u in files}
    table = ds.dataset(local, format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a sample was committed twice"
    assert sorted(ids) == sorted(kept)
    assert any(i.startswith("c-") for i in ids)  # generated ids of the Parquet shard
    assert set(table.column("importance_weight").to_pylist()) == {1.0}

    datasets = pytest.importorskip("datasets")
    d = datasets.load_dataset("parquet", data_files=local, split="train")
    assert d.num_rows == kept_n
    assert sorted(d["id"]) == sorted(kept)
    assert all(lin.startswith("scoring:kept") for lin in d["lineage"])
