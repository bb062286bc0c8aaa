"""Scoring's "keep the best X% so far" survives a crash without changing a decision.

The top-fraction filter's decisions depend on every score seen before. The worker keeps a
filter per input partition and commits its state with the partition's offset, in the same
transaction as the outputs (``services.scoring.worker``). So a worker that crashes with an
uncommitted transaction, replaced by another in the same group, must emit exactly the
decisions an uninterrupted run emits: every sample once, kept or dropped exactly as there.
(Restarting from a fresh estimate, or from one that already saw the replayed records,
changes decisions: tests/unit/scoring/test_worker.py shows that it would.)
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
from gensim.test.utils import datapath
from kafka import KafkaProducer

from services.runtime.domain import Outcome, Sample
from services.runtime.kafka_stage import StageWorker, ensure_topics, publish
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import PerplexitySettings, ScoringSettings, SignalPolicy
from services.scoring.worker import make_worker
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = pytest.mark.integration

N, PER_MESSAGE = 96, 6


class Crash(BaseException):
    """Ends the worker's thread like a SIGKILL ends a process: nothing after it runs except
    the loop's ``finally`` (which commits nothing that was not committed)."""


class CrashAfter:
    """The worker's processor, crashing on its ``after + 1``-th batch."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def process(self, samples: list[Sample]) -> list[Outcome]:
        self.calls += 1
        if self.calls > self.after:
            raise Crash
        out: list[Outcome] = self.inner.process(samples)
        return out


def _samples() -> list[Sample]:
    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    docs = [d.split() for d in lines if d.strip()]
    # short snippets of real text: perplexities spread over a wide range, little model work
    return [
        Sample(id=f"doc-{i:04d}", text=" ".join(docs[i % len(docs)][(i // len(docs)) * 5 :][:10]))
        for i in range(N)
    ]


@pytest.fixture(scope="module")
def core(torch_backend: Any) -> ScoringCore:
    policy = SignalPolicy(mode="top_fraction", top_fraction=0.5)
    settings = ScoringSettings(steps=["perplexity"], perplexity=PerplexitySettings(policy=policy))
    settings.model.max_tokens = 16
    return ScoringCore(settings, backend=torch_backend)


@pytest.fixture(scope="module")
def ingest(kafka_bootstrap: str) -> str:
    topic = unique("st-ingest")
    ensure_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    producer = KafkaProducer(bootstrap_servers=[kafka_bootstrap], acks="all")
    publish(producer, topic, _samples(), batch_size=PER_MESSAGE, batch_prefix="s")
    producer.close()
    return topic


def _worker(core: ScoringCore, bootstrap: str, ingest: str, out: str, group: str) -> StageWorker:
    settings = core.settings.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=bootstrap,
                input_topic=ingest,
                output_topic=out,
                group_id=group,
                max_poll_records=1,
                transaction_interval_ms=0,  # a transaction per message: many commit points
                session_timeout_ms=6000,
            ),
            "dropped_topic": f"{out}.dropped",
        }
    )
    worker = make_worker(core, settings, StageMetrics("scoring"))
    assert isinstance(worker, StageWorker)
    return worker


def _run(worker: StageWorker) -> None:
    def target() -> None:
        with contextlib.suppress(Crash):
            worker.run(idle_timeout_s=4)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(300)
    assert not thread.is_alive()


def _decisions(bootstrap: str, out: str) -> dict[str, list[bool]]:
    """Every decision each sample got, from the kept and dropped topics (committed only)."""
    seen: dict[str, list[bool]] = {}
    for topic, kept in ((out, True), (f"{out}.dropped", False)):
        for r in read_topic(bootstrap, topic, expect=0, timeout_s=10):
            for s in decode_all([r])[0].samples:
                seen.setdefault(s.id, []).append(kept)
    return seen


def _ensure(bootstrap: str, out: str) -> None:
    ensure_topics(bootstrap, [out, f"{out}.dropped"], partitions=1)


def test_a_crashed_worker_replaced_mid_stream_makes_the_same_decisions(
    kafka_bootstrap: str, ingest: str, core: ScoringCore
) -> None:
    ref_out, crash_out = unique("st-ref"), unique("st-crash")
    _ensure(kafka_bootstrap, ref_out)
    _ensure(kafka_bootstrap, crash_out)

    _run(_worker(core, kafka_bootstrap, ingest, ref_out, unique("ref")))
    reference = _decisions(kafka_bootstrap, ref_out)
    assert sorted(reference) == sorted(s.id for s in _samples())
    kept = sum(v == [True] for v in reference.values())
    assert 0.3 * N < kept < 0.7 * N, f"top 50% kept {kept} of {N}"

    group = unique("crash")
    crashing = _worker(core, kafka_bootstrap, ingest, crash_out, group)
    crashing.processor = CrashAfter(crashing.processor, after=5)
    _run(crashing)
    assert crashing.stats.commits >= 2  # it crashed mid-stream, after committing some
    survivor = _worker(core, kafka_bootstrap, ingest, crash_out, group)
    _run(survivor)
    assert survivor.stats.records < N // PER_MESSAGE  # it resumed, not restarted

    after_crash = _decisions(kafka_bootstrap, crash_out)
    assert all(len(v) == 1 for v in after_crash.values()), "a sample was emitted twice"
    assert after_crash == reference
