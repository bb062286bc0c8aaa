"""The chaos harness, short: exactly-once through two stages while workers are SIGKILLed
and a broker is killed and restarted (``python -m bench.chaos`` is the long version).

On the three-broker cluster (replication factor 3, min.insync.replicas 2), 3,000 samples with
poison pills planted among them go through scoring -> scoring, two replicas each, six
SIGKILLs of random workers at random moments and one broker SIGKILL; a read_committed reader
must then see every input id exactly once in (output + dropped topics) and the dead-letter
topic must hold exactly the planted bad messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import chaos, corpus
from tests.support.kafka_broker import KafkaCluster

pytestmark = pytest.mark.integration


def test_no_loss_no_duplicates_under_kills_and_a_broker_restart(
    kafka_cluster: KafkaCluster, tmp_path: Path
) -> None:
    node = kafka_cluster.nodes[2]

    def restart_broker() -> None:
        node.kill()
        node.launch(kafka_cluster.heap)

    try:
        res = chaos(
            kafka_cluster.bootstrap,
            corpus(3_000),
            kills=6,
            replication=3,
            restart_broker=restart_broker,
            seed=11,
            timeout_s=420,
            logdir=tmp_path,
        )
    finally:
        if not node.running:
            node.launch(kafka_cluster.heap)
        kafka_cluster.wait_ready()
    assert res["kills"] == 6 and res["broker_restarts"] == 1
    assert res["lost"] == 0, res
    assert res["duplicated"] == 0, res
    assert res["unexpected"] == 0, res
    assert res["compressed_ok"] == 1, res  # gzip/snappy/lz4/zstd batches came through
    assert res["dead_letters"] == res["planted_bad"] == 3, res["dlq_reasons"]
    assert res["dlq_reasons"] == {"decode_error": 1, "schema_version": 1, "too_large": 1}
