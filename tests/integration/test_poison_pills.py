"""No single message can stop a stage (on the real broker, one in-process worker per test).

Each case once crash-looped a worker (issue 12): a keyless oversized input whose dead letter
could not be written; a batch whose dropped-topic copy exceeded the producer's limit; a bad
message whose dead-letter copy (value plus headers) exceeded it; messages compressed with
snappy, lz4 or zstd; output larger than the output topic's ``max.message.bytes``. Here each is
planted between valid batches, and the worker must dead-letter (reduced to what fits) or
process it, and go on to the valid batch behind it. Batch ids carry the decision version, so
a replay under a new version is not taken for a redelivery.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from services.runtime.codec import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_SCHEMA,
    SCHEMA_VERSION,
    BatchCodec,
)
from services.runtime.domain import Sample
from services.runtime.kafka_stage import (
    H_DLQ_REASON,
    H_DLQ_SIZE,
    H_DLQ_TRUNCATED,
    StageWorker,
    publish,
)
from services.runtime.metrics import StageMetrics
from services.runtime.settings import KafkaSettings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from tests.integration.kafka_util import decode_all, read_topic, unique

pytestmark = pytest.mark.integration

SCHEMA = [(H_SCHEMA, SCHEMA_VERSION), (H_CONTENT_TYPE, CONTENT_TYPE)]
GOOD = (
    "The committee met on Tuesday to review the proposal for the new library. Members "
    "discussed the budget, the timeline for construction and the plan to keep the old "
    "reading room open while the work goes on. A final vote is expected next month, after "
    "the public has had a chance to comment on the design and on the cost of the project. "
    "The mayor said the city would cover half of the cost if the state pays the rest."
)


def _topics(bootstrap: str, limits: dict[str, int]) -> dict[str, str]:
    names = {k: unique(k) for k in ("ingest", "out", "dropped")}
    names["dlq"] = f"{names['ingest']}.dlq"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics(
            [
                NewTopic(
                    name,
                    1,
                    1,
                    topic_configs=(
                        {"max.message.bytes": str(limits[key])} if key in limits else {}
                    ),
                )
                for key, name in names.items()
            ]
        )
    finally:
        admin.close()
    return names


@contextmanager
def _worker(
    bootstrap: str, t: dict[str, str], max_message_bytes: int, version: str = ""
) -> Iterator[StageWorker]:
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        input_topic=t["ingest"],
        output_topic=t["out"],
        group_id=unique("g"),
        max_message_bytes=max_message_bytes,
    )
    worker = StageWorker(
        core,
        kafka,
        StageMetrics("scoring"),
        stage="scoring",
        dropped_topic=t["dropped"],
        decision_version=version,
    )
    thread = threading.Thread(target=lambda: worker.run(idle_timeout_s=8), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(60)
        assert not thread.is_alive(), "the worker did not stop"


def _samples(prefix: str, n: int, text: str = GOOD) -> list[Sample]:
    return [Sample(id=f"{prefix}-{i:04d}", text=text) for i in range(n)]


def _ids(records: list) -> list[str]:  # type: ignore[type-arg]
    return [s.id for b in decode_all(records) for s in b.samples]


def _producer(bootstrap: str, **kw: object) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", **kw)


def test_keyless_oversized_message_is_dead_lettered_truncated_and_the_worker_goes_on(
    kafka_bootstrap: str,
) -> None:
    t = _topics(kafka_bootstrap, {"ingest": 3_000_000, "dlq": 200_000})
    p = _producer(kafka_bootstrap, max_request_size=3_000_000)
    big = os.urandom(1_500_000)
    p.send(t["ingest"], value=big, headers=SCHEMA).get(30)  # no key
    publish(p, t["ingest"], _samples("after", 5))
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=1_000_000) as w:
        out = read_topic(kafka_bootstrap, t["out"], expect=1, timeout_s=60)
        dlq = read_topic(kafka_bootstrap, t["dlq"], expect=1, timeout_s=30)
    assert sorted(_ids(out)) == [f"after-{i:04d}" for i in range(5)]
    assert len(dlq) == 1 and w.stats.dead_letters == 1
    h = dict(dlq[0].headers)
    assert h[H_DLQ_REASON] == b"too_large"
    assert h[H_DLQ_SIZE] == str(len(big)).encode()
    assert h[H_DLQ_TRUNCATED] == b"true"
    assert 0 < len(dlq[0].value) < 200_000 and big.startswith(dlq[0].value)


def test_dead_letter_keeps_the_whole_value_when_it_fits(kafka_bootstrap: str) -> None:
    t = _topics(kafka_bootstrap, {})
    p = _producer(kafka_bootstrap)
    value = b"\x00\xffnot a protobuf\x13" * 100
    p.send(t["ingest"], value=value, headers=SCHEMA).get(30)
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=1_000_000):
        dlq = read_topic(kafka_bootstrap, t["dlq"], expect=1, timeout_s=60)
    assert len(dlq) == 1 and dlq[0].value == value
    assert H_DLQ_TRUNCATED not in dict(dlq[0].headers)
    assert dict(dlq[0].headers)[H_DLQ_REASON] == b"decode_error"


def test_bad_message_whose_dead_letter_with_headers_exceeds_the_limit(
    kafka_bootstrap: str,
) -> None:
    """The value fits the DLQ topic on its own, but not with the dead-letter headers."""
    t = _topics(kafka_bootstrap, {"dlq": 100_000})
    p = _producer(kafka_bootstrap)
    value = b"\xff" * 99_000  # not a SampleBatch (wire type 7 does not exist)
    p.send(t["ingest"], value=value, headers=SCHEMA, key=b"k").get(30)
    publish(p, t["ingest"], _samples("after", 3))
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=1_000_000):
        out = read_topic(kafka_bootstrap, t["out"], expect=3, timeout_s=60, count=lambda r: 3)
        dlq = read_topic(kafka_bootstrap, t["dlq"], expect=1, timeout_s=30)
    assert len(dlq) == 1 and dict(dlq[0].headers)[H_DLQ_TRUNCATED] == b"true"
    assert value.startswith(dlq[0].value) and len(dlq[0].value) < len(value)
    assert sorted(_ids(out)) == [f"after-{i:04d}" for i in range(3)]


def test_dropped_copy_larger_than_the_topic_limit_is_split(kafka_bootstrap: str) -> None:
    """A batch near the limit whose samples are all dropped: the dropped copy (with lineage)
    is larger than the input, so it is split into messages that fit."""
    t = _topics(kafka_bootstrap, {"ingest": 300_000, "dropped": 300_000})
    junk = "buy now " * 2_050  # repetitive: the heuristic rules drop it
    samples = _samples("junk", 17, junk)
    value, headers = BatchCodec().encode(samples, "ingest", "near-limit")
    assert 250_000 < len(value) < 290_000
    p = _producer(kafka_bootstrap, max_request_size=300_000)
    p.send(t["ingest"], value=value, headers=headers, key=b"k").get(30)
    publish(p, t["ingest"], _samples("after", 2))
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=290_000) as w:
        read_topic(kafka_bootstrap, t["out"], expect=1, timeout_s=60)
        dropped = read_topic(
            kafka_bootstrap,
            t["dropped"],
            expect=17,
            timeout_s=30,
            count=lambda r: len(decode_all([r])[0].samples),
        )
    assert sorted(_ids(dropped)) == sorted(s.id for s in samples)
    assert len(dropped) >= 2 and all(len(r.value) < 300_000 for r in dropped)
    assert w.stats.dead_letters == 0


def test_output_is_split_to_the_output_topics_limit(kafka_bootstrap: str) -> None:
    """The worker allows 8 MiB, the output topic 100 kB: the broker's limit wins."""
    t = _topics(kafka_bootstrap, {"out": 100_000})
    samples = _samples("big", 120)  # ~55 kB in, more with lineage and scores
    p = _producer(kafka_bootstrap)
    publish(p, t["ingest"], samples, batch_size=120)
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=8 * 1024 * 1024) as w:
        out = read_topic(
            kafka_bootstrap,
            t["out"],
            expect=120,
            timeout_s=60,
            count=lambda r: len(decode_all([r])[0].samples),
        )
    assert w.produce_limit == 100_000
    assert sorted(_ids(out)) == sorted(s.id for s in samples)
    assert all(len(r.value) < 100_000 for r in out)


def test_a_sample_too_large_for_the_output_topic_alone_is_dead_lettered(
    kafka_bootstrap: str,
) -> None:
    t = _topics(kafka_bootstrap, {"out": 20_000})
    docs = [ln for ln in Path(datapath("lee_background.cor")).read_text().splitlines() if ln]
    long_text = " ".join(docs[:20])  # ~22 kB of real prose: passes the rules, cannot fit
    p = _producer(kafka_bootstrap)
    publish(p, t["ingest"], [Sample(id="huge", text=long_text), *_samples("ok", 3)], batch_size=10)
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=1_000_000):
        out = read_topic(
            kafka_bootstrap,
            t["out"],
            expect=3,
            timeout_s=60,
            count=lambda r: len(decode_all([r])[0].samples),
        )
        dlq = read_topic(kafka_bootstrap, t["dlq"], expect=1, timeout_s=30)
    assert sorted(_ids(out)) == [f"ok-{i:04d}" for i in range(3)]
    assert len(dlq) == 1 and dict(dlq[0].headers)[H_DLQ_REASON] == b"output_too_large"
    assert b"huge" in dict(dlq[0].headers)["sluice-dlq-error"]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_batches_are_processed(kafka_bootstrap: str, codec: str) -> None:
    t = _topics(kafka_bootstrap, {})
    samples = _samples(codec, 20)
    p = _producer(kafka_bootstrap, compression_type=codec)
    publish(p, t["ingest"], samples, batch_size=10)
    p.close()
    with _worker(kafka_bootstrap, t, max_message_bytes=1_000_000) as w:
        out = read_topic(
            kafka_bootstrap,
            t["out"],
            expect=20,
            timeout_s=60,
            count=lambda r: len(decode_all([r])[0].samples),
        )
    assert sorted(_ids(out)) == sorted(s.id for s in samples)
    assert w.stats.dead_letters == 0


def test_batch_ids_name_the_input_and_the_decision_version(kafka_bootstrap: str) -> None:
    t = _topics(kafka_bootstrap, {})
    p = _producer(kafka_bootstrap)
    publish(p, t["ingest"], _samples("v", 4), batch_size=4)
    p.close()
    with _worker(kafka_bootstrap, t, 1_000_000, version="rules-v1"):
        first = read_topic(kafka_bootstrap, t["out"], expect=1, timeout_s=60)
    replay = {**t, "out": unique("replay")}
    with _worker(kafka_bootstrap, replay, 1_000_000, version="rules-v2"):
        second = read_topic(kafka_bootstrap, replay["out"], expect=1, timeout_s=60)
    (a,), (b,) = decode_all(first), decode_all(second)
    src = f"{t['ingest']}-0-0@scoring."
    assert a.batch_id.startswith(src) and b.batch_id.startswith(src)
    assert a.batch_id != b.batch_id  # a replay under a new version is not a redelivery
