"""Chaos harness: exactly-once through a chain of stages while workers and a broker die.

``python -m bench.chaos [--samples 40000] [--kills 20] [--quick] [--bootstrap H:P,...]``

What it does, on a three-broker Apache Kafka cluster it starts itself (replication factor 3,
``min.insync.replicas=2``; or an existing cluster with ``--bootstrap``):

1. publishes ``--samples`` real news snippets (gensim's corpus, 100 per message) to a
   4-partition ingest topic, with poison pills planted among them: an undecodable value,
   a message without a schema header, a keyless message larger than the stage accepts, and
   valid batches compressed with gzip, snappy, lz4 and zstd (as librdkafka producers send);
2. runs a chain of two stages as separate worker processes, two replicas each: ``scoring``
   (heuristic rules) from ingest to ``mid``, then a second scoring stage from ``mid`` to ``out``
   (the stage logic is irrelevant to delivery: every stage runs the same runtime loop, and
   these are the stages that are cheap enough on a CPU to push tens of thousands of samples);
3. SIGKILLs a random worker at a random moment ``--kills`` times, restarting each at once under
   the same instance id, and SIGKILLs one broker halfway (restarted after a few seconds);
4. when every input is accounted for, reads ``out`` and both dropped topics with
   ``read_committed`` and checks: every valid input id exactly once in (out + dropped),
   nothing lost, nothing duplicated, and the dead-letter topic holding exactly the planted
   bad messages.

Then it measures what exactly-once costs: one scoring worker over a fresh copy of the corpus,
without kills, at ``at_least_once`` and at ``exactly_once``, samples/s side by side.

Prints a table, then ``RESULT chaos kills=.. lost=.. duplicated=.. eos_overhead=..``
(eos_overhead = 1 - eos_throughput / alo_throughput). Runs from the repo root (it starts the
broker with tests/support/kafka_broker.py; ``make install`` fetched its jars).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from services.runtime.codec import BatchCodec
from services.runtime.domain import Sample
from services.runtime.kafka_stage import H_DLQ_REASON, StageWorker, poll_records, publish

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
PER_MESSAGE = 100
# The stage accepts messages up to this size; the ingest topic takes larger ones, so an
# oversized message reaches the worker and must be dead-lettered, not crash it.
STAGE_MAX_BYTES = 512 * 1024
INGEST_MAX_BYTES = 2 * 1024 * 1024


@dataclass
class Chain:
    """Topic names of one run."""

    prefix: str

    @property
    def ingest(self) -> str:
        return f"{self.prefix}.ingest"

    @property
    def mid(self) -> str:
        return f"{self.prefix}.mid"

    @property
    def out(self) -> str:
        return f"{self.prefix}.out"

    @property
    def dropped1(self) -> str:
        return f"{self.prefix}.mid.dropped"

    @property
    def dropped2(self) -> str:
        return f"{self.prefix}.out.dropped"

    def all(self) -> list[str]:
        return [
            self.ingest,
            self.mid,
            self.out,
            self.dropped1,
            self.dropped2,
            f"{self.ingest}.dlq",
            f"{self.mid}.dlq",
        ]


@dataclass
class Worker:
    """One stage worker process, restartable under the same instance id."""

    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.scoring", "worker"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def corpus(n: int) -> list[Sample]:
    from gensim.test.utils import datapath

    docs = [
        line.strip()
        for line in Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    # Windows of real articles: most pass the heuristic rules, some (short ones) are dropped.
    out = []
    for i in range(n):
        words = docs[i % len(docs)].split()
        start = (i // len(docs)) * 13 % max(1, len(words) - 40)
        out.append(Sample(id=f"s{i:07d}", text=" ".join(words[start : start + 40 + i % 160])))
    return out


def create_topics(bootstrap: str, chain: Chain, replication: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics(
            [
                NewTopic(
                    t,
                    PARTITIONS,
                    replication,
                    topic_configs=(
                        {"max.message.bytes": str(INGEST_MAX_BYTES)} if t == chain.ingest else {}
                    ),
                )
                for t in chain.all()
            ]
        )
    finally:
        admin.close()


def plant_poison(bootstrap: str, topic: str, samples: list[Sample]) -> tuple[int, set[str]]:
    """Bad messages the stage must dead-letter (their count), and valid batches compressed
    with every codec (their sample ids, which must come through like the rest)."""
    from services.runtime.codec import CONTENT_TYPE, H_CONTENT_TYPE, H_SCHEMA, SCHEMA_VERSION

    schema = [(H_SCHEMA, SCHEMA_VERSION), (H_CONTENT_TYPE, CONTENT_TYPE)]
    plain = KafkaProducer(
        bootstrap_servers=bootstrap.split(","), acks="all", max_request_size=INGEST_MAX_BYTES
    )
    bad = [
        plain.send(topic, value=b"\x00\xffnot a protobuf\x13", headers=schema, key=b"bad-1"),
        plain.send(topic, value=b'{"text": "json is not our format"}', key=b"bad-2"),
        # keyless and over the stage's limit: its dead letter must still be written
        plain.send(topic, value=os.urandom(STAGE_MAX_BYTES + 200_000), headers=schema),
    ]
    for f in bad:
        f.get(60)
    plain.close()
    ids: set[str] = set()
    codec = BatchCodec()
    chunks = [samples[i : i + PER_MESSAGE] for i in range(0, len(samples), PER_MESSAGE)]
    for codec_name, chunk in zip(["gzip", "snappy", "lz4", "zstd"], chunks, strict=False):
        producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","), acks="all", compression_type=codec_name
        )
        value, headers = codec.encode(chunk, "ingest", f"compressed-{codec_name}")
        producer.send(topic, value=value, headers=headers, key=codec_name.encode()).get(60)
        producer.close()
        ids.update(s.id for s in chunk)
    return len(bad), ids


def worker_env(
    bootstrap: str, group: str, src: str, dst: str, dropped: str, instance: str, guarantee: str
) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SLUICE_SCORING_STEPS": json.dumps(["heuristics"]),
        "SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_SCORING_KAFKA__INPUT_TOPIC": src,
        "SLUICE_SCORING_KAFKA__OUTPUT_TOPIC": dst,
        "SLUICE_SCORING_KAFKA__GROUP_ID": group,
        "SLUICE_SCORING_KAFKA__INSTANCE_ID": instance,
        "SLUICE_SCORING_KAFKA__PROCESSING_GUARANTEE": guarantee,
        "SLUICE_SCORING_KAFKA__MAX_MESSAGE_BYTES": str(STAGE_MAX_BYTES),
        "SLUICE_SCORING_KAFKA__SESSION_TIMEOUT_MS": "10000",
        "SLUICE_SCORING_DROPPED_TOPIC": dropped,
        "SLUICE_SCORING_METRICS__ENABLED": "false",
        "SLUICE_SCORING_LOG_LEVEL": "WARNING",
    }


def read_committed(bootstrap: str, topics: list[str], quiet_s: float = 3.0) -> list[Any]:
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=INGEST_MAX_BYTES + 65536,
    )
    out: list[Any] = []
    try:
        last = time.monotonic()
        while time.monotonic() - last < quiet_s:
            for recs in poll_records(consumer, timeout_ms=300).values():
                out.extend(recs)
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def count_ids(records: list[Any]) -> Counter[str]:
    codec = BatchCodec(INGEST_MAX_BYTES)
    seen: Counter[str] = Counter()
    for r in records:
        seen.update(s.id for s in codec.decode(r.value, r.headers).samples)
    return seen


def chaos(
    bootstrap: str,
    samples: list[Sample],
    *,
    kills: int,
    replication: int,
    restart_broker: Any,
    seed: int,
    timeout_s: float,
    logdir: Path,
) -> dict[str, Any]:
    rng = random.Random(seed)
    chain = Chain(f"chaos-{int(time.time())}-{rng.randrange(1 << 16):04x}")
    create_topics(bootstrap, chain, replication)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    half = len(samples) // 2
    publish(producer, chain.ingest, samples[:half], batch_size=PER_MESSAGE, batch_prefix="a")
    n_bad, compressed_ids = plant_poison(bootstrap, chain.ingest, samples[half:])
    rest = [s for s in samples[half:] if s.id not in compressed_ids]
    publish(producer, chain.ingest, rest, batch_size=PER_MESSAGE, batch_prefix="b")
    producer.close()
    expected = {s.id for s in samples}

    workers = []
    for stage, src, dst, dropped in (
        ("s1", chain.ingest, chain.mid, chain.dropped1),
        ("s2", chain.mid, chain.out, chain.dropped2),
    ):
        for r in range(2):
            env = worker_env(
                bootstrap,
                f"{chain.prefix}-{stage}",
                src,
                dst,
                dropped,
                f"{stage}-{r}",
                "exactly_once",
            )
            workers.append(Worker(f"{stage}-{r}", env, logdir / f"{stage}-{r}.log"))
    for w in workers:
        w.start()

    t0 = time.monotonic()
    done_kills = 0
    broker_restarted = False
    deadline = t0 + timeout_s
    seen: Counter[str] = Counter()
    next_check = 0.0
    crashes = 0
    try:
        while time.monotonic() < deadline:
            # The supervisor's part (Kubernetes restarts a container that exits): a worker
            # that gave up on its own (broker unreachable past its timeouts) starts again.
            for w in workers:
                if w.proc is not None and w.proc.poll() is not None:
                    crashes += 1
                    w.start()
            if done_kills < kills:
                time.sleep(rng.uniform(0.5, 3.0))
                victim = rng.choice(workers)
                victim.kill()
                victim.start()
                done_kills += 1
                if restart_broker is not None and not broker_restarted and done_kills >= kills // 2:
                    restart_broker()
                    broker_restarted = True
                continue
            if time.monotonic() >= next_check:
                seen = count_ids(
                    read_committed(bootstrap, [chain.out, chain.dropped1, chain.dropped2], 2.0)
                )
                if set(seen) >= expected:
                    break
                next_check = time.monotonic() + 3
            time.sleep(0.5)
    finally:
        exits = {w.name: w.stop() for w in workers}
    elapsed = time.monotonic() - t0
    final = count_ids(read_committed(bootstrap, [chain.out, chain.dropped1, chain.dropped2]))
    dlq = read_committed(bootstrap, [f"{chain.ingest}.dlq", f"{chain.mid}.dlq"])
    reasons = Counter(dict(r.headers).get(H_DLQ_REASON, b"?").decode() for r in dlq)
    lost = len(expected - set(final))
    duplicated = sum(c - 1 for c in final.values() if c > 1)
    unexpected = len(set(final) - expected)
    return {
        "samples": len(expected),
        "kills": done_kills,
        "broker_restarts": int(broker_restarted),
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "dead_letters": len(dlq),
        "planted_bad": n_bad,
        "dlq_reasons": dict(reasons),
        "compressed_ok": int(compressed_ids <= set(final)),
        "seconds": elapsed,
        "worker_starts": sum(w.starts for w in workers),
        "self_exits": crashes,
        "clean_exits": sum(1 for c in exits.values() if c == 0),
    }


def throughput(bootstrap: str, samples: list[Sample], guarantee: str) -> float:
    """Samples/s of one scoring worker (in this process) over a fresh topic, counted by the
    loop itself from its first record to its last commit: the same work at both guarantees,
    without process start-up or group join in the figure."""
    from services.runtime.metrics import StageMetrics
    from services.runtime.settings import KafkaSettings
    from services.scoring.core import ScoringCore
    from services.scoring.settings import ScoringSettings

    chain = Chain(f"tput-{guarantee}-{int(time.time() * 1000) % 10**8}")
    create_topics(bootstrap, chain, replication=3 if "," in bootstrap else 1)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    publish(producer, chain.ingest, samples, batch_size=PER_MESSAGE)
    producer.close()
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        input_topic=chain.ingest,
        output_topic=chain.mid,
        group_id=f"{chain.prefix}-g",
        processing_guarantee=guarantee,  # type: ignore[arg-type]
    )
    worker = StageWorker(
        ScoringCore(ScoringSettings(steps=["heuristics"])),
        kafka,
        StageMetrics(f"tput_{guarantee}"),
        stage="scoring",
        dropped_topic=chain.dropped1,
    )
    stats = worker.run(idle_timeout_s=5)
    if stats.samples_in != len(samples):
        raise RuntimeError(f"{guarantee}: worker saw {stats.samples_in}/{len(samples)} samples")
    return stats.samples_in / max(1e-9, stats.busy_seconds)


def recovery(bootstrap: str, samples: list[Sample], stable_id: bool, logdir: Path) -> float:
    """Seconds from SIGKILL of a worker mid-stream to the first new output its restarted
    self commits (process start included). With a stable instance id the new process fences
    the old transaction and rejoins as the same static member at once; with a random id it
    waits for the old member's session to expire, and read_committed readers wait for the
    old transaction to time out."""
    chain = Chain(f"rec-{'stable' if stable_id else 'random'}-{int(time.time() * 1000) % 10**8}")
    create_topics(bootstrap, chain, replication=3 if "," in bootstrap else 1)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    publish(producer, chain.ingest, samples, batch_size=PER_MESSAGE // 4)
    producer.close()
    env = worker_env(
        bootstrap, f"{chain.prefix}-g", chain.ingest, chain.mid, chain.dropped1,
        "rec-0" if stable_id else "", "exactly_once",
    )  # fmt: skip
    env["SLUICE_SCORING_KAFKA__MAX_POLL_RECORDS"] = "1"
    env["SLUICE_SCORING_KAFKA__TRANSACTION_INTERVAL_MS"] = "200"
    w = Worker(f"recovery-{stable_id}", env, logdir / f"recovery-{stable_id}.log")
    topics = [chain.mid, chain.dropped1]
    w.start()
    try:
        before = 0
        while not before:
            before = sum(count_ids(read_committed(bootstrap, topics, 0.3)).values())
        w.kill()
        killed_at = time.monotonic()
        at_kill = sum(count_ids(read_committed(bootstrap, topics, 0.3)).values())
        w.start()
        while time.monotonic() - killed_at < 300:
            if sum(count_ids(read_committed(bootstrap, topics, 0.3)).values()) > at_kill:
                return time.monotonic() - killed_at
        raise RuntimeError("the restarted worker made no progress in 300 s")
    finally:
        w.stop()


def report_chaos(res: dict[str, Any], logdir: Path) -> None:
    print(f"\nworker logs: {logdir}")
    print("| check | value |\n|---|---|")
    keys = [
        "samples", "kills", "broker_restarts", "worker_starts", "self_exits", "lost",
        "duplicated", "unexpected", "planted_bad", "dead_letters", "compressed_ok",
        "clean_exits",
    ]  # fmt: skip
    for k in keys:
        print(f"| {k} | {res[k]} |")
    print(f"| dlq reasons | {res['dlq_reasons']} |")
    print(f"| chaos run | {res['seconds']:.1f} s |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--samples", type=int, default=40_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--tput-samples", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="CI size: 6,000 samples, 8 kills")
    ap.add_argument("--bootstrap", help="an existing cluster (no broker restart then)")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs per guarantee")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.kills, args.tput_samples = 6_000, 8, 6_000

    # SIGTERM unwinds like Ctrl-C, so the brokers and workers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = None
    logdir = Path(tempfile.mkdtemp(prefix="sluice-chaos-"))
    if args.bootstrap:
        bootstrap, replication, restart = args.bootstrap, 3, None
    else:
        from tests.support.kafka_broker import KafkaCluster

        t = time.monotonic()
        cluster = KafkaCluster.start(3)
        print(f"three-broker Apache Kafka cluster up in {time.monotonic() - t:.1f} s")
        bootstrap, replication = cluster.bootstrap, 3
        node = cluster.nodes[1]

        def restart() -> None:
            node.kill()
            time.sleep(3)
            node.launch(cluster.heap)

    try:
        res = chaos(
            bootstrap,
            corpus(args.samples),
            kills=args.kills,
            replication=replication,
            restart_broker=restart,
            seed=args.seed,
            timeout_s=args.timeout,
            logdir=logdir,
        )
        report_chaos(res, logdir)
        rec_corpus = corpus(2_000)
        rec = {stable: recovery(bootstrap, rec_corpus, stable, logdir) for stable in (True, False)}
        tput_corpus = corpus(args.tput_samples)
        # Alternate the two, several times, and take medians: on a shared machine one run
        # of each says more about the neighbours than about the guarantee.
        runs: dict[str, list[float]] = {"at_least_once": [], "exactly_once": []}
        for _ in range(args.repeats):
            for guarantee in runs:
                runs[guarantee].append(throughput(bootstrap, tput_corpus, guarantee))
        alo = statistics.median(runs["at_least_once"])
        eos = statistics.median(runs["exactly_once"])
    finally:
        if cluster is not None:
            cluster.stop()
    overhead = 1 - eos / alo
    print("\n| guarantee | samples/s (one worker, no kills; median) | runs |\n|---|---|---|")
    for g, rates in runs.items():
        print(
            f"| {g} | {statistics.median(rates):,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} |"
        )
    print("\n| restarted worker's instance id | SIGKILL -> first new output |\n|---|---|")
    print(f"| stable (pod name) | {rec[True]:.1f} s |\n| random | {rec[False]:.1f} s |")
    print(
        f"RESULT chaos kills={res['kills']} lost={res['lost']} duplicated={res['duplicated']} "
        f"eos_overhead={overhead:.3f} recovery_s={rec[True]:.1f} "
        f"broker_restarts={res['broker_restarts']} "
        f"dead_letters={res['dead_letters']} planted_bad={res['planted_bad']}"
    )
    ok = (
        res["lost"] == 0
        and res["duplicated"] == 0
        and res["unexpected"] == 0
        and res["dead_letters"] == res["planted_bad"]
        and res["compressed_ok"] == 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
