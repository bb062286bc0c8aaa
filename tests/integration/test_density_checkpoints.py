"""Crash-safe density pass 1 on the real broker and a real S3 server (moto).

A pass-1 worker process is killed with SIGKILL in the middle of a stream that is still being
published, restarted, and left to drain the topic; then the build Job's merge runs (twice:
a re-run is a no-op that exits 0). Under both delivery guarantees:

- the merged sketch counts every published sample once (``n`` = samples published), and its
  counts and calibration sample equal a sketch built in one go over the same data;
- the restarted worker reads exactly the records its partitions' checkpoints did not hold
  (nothing checkpointed is re-read, nothing is skipped).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer
from pydantic import SecretStr

from services.density.core import DensityCore
from services.density.settings import DensitySettings, SketchSettings, StoreSettings
from services.density.store import SketchStore
from services.runtime.kafka_stage import ensure_topics, publish
from tests.integration.kafka_util import unique
from tests.support.servers import Server
from tests.unit.density.mixture import mixture

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHUNKS, PER_CHUNK, PER_BATCH = 30, 20, 4  # 600 samples in 150 messages
SKETCH = {
    "name": "ckpt",
    "version": 1,
    "hash": "pstable",
    "rows": 20,
    "buckets": 256,
    "width": 1.0,
    "seed": 3,
}
CALIBRATION = 64


def _env(
    bootstrap: str, ingest: str, store: StoreSettings, guarantee: str, worker: str, idle_s: float
) -> dict[str, str]:
    assert store.access_key is not None and store.secret_key is not None
    env = {
        **os.environ,
        "SLUICE_DENSITY_MODE": "two_pass_build",
        "SLUICE_DENSITY_WORKER_ID": worker,
        "SLUICE_DENSITY_BUILD_IDLE_TIMEOUT_S": str(idle_s),
        "SLUICE_DENSITY_CALIBRATION_SIZE": str(CALIBRATION),
        "SLUICE_DENSITY_METRICS__ENABLED": "false",
        "SLUICE_DENSITY_STORE__ENDPOINT": store.endpoint,
        "SLUICE_DENSITY_STORE__BUCKET": store.bucket,
        "SLUICE_DENSITY_STORE__SECURE": "false",
        "SLUICE_DENSITY_STORE__CREATE_BUCKET": "true",
        "SLUICE_DENSITY_STORE__ACCESS_KEY": store.access_key.get_secret_value(),
        "SLUICE_DENSITY_STORE__SECRET_KEY": store.secret_key.get_secret_value(),
        "SLUICE_DENSITY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_DENSITY_KAFKA__INPUT_TOPIC": ingest,
        "SLUICE_DENSITY_KAFKA__OUTPUT_TOPIC": f"{ingest}-unused",  # pass 1 writes nothing
        "SLUICE_DENSITY_KAFKA__GROUP_ID": f"{ingest}-density",
        "SLUICE_DENSITY_KAFKA__PROCESSING_GUARANTEE": guarantee,
        # the same identity on every restart: takes the killed member's partitions at once
        "SLUICE_DENSITY_KAFKA__INSTANCE_ID": f"{ingest}-build-0",
        "SLUICE_DENSITY_KAFKA__MAX_POLL_RECORDS": "1",
        "SLUICE_DENSITY_KAFKA__POLL_TIMEOUT_MS": "200",
        "SLUICE_DENSITY_KAFKA__TRANSACTION_INTERVAL_MS": "300",
    }
    env.update({f"SLUICE_DENSITY_SKETCH__{k.upper()}": str(v) for k, v in SKETCH.items()})
    return env


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.density", *args],
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(cond, what: str, timeout_s: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_kill9_mid_stream_then_restart_builds_the_exact_sketch(
    kafka_bootstrap: str, s3_server: Server, tmp_path: Path, guarantee: str
) -> None:
    ingest = unique("ck-ingest")
    ensure_topics(kafka_bootstrap, [ingest, f"{ingest}.dlq"], partitions=4)
    store_settings = StoreSettings(
        endpoint=s3_server.address,
        bucket=f"ckpt-{uuid.uuid4().hex[:8]}",
        secure=False,
        access_key=SecretStr("test"),
        secret_key=SecretStr("test"),
        create_bucket=True,
    )
    store = SketchStore(store_settings)
    settings = DensitySettings(
        mode="two_pass_build",
        sketch=SketchSettings(**SKETCH),  # type: ignore[arg-type]
        calibration_size=CALIBRATION,
    )
    core = DensityCore(settings)  # never embeds: every sample carries its embedding
    fp = core.params().fingerprint()
    samples = mixture(seed=9, big=CHUNKS * PER_CHUNK - 120, small=(40, 40, 40)).samples("ck-")
    chunks = [samples[i : i + PER_CHUNK] for i in range(0, len(samples), PER_CHUNK)]
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")

    def checkpointed() -> int:
        return sum(c.state.n for c in store.checkpoints("ckpt", fp, 1))

    # Worker 1 sketches the stream while it is being published, and is killed half-way.
    env1 = _env(kafka_bootstrap, ingest, store_settings, guarantee, "w1", idle_s=300)
    first = _start(env1, tmp_path / "w1.log", "worker")
    try:
        publish(producer, ingest, chunks[0], batch_size=PER_BATCH, batch_prefix="c0-")
        _wait_for(lambda: checkpointed() > 0, "worker 1's first checkpoint")
        for i, chunk in enumerate(chunks[1 : CHUNKS // 2], start=1):
            publish(producer, ingest, chunk, batch_size=PER_BATCH, batch_prefix=f"c{i}-")
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = checkpointed()
    assert 0 < at_kill < len(samples), f"no mid-stream kill: {at_kill} checkpointed"
    for i, chunk in enumerate(chunks[CHUNKS // 2 :], start=CHUNKS // 2):
        publish(producer, ingest, chunk, batch_size=PER_BATCH, batch_prefix=f"c{i}-")
    producer.close()

    # Worker 2 (same identity) resumes every partition at its checkpoint and drains the topic.
    env2 = _env(kafka_bootstrap, ingest, store_settings, guarantee, "w2", idle_s=10)
    second = _start(env2, tmp_path / "w2.log", "worker")
    try:
        assert second.wait(180) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
    log2 = (tmp_path / "w2.log").read_text()
    read = re.search(r"samples_in=(\d+)", log2)
    assert read, log2[-3000:]
    assert int(read.group(1)) == len(samples) - at_kill, "re-read checkpointed records or skipped"

    # The build Job's merge, then a re-run of it.
    merge_log = tmp_path / "merge.log"
    assert _start(env2, merge_log, "merge").wait(120) == 0, merge_log.read_text()[-3000:]
    assert f"n={len(samples)}" in merge_log.read_text()
    again = tmp_path / "merge-again.log"
    assert _start(env2, again, "merge").wait(120) == 0, again.read_text()[-3000:]
    assert "already merged" in again.read_text()

    merged = store.load_merged("ckpt", fp, 1)
    assert merged.n == len(samples)
    assert sorted(p.partition for p in merged.parts) == [f"{ingest}-{p}" for p in range(4)]
    assert sum(p.n for p in merged.parts) == len(samples)
    # One sketch over the same data in one go: counts add exactly.
    core.build_batch(samples, core.vectors(samples))
    whole = core.state()
    np.testing.assert_array_equal(merged.sketch.counts, whole.sketch.counts)
    np.testing.assert_array_equal(merged.calibration.keys, whole.calibration.keys)
    np.testing.assert_array_equal(merged.calibration.vectors, whole.calibration.vectors)
