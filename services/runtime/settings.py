"""Typed settings shared by every service: Kafka, gRPC and metrics blocks.

Each service subclasses ``ServiceSettings`` with its own env prefix
(``SLUICE_SCORING_`` ...). Nested fields use ``__``:
``SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS=broker:9092``. Settings objects are
passed into constructors; nothing reads the environment anywhere else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.errors import ConfigError

MiB = 1024 * 1024


class StrictModel(BaseModel):
    """Base of every nested settings block: an unknown key is a typo, so it is an error."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(StrictModel):
    """Where a stage worker reads, writes and dead-letters, and how it commits."""

    bootstrap_servers: str = Field("localhost:9092", description="Comma-separated broker list.")
    input_topic: str = Field(
        "sluice.ingest", description="Topic of SampleBatch messages to consume."
    )
    output_topic: str = Field("sluice.scored", description="Topic the kept/changed samples go to.")
    dlq_topic: str = Field(
        "", description="Dead-letter topic for malformed messages; '' = '<input_topic>.dlq'."
    )
    group_id: str = Field(
        "sluice-scoring", description="Consumer group; replicas share partitions."
    )
    client_id: str = Field("sluice", description="Client id reported to the broker.")
    max_poll_records: int = Field(
        8,
        ge=1,
        description="Messages (batches of samples) taken per poll; bounds the work "
        "abandoned on a crash and the time between commits.",
    )
    poll_timeout_ms: int = Field(500, ge=1, description="How long one poll waits for data.")
    max_message_bytes: int = Field(
        8 * MiB,
        ge=1024,
        description="Largest message value accepted or produced; larger inputs "
        "are dead-lettered, larger outputs are split.",
    )
    session_timeout_ms: int = Field(
        10000,
        ge=1000,
        description="Consumer group session timeout: how long a worker that died without "
        "leaving (kill -9, node loss) holds its partitions. With a stable instance_id a "
        "restarted worker takes them back at once instead.",
    )
    max_poll_interval_ms: int = Field(
        600000,
        description="Max time between polls before the group evicts the worker; must "
        "exceed the time to score max_poll_records batches on the slowest model.",
    )
    produce_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait for the broker to acknowledge outputs."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest",
        description="Where a new group starts; 'earliest' so nothing published "
        "before the worker started is skipped.",
    )

    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        "exactly_once",
        description="exactly_once: each poll's outputs and input offsets commit in one "
        "producer transaction (needs a broker with transactions: Apache Kafka >= 2.5); "
        "at_least_once: outputs acknowledged before offsets commit, redelivery possible.",
    )
    instance_id: str = Field(
        "",
        description="Stable identity of this worker across restarts (the pod name): the "
        "static group member id (group.instance.id) and the transactional id suffix, so a "
        "restarted worker fences its old self and takes its partitions back without waiting "
        "for the session timeout. '' = a random id per process (no static membership).",
    )
    transactional_id_prefix: str = Field(
        "", description="Prefix of the producer's transactional id; '' = the group id."
    )
    transaction_interval_ms: int = Field(
        1000,
        ge=0,
        description="exactly_once: how long one transaction stays open collecting polls "
        "before it commits (Kafka Streams' commit.interval.ms). Longer amortises the "
        "commit's cost over more batches; shorter makes outputs visible to read_committed "
        "readers sooner. A transaction also commits whenever a poll returns nothing.",
    )
    transaction_timeout_ms: int = Field(
        120000,
        ge=1000,
        description="How long the broker lets a transaction stay open before aborting it; "
        "must exceed the time to process one poll (max_poll_records batches). A worker that "
        "died without a stable instance_id holds back read_committed readers this long.",
    )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings every kafka-python client of this stage shares."""
        return {"bootstrap_servers": self.bootstrap_servers.split(",")}

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"


class GrpcSettings(StrictModel):
    """The gRPC server: address, limits and shutdown grace."""

    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(50051, ge=0, le=65535, description="Port; 0 = pick a free one (tests).")
    max_message_bytes: int = Field(
        32 * MiB, ge=1024, description="Largest request/response message."
    )
    max_workers: int = Field(8, ge=1, description="Handler threads.")
    grace_seconds: float = Field(10.0, ge=0, description="Drain time on SIGTERM before stopping.")


class MetricsSettings(StrictModel):
    """The Prometheus endpoint."""

    host: str = Field("0.0.0.0", description="Interface for the /metrics HTTP server.")
    port: int = Field(9100, ge=0, le=65535, description="Port; 0 = pick a free one.")
    enabled: bool = Field(True, description="Serve /metrics at all.")


class ServiceSettings(BaseSettings):
    """Base of every service's settings; subclasses set ``model_config`` env_prefix."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)  # type: ignore[arg-type]
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)  # type: ignore[arg-type]
    log_level: str = Field("INFO", description="Python logging level.")
    dropped_topic: str = Field(
        "",
        description="Where dropped samples (with their lineage and drop reason) are written, "
        "so a dropped sample can be told apart from a lost one: '' = "
        "'<kafka.output_topic>.dropped', 'none' = do not record drops.",
    )

    @property
    def dropped_topic_name(self) -> str:
        """The dropped-samples topic in effect ('' when drops are not recorded)."""
        if self.dropped_topic.lower() == "none":
            return ""
        return self.dropped_topic or f"{self.kafka.output_topic}.dropped"

    def decision_fingerprint(self) -> str:
        """Digest of every setting that can change a decision: all but where the stage reads,
        writes and listens. Part of output batch ids, so a replay under a changed config is
        not taken for a redelivery."""
        transport = {"kafka", "grpc", "metrics", "log_level", "dropped_topic"}
        body = self.model_dump(mode="json", exclude=transport)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], path: str | Path | None = None, **overrides: Any) -> S:
    """Settings from (lowest to highest precedence) defaults, a YAML file, the
    environment, then explicit overrides. Unknown keys are an error, not ignored."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data.update(loaded)
    data.update(overrides)

    # Environment beats the file: build from env alone, then lay the file under it.
    env_only = cls()
    env_set = env_only.model_dump(exclude_unset=True)
    merged = _deep_merge(data, env_set)
    try:
        return cls.model_validate(merged) if merged else env_only
    except Exception as exc:  # pydantic.ValidationError: report as a config problem
        raise ConfigError(f"invalid settings for {cls.__name__}: {exc}") from exc


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
