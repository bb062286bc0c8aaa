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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.errors import ConfigError

MiB = 1024 * 1024


class StrictModel(BaseModel):
    """Base of every nested settings block: an unknown key is a typo, so it is an error."""

    model_config = ConfigDict(extra="forbid")


class KafkaSecuritySettings(StrictModel):
    """How a Kafka client authenticates and encrypts: TLS (optionally mutual) and SASL.

    Secrets are files (mounted from Kubernetes Secrets) or, for the SASL password, an env
    variable; the files are read when a client is built, so a rotated Secret takes effect on
    the next connect. Every kafka-python client of a stage is built from ``client_kwargs()``.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="Kafka security.protocol: TLS with SSL/SASL_SSL, SASL authentication "
        "with SASL_PLAINTEXT/SASL_SSL.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols only)."
    )
    sasl_username: str = Field("", description="SASL user name (SASL_* protocols only).")
    sasl_password: SecretStr = Field(
        SecretStr(""),
        description="SASL password; prefer sasl_password_file (a mounted Secret), which wins "
        "when both are set.",
    )
    sasl_password_file: str = Field(
        "", description="File holding the SASL password (trailing newline ignored)."
    )
    ca_file: str = Field(
        "",
        description="PEM CA bundle the brokers' certificates are checked against (TLS "
        "protocols); '' = the system's trusted CAs.",
    )
    cert_file: str = Field("", description="PEM client certificate for mutual TLS; needs key_file.")
    key_file: str = Field("", description="PEM private key of cert_file (unencrypted).")
    check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySettings:
        tls = self.protocol in ("SSL", "SASL_SSL")
        sasl = self.protocol.startswith("SASL_")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        if not tls and (self.ca_file or self.cert_file):
            raise ValueError(f"ca_file/cert_file are set but protocol {self.protocol} has no TLS")
        if sasl and not self.sasl_username:
            raise ValueError(f"protocol {self.protocol} needs sasl_username")
        if sasl and not (self.sasl_password_file or self.sasl_password.get_secret_value()):
            raise ValueError(f"protocol {self.protocol} needs sasl_password_file or sasl_password")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python's security kwargs. ConfigError when a named file cannot be read:
        better now, with the setting's name, than as a handshake failure later."""
        if self.protocol == "PLAINTEXT":
            return {}
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            for name in ("ca_file", "cert_file", "key_file"):
                path = getattr(self, name)
                if path and not Path(path).is_file():
                    raise ConfigError(f"kafka.security.{name}: no such file: {path}")
            kw["ssl_check_hostname"] = self.check_hostname
            if self.ca_file:
                kw["ssl_cafile"] = self.ca_file
            if self.cert_file:
                kw["ssl_certfile"] = self.cert_file
                kw["ssl_keyfile"] = self.key_file
        if self.protocol.startswith("SASL_"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self._password()
        return kw

    def _password(self) -> str:
        if not self.sasl_password_file:
            return self.sasl_password.get_secret_value()
        try:
            return Path(self.sasl_password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"kafka.security.sasl_password_file: cannot read {self.sasl_password_file}: "
                f"{exc.strerror}"
            ) from exc


class KafkaSettings(StrictModel):
    """Where a stage worker reads, writes and dead-letters, and how it commits."""

    bootstrap_servers: str = Field("localhost:9092", description="Comma-separated broker list.")
    security: KafkaSecuritySettings = Field(
        default_factory=KafkaSecuritySettings,  # type: ignore[arg-type]
        description="TLS and SASL of every client this stage builds.",
    )
    bootstrap_timeout_ms: int = Field(
        30000,
        ge=100,
        description="How long a client may take to reach a broker before the worker fails "
        "with Unavailable: a refused TLS handshake or SASL login is retried by the client "
        "until then, not reported at once.",
    )
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
    transaction_max_bytes: int = Field(
        64 * MiB,
        ge=1024,
        description="exactly_once: a transaction's outputs are held in memory until it "
        "commits; it commits early once they reach this many bytes.",
    )
    transaction_timeout_ms: int = Field(
        60000,
        ge=1000,
        description="How long the broker lets a transaction stay open before aborting it; "
        "must exceed the time to process one poll (max_poll_records batches). A worker that "
        "died without a stable instance_id holds back read_committed readers this long.",
    )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security settings every kafka-python client of this stage shares."""
        return {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
            **self.security.client_kwargs(),
        }

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"


class KafkaClientEnv(BaseSettings):
    """Kafka security of the ``sluice publish`` and ``sluice topics`` clients, which take the
    broker list as an argument: env ``SLUICE_KAFKA_SECURITY__<FIELD>`` (e.g.
    ``SLUICE_KAFKA_SECURITY__PROTOCOL=SASL_SSL``), as the chart's topics Job sets them."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_KAFKA_", env_nested_delimiter="__", extra="ignore"
    )

    security: KafkaSecuritySettings = Field(
        default_factory=KafkaSecuritySettings,  # type: ignore[arg-type]
        description="As a stage's kafka.security.",
    )

    def kafka(self, bootstrap_servers: str) -> KafkaSettings:
        """Client settings for ``bootstrap_servers`` with this security."""
        return KafkaSettings(bootstrap_servers=bootstrap_servers, security=self.security)


class GrpcTlsSettings(StrictModel):
    """Transport security of the gRPC server: TLS, and mTLS when a client CA is given. Files
    are PEM, mounted from Secrets; read once at start."""

    enabled: bool = Field(False, description="Serve TLS instead of cleartext HTTP/2.")
    cert_file: str = Field("", description="Server certificate chain (PEM); needed when enabled.")
    key_file: str = Field("", description="Private key of cert_file (PEM); needed when enabled.")
    client_ca_file: str = Field(
        "",
        description="CA bundle (PEM) that signs client certificates; set = mTLS: a client "
        "without a certificate it signed is refused during the handshake. '' = any client.",
    )

    @model_validator(mode="after")
    def _complete(self) -> GrpcTlsSettings:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("grpc.tls.enabled needs grpc.tls.cert_file and grpc.tls.key_file")
        if not self.enabled and (self.cert_file or self.key_file or self.client_ca_file):
            raise ValueError(
                "grpc.tls files are set but grpc.tls.enabled is false: the server would "
                "serve cleartext; set enabled: true or remove the files"
            )
        return self


class GrpcSettings(StrictModel):
    """The gRPC server: address, limits, transport security and shutdown grace."""

    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(50051, ge=0, le=65535, description="Port; 0 = pick a free one (tests).")
    max_message_bytes: int = Field(
        32 * MiB,
        ge=1024,
        description="Largest request and response message. gRPC refuses a larger request "
        "itself (RESOURCE_EXHAUSTED) before any handler runs; a request whose samples cannot "
        "fit in a response this size is refused before the work.",
    )
    max_workers: int = Field(
        8,
        ge=1,
        description="Threads running the API's calls (a stream holds one for its life). "
        "Health checks run on their own threads, so busy or idle API calls never starve "
        "the probes.",
    )
    maximum_concurrent_rpcs: int = Field(
        32,
        ge=1,
        description="API calls running or waiting for a thread at once; one more is refused "
        "at once with RESOURCE_EXHAUSTED instead of queueing without bound. Health checks "
        "are not counted.",
    )
    stream_idle_timeout_seconds: float = Field(
        60.0,
        ge=0,
        description="A client stream (ScoreStream ...) that sends no request for this long "
        "is ended with DEADLINE_EXCEEDED, giving back its thread. 0 = never.",
    )
    grace_seconds: float = Field(10.0, ge=0, description="Drain time on SIGTERM before stopping.")
    tls: GrpcTlsSettings = Field(default_factory=GrpcTlsSettings)  # type: ignore[arg-type]
    auth_token_file: str = Field(
        "",
        description="File holding the bearer token every API call must carry "
        "(metadata 'authorization: Bearer <token>'), read once at start; a call without "
        "it or with another is refused with UNAUTHENTICATED. grpc.health.v1 is exempt (probes "
        "send no token); reflection is not. '' = no authentication.",
    )


class MetricsSettings(StrictModel):
    """The Prometheus endpoint."""

    host: str = Field(
        "0.0.0.0",
        description="Interface for the /metrics HTTP server. All interfaces by default: "
        "Prometheus scrapes the pod IP (the chart relies on it). It serves counters only, no "
        "samples; set 127.0.0.1 where a sidecar scrapes, or restrict it by NetworkPolicy.",
    )
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
