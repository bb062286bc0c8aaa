"""Consumer lag of a stage's group on its input topic, read from the broker's admin API.

Which group and topic: ``lag_target`` loads the stage's settings from the config the
SluiceScaler carries (the same file the stage's pods read) and asks the stage registry for
the group the worker really commits (``services.runtime.registry.consumer_group``: density's
two-pass sample workers commit ``<group>.sample.<sketch>.v<N>``, not ``kafka.group_id``).

Lag per partition is ``end offset - position``, where position is the group's committed offset,
or the log start when the group has committed nothing there yet (a new group with
``auto_offset_reset=earliest`` starts at the beginning). Each partition's lag is clamped at
zero: a committed offset past the reported end (an end offset a broker got wrong, a topic
truncated under the group) is "caught up", never negative lag. The lag of a stage is the
sum over partitions.

One admin client per broker address, reused across passes, with the operator's own TLS and
SASL settings (``LagClientSettings.security``, mounted like the stages' credentials); a
retriable broker error (a coordinator being elected) is retried a few times within the read;
any other failure closes the client (the next read reconnects) and surfaces as
``LagSourceError`` with the cause, for the reconciler to keep replicas as they are and retry
later.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError, for_code

from operators.settings import LagClientSettings
from services.runtime.errors import ConfigError
from services.runtime.registry import consumer_group, load_stage_settings

# Retriable broker errors (KafkaError.retriable) are retried within one read this often.
RETRIABLE_ATTEMPTS = 5
RETRIABLE_WAIT_SECONDS = 0.5


class LagSourceError(Exception):
    """Offsets could not be read (broker down, topic missing, group coordinator error)."""


@dataclass(frozen=True)
class LagTarget:
    """Whose lag to read: the stage's broker, input topic and committed group."""

    bootstrap_servers: str
    topic: str
    group: str


def lag_target(kind: str, config: dict[str, Any]) -> LagTarget:
    """The broker, input topic and consumer group of a ``kind`` stage with ``config``;
    ConfigError (an invalid spec, not a transient failure) when they cannot be known."""
    settings = load_stage_settings(kind, config)
    kafka = settings.kafka
    if not kafka.bootstrap_servers or not kafka.input_topic:
        raise ConfigError(f"{kind} config names no broker or input topic: nothing to scale on")
    return LagTarget(kafka.bootstrap_servers, kafka.input_topic, consumer_group(kind, settings))


@dataclass(frozen=True)
class LagReading:
    """Offsets summed over the topic's partitions (sums make the rates: see planner)."""

    lag: int
    end_offsets: int
    committed_offsets: int
    """Sum of positions: committed offsets, or the log start where nothing is committed."""
    partitions: int


class KafkaLagSource:
    """Reads lag with kafka-python's KafkaAdminClient; safe to call from several threads."""

    def __init__(self, settings: LagClientSettings) -> None:
        self._settings = settings
        self._clients: dict[str, KafkaAdminClient] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def read(self, bootstrap_servers: str, topic: str, group: str) -> LagReading:
        with self._guard:
            lock = self._locks.setdefault(bootstrap_servers, threading.Lock())
        with lock:
            for attempt in range(RETRIABLE_ATTEMPTS):
                try:
                    client = self._client(bootstrap_servers)
                    return _read(client, topic, group)
                except LagSourceError:
                    raise
                except KafkaError as exc:
                    # A coordinator being elected or loading (the first group lookup on a
                    # new cluster creates __consumer_offsets): moments, not an outage.
                    if exc.retriable and attempt + 1 < RETRIABLE_ATTEMPTS:
                        time.sleep(RETRIABLE_WAIT_SECONDS)
                        continue
                    self._drop(bootstrap_servers)
                    raise LagSourceError(f"{type(exc).__name__}: {exc}") from exc
                except Exception as exc:  # any client/broker failure: reconnect next time
                    self._drop(bootstrap_servers)
                    raise LagSourceError(f"{type(exc).__name__}: {exc}") from exc
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._guard:
            for address in list(self._clients):
                self._drop(address)

    def _client(self, bootstrap_servers: str) -> KafkaAdminClient:
        client = self._clients.get(bootstrap_servers)
        if client is None:
            client = KafkaAdminClient(
                bootstrap_servers=bootstrap_servers.split(","),
                client_id=self._settings.client_id,
                request_timeout_ms=self._settings.request_timeout_ms,
                bootstrap_timeout_ms=self._settings.bootstrap_timeout_ms,
                **self._settings.security.client_kwargs(),
            )
            self._clients[bootstrap_servers] = client
        return client

    def _drop(self, bootstrap_servers: str) -> None:
        client = self._clients.pop(bootstrap_servers, None)
        if client is not None:
            # Closing a broken client may fail too: nothing left to do about it.
            with contextlib.suppress(Exception):
                client.close()


def _read(client: KafkaAdminClient, topic: str, group: str) -> LagReading:
    (meta,) = client.describe_topics([topic])
    if meta["error_code"]:
        raise LagSourceError(f"topic {topic!r}: {for_code(meta['error_code']).__name__}")
    tps = [TopicPartition(topic, p["partition_index"]) for p in meta["partitions"]]
    if not tps:
        raise LagSourceError(f"topic {topic!r} has no partitions")
    ends = client.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps})
    starts = client.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps})
    committed = client.list_group_offsets({group: tps}).get(group, {})
    lag = end_total = position_total = 0
    for tp in tps:
        end, start = ends[tp].offset, starts[tp].offset
        c = committed.get(tp)
        position = c.offset if c is not None and c.offset >= 0 else start
        end_total += end
        position_total += position
        lag += max(0, end - position)
    return LagReading(
        lag=lag, end_offsets=end_total, committed_offsets=position_total, partitions=len(tps)
    )
