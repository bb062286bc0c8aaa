"""Typed settings of the operator process (env prefix ``SLUICE_OPERATOR_``).

Per-stage policy lives in each SluiceScaler resource; this is only what the process itself
needs: where to watch, how often to re-read the world, broker client timeouts and backoff.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.settings import KafkaSecuritySettings, StrictModel


class LagClientSettings(StrictModel):
    """The Kafka admin client that reads offsets."""

    client_id: str = Field("sluice-operator", description="Client id reported to the broker.")
    request_timeout_ms: int = Field(
        5000, ge=100, description="Per-request timeout of offset and metadata calls."
    )
    bootstrap_timeout_ms: int = Field(
        5000,
        ge=100,
        description="How long connecting to a broker may take before the lag source counts "
        "as unavailable (a reconcile pass waits this long when the broker is down).",
    )
    retry_base_seconds: float = Field(
        5.0, gt=0, description="First wait after a failed offset read; doubles per failure."
    )
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest wait between retries.")
    security: KafkaSecuritySettings = Field(
        default_factory=KafkaSecuritySettings,  # type: ignore[arg-type]
        description="TLS and SASL towards the brokers, as the stages' kafka.security (the "
        "chart mounts the same Secrets at the same paths into the operator).",
    )


class OperatorSettings(BaseSettings):
    """Everything ``python -m operators`` reads."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_OPERATOR_", env_nested_delimiter="__", extra="forbid"
    )

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch for SluiceScalers; empty = all namespaces (needs "
        "cluster-wide RBAC).",
    )
    reconcile_interval_seconds: float = Field(
        10.0,
        gt=0,
        description="How often each scaler is reconciled: target and lag re-read, replicas "
        "re-planned (level-based: each pass reads the world afresh).",
    )
    rate_window_seconds: float = Field(
        60.0,
        gt=0,
        description="Time constant of the smoothed (EWMA) arrival and consumption rates.",
    )
    kafka: LagClientSettings = Field(default_factory=LagClientSettings)  # type: ignore[arg-type]
    metrics_host: str = Field("0.0.0.0", description="Interface of the /metrics endpoint.")
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Prometheus /metrics port; 0 = do not serve."
    )
    liveness_port: int = Field(
        8080, ge=0, le=65535, description="kopf's /healthz liveness port; 0 = do not serve."
    )
    kubeconfig: str = Field(
        "",
        description="kubeconfig file for running outside a cluster; '' = in-cluster service "
        "account, else $KUBECONFIG, else ~/.kube/config.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
