"""One reconcile pass over a SluiceScaler: read the target and the lag, plan, scale.

Level-based: each pass reads everything afresh (the target Deployment, the broker's offsets)
and acts on what it sees, not on remembered events, so a missed or repeated pass is
harmless. The previous status is used only as memory: the last offset sample (for rates),
smoothed rates, the last scale time and idle clock, and the lag source's backoff.

A pass:
  1. resolve the stage's lag target from its config through the stage registry (broker,
     input topic, and the consumer group the worker really commits),
  2. read the target Deployment (missing: wait for the chart to create it, touch nothing),
  3. read the group's lag (unless a broker failure backoff is running; on failure keep the
     replicas as they are and set LagSourceAvailable=False),
  4. fold the offsets into the rates, plan (``operators.planner``), and set replicas through
     the scale subresource when the plan differs from the live count.
Nothing here talks to kopf: the pass returns the status to write and the events to post
(``operators.handlers`` does both).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException

from operators.actuator import KubeActuator, TargetState
from operators.crd import (
    Condition,
    LagSourceState,
    SampleState,
    ScalerSpec,
    ScalerStatus,
    SpecError,
    from_rfc3339,
    parse_spec,
    parse_status,
    set_condition,
    to_rfc3339,
)
from operators.lag import KafkaLagSource, LagReading, LagSourceError, LagTarget, lag_target
from operators.metrics import OperatorMetrics
from operators.planner import Observation, OffsetSample, Rates, plan, update_rates
from operators.settings import OperatorSettings
from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

READY = "Ready"
LAG_SOURCE = "LagSourceAvailable"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the scaler."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class ReconcileResult:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class ScalerRef:
    name: str
    namespace: str
    generation: int | None = None


class Reconciler:
    def __init__(
        self,
        kube: KubeActuator,
        lag_source: KafkaLagSource,
        metrics: OperatorMetrics,
        settings: OperatorSettings,
    ) -> None:
        self._kube = kube
        self._lag = lag_source
        self._metrics = metrics
        self._settings = settings

    def reconcile(
        self,
        ref: ScalerRef,
        spec: dict[str, Any],
        status: dict[str, Any] | None,
        now: dt.datetime,
    ) -> ReconcileResult:
        before = parse_status(status).model_copy(update={"observed_generation": ref.generation})
        events: list[Event] = []
        try:
            scaler = parse_spec(spec)
            target = lag_target(scaler.stage.kind, scaler.stage.config)
        except (SpecError, ConfigError) as exc:
            message = exc.message if isinstance(exc, ConfigError) else str(exc)
            return self._not_ready(ref, before, "InvalidSpec", message, now, "spec")
        before = before.model_copy(update={"consumer_group": target.group, "topic": target.topic})
        name = scaler.scale_target_ref.name
        try:
            live = self._kube.target(ref.namespace, name)
        except Exception as exc:  # the API server: retried next pass
            log.error("reading %s/%s: %s", ref.namespace, name, _describe(exc))
            return self._not_ready(ref, before, "ReconcileError", _describe(exc), now, "kubernetes")
        if live is None:
            message = f"Deployment {name} not found: waiting for it (the chart renders it)"
            return self._not_ready(ref, before, "TargetNotFound", message, now, None)
        try:
            after = self._scale(ref, scaler, target, live, before, now, events)
        except Exception as exc:  # the scale call failed: retried next pass
            log.error("scaling %s/%s: %s", ref.namespace, name, _describe(exc))
            return self._not_ready(ref, before, "ReconcileError", _describe(exc), now, "kubernetes")
        return ReconcileResult(after.dump(), events)

    def _scale(
        self,
        ref: ScalerRef,
        scaler: ScalerSpec,
        target: LagTarget,
        live: TargetState,
        before: ScalerStatus,
        now: dt.datetime,
        events: list[Event],
    ) -> ScalerStatus:
        labels = (ref.namespace, ref.name)
        replicas, ready = live.replicas, live.ready_replicas
        reading, lag_state, lag_condition = self._read_lag(ref, target, before, now)
        was_up = _is_true(before.condition(LAG_SOURCE))
        if lag_condition.status == "False" and was_up is not False:
            events.append(Event("Warning", "LagSourceUnavailable", lag_condition.message))
        elif lag_condition.status == "True" and was_up is False:
            events.append(Event("Normal", "LagSourceAvailable", "offsets readable again"))

        status = before.model_copy(
            update={
                "lag_source": lag_state,
                "conditions": set_condition(before.conditions, lag_condition, now),
            }
        )
        desired = replicas
        if reading is not None:
            sample = OffsetSample(
                time=now.timestamp(),
                end_total=reading.end_offsets,
                committed_total=reading.committed_offsets,
                lag=reading.lag,
            )
            rates, arrived = update_rates(
                Rates(before.incoming_rate, before.consumption_rate),
                _sample(before.sample),
                sample,
                ready,
                self._settings.rate_window_seconds,
            )
            last_scale = from_rfc3339(before.last_scale_time)
            idle_since = from_rfc3339(before.idle_since)
            decision = plan(
                scaler.scaling.policy(),
                Observation(
                    lag=reading.lag,
                    partitions=reading.partitions,
                    arrived=arrived,
                    incoming_rate=rates.incoming_rate,
                    rate_per_replica=rates.rate_per_replica,
                    replicas=replicas,
                    ready_replicas=ready,
                    now=now.timestamp(),
                    last_scale_time=last_scale.timestamp() if last_scale else None,
                    idle_since=idle_since.timestamp() if idle_since else None,
                ),
            )
            desired = decision.replicas
            update: dict[str, Any] = {
                "partitions": reading.partitions,
                "observed_lag": reading.lag,
                "incoming_rate": round(rates.incoming_rate, 6),
                "consumption_rate": (
                    round(rates.rate_per_replica, 6) if rates.rate_per_replica is not None else None
                ),
                "idle_since": (
                    to_rfc3339(dt.datetime.fromtimestamp(decision.idle_since, dt.UTC))
                    if decision.idle_since is not None
                    else None
                ),
                "last_decision": decision.reason[:1000],
                "sample": SampleState(
                    sampled_at=to_rfc3339(now),
                    end_offsets=reading.end_offsets,
                    committed_offsets=reading.committed_offsets,
                    lag=reading.lag,
                ),
            }
            if desired != replicas:
                self._kube.scale(ref.namespace, scaler.scale_target_ref.name, desired)
                direction = "up" if desired > replicas else "down"
                self._metrics.scale_events.labels(*labels, direction).inc()
                events.append(
                    Event(
                        "Normal",
                        "ScaledUp" if direction == "up" else "ScaledDown",
                        f"{replicas} -> {desired} replicas: {decision.reason}"[:1000],
                    )
                )
                update["last_scale_time"] = to_rfc3339(now)
            status = status.model_copy(update=update)
            self._metrics.lag.labels(*labels).set(reading.lag)
            self._metrics.consumption_rate.labels(*labels).set(rates.rate_per_replica or 0.0)

        reason = (
            "ScaledToZero" if desired == 0 else "PodsReady" if ready >= desired else "PodsNotReady"
        )
        stage_ready = Condition(
            type=READY,
            status="True" if ready >= desired else "False",
            reason=reason,
            message=f"{ready}/{desired} pods ready",
        )
        status = status.model_copy(
            update={
                "replicas": desired,
                "desired_replicas": desired,
                "ready_replicas": ready,
                "conditions": set_condition(status.conditions, stage_ready, now),
            }
        )
        self._metrics.desired_replicas.labels(*labels).set(desired)
        self._metrics.replicas.labels(*labels).set(desired)
        self._metrics.ready_replicas.labels(*labels).set(ready)
        self._metrics.lag_source_up.labels(*labels).set(1 if reading is not None else 0)
        return status

    def _read_lag(
        self, ref: ScalerRef, target: LagTarget, before: ScalerStatus, now: dt.datetime
    ) -> tuple[LagReading | None, LagSourceState, Condition]:
        """The lag, or None with the backoff state and a condition saying why not."""
        retry_at = from_rfc3339(before.lag_source.retry_at)
        if retry_at is not None and now < retry_at and before.lag_source.failures > 0:
            old = before.condition(LAG_SOURCE)
            message = f"{old.message if old else 'offset read failed'}; next try at "
            return (
                None,
                before.lag_source,
                Condition(
                    type=LAG_SOURCE,
                    status="False",
                    reason="RetryBackoff",
                    message=(message + to_rfc3339(retry_at))[:1000],
                ),
            )
        try:
            reading = self._lag.read(target.bootstrap_servers, target.topic, target.group)
        except LagSourceError as exc:
            self._metrics.reconcile_errors.labels(ref.namespace, ref.name, "lag_source").inc()
            failures = before.lag_source.failures + 1
            kafka = self._settings.kafka
            delay = min(kafka.retry_max_seconds, kafka.retry_base_seconds * 2 ** (failures - 1))
            return (
                None,
                LagSourceState(
                    failures=failures, retry_at=to_rfc3339(now + dt.timedelta(seconds=delay))
                ),
                Condition(
                    type=LAG_SOURCE,
                    status="False",
                    reason="OffsetsUnreadable",
                    message=(
                        f"reading group {target.group} on {target.topic} at "
                        f"{target.bootstrap_servers} failed ({failures}x, retry in "
                        f"{delay:.0f}s); replicas kept: {exc}"
                    )[:1000],
                ),
            )
        return (
            reading,
            LagSourceState(),
            Condition(
                type=LAG_SOURCE,
                status="True",
                reason="OffsetsRead",
                message=f"group {target.group}: {reading.partitions} partitions, lag {reading.lag}",
            ),
        )

    def _not_ready(
        self,
        ref: ScalerRef,
        before: ScalerStatus,
        reason: str,
        message: str,
        now: dt.datetime,
        error_kind: str | None,
    ) -> ReconcileResult:
        """Ready=False with the cause; the replicas and the scaling memory stay as they
        were. A Warning event only when the cause is new (no event per pass)."""
        message = message[:1000]
        if error_kind is not None:
            self._metrics.reconcile_errors.labels(ref.namespace, ref.name, error_kind).inc()
        old = before.condition(READY)
        new_cause = old is None or (old.reason, old.message) != (reason, message)
        events = [Event("Warning", reason, message)] if new_cause else []
        condition = Condition(type=READY, status="False", reason=reason, message=message)
        status = before.model_copy(
            update={"conditions": set_condition(before.conditions, condition, now)}
        )
        return ReconcileResult(status.dump(), events)


def _describe(exc: Exception) -> str:
    """A short, stable message: an API error's status and the server's message, without the
    response headers (their Date would make every pass look like a new error)."""
    if isinstance(exc, ApiException):
        try:
            detail = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            detail = ""
        return f"Kubernetes API {exc.status} {exc.reason}: {detail}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _is_true(condition: Condition | None) -> bool | None:
    """True/False for a known condition status, None when absent or Unknown."""
    if condition is None or condition.status == "Unknown":
        return None
    return condition.status == "True"


def _sample(state: SampleState | None) -> OffsetSample | None:
    if state is None:
        return None
    at = from_rfc3339(state.sampled_at)
    if at is None:
        return None
    return OffsetSample(
        time=at.timestamp(),
        end_total=state.end_offsets,
        committed_total=state.committed_offsets,
        lag=state.lag,
    )
