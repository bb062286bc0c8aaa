"""One reconcile pass over a SluicePipeline: make the world match the spec, then scale.

Level-based: each pass reads everything afresh (the live Deployments, the broker's offsets)
and acts on what it sees, not on remembered events, so a missed or repeated pass is
harmless. The previous status is used only as memory: the last offset sample (for rates),
smoothed rates, the last scale time and idle clock, and the lag source's backoff.

Per stage:
  1. apply the desired Deployment and Service (create; patch only on drift),
  2. read the group's lag (unless a broker failure backoff is running; on failure keep the
     replicas as they are and set LagSourceAvailable=False),
  3. fold the offsets into the rates, plan (``operators.planner``), and set replicas through
     the scale subresource when the plan differs from the live count.
Then delete the objects of stages that left the spec. Nothing here talks to kopf: the pass
returns the status to write and the events to post (``operators.handlers`` does both).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException

from operators.actuator import KubeActuator, NotOwnedError
from operators.crd import (
    Condition,
    LagSourceState,
    PipelineSpec,
    PipelineStatus,
    SampleState,
    SpecError,
    StageSpec,
    StageStatus,
    from_rfc3339,
    object_name,
    parse_spec,
    parse_status,
    set_condition,
    to_rfc3339,
)
from operators.desired import STAGE_LABEL, desired_deployment, desired_service
from operators.lag import KafkaLagSource, LagReading, LagSourceError
from operators.metrics import OperatorMetrics
from operators.planner import Observation, OffsetSample, Rates, plan, update_rates
from operators.settings import OperatorSettings

log = logging.getLogger(__name__)

READY = "Ready"
LAG_SOURCE = "LagSourceAvailable"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the pipeline."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class ReconcileResult:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class PipelineRef:
    name: str
    namespace: str
    uid: str
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
        ref: PipelineRef,
        spec: dict[str, Any],
        status: dict[str, Any] | None,
        now: dt.datetime,
    ) -> ReconcileResult:
        prev = parse_status(status)
        events: list[Event] = []
        try:
            pipeline = parse_spec(ref.name, spec)
        except SpecError as exc:
            return self._invalid(ref, prev, str(exc), now)

        stages: list[StageStatus] = []
        for stage in pipeline.stages:
            before = prev.stage(stage.name) or StageStatus(name=stage.name)
            try:
                stages.append(self._stage(ref, pipeline, stage, before, now, events))
            except Exception as exc:  # one stage's failure must not stop the others
                stages.append(self._failed(ref, stage.name, before, exc, now, events))

        try:
            removed = self._remove_stages(ref, {s.name for s in pipeline.stages}, events)
        except Exception as exc:  # retried next pass; the stages themselves are reconciled
            log.error("removing stages of %s/%s: %s", ref.namespace, ref.name, _describe(exc))
            self._metrics.reconcile_errors.labels(ref.namespace, ref.name, "kubernetes").inc()
            removed = set()
        gone = {s.name for s in prev.stages} - {s.name for s in pipeline.stages}
        self._metrics.forget(ref.namespace, ref.name, sorted(gone | removed))

        not_ready = [s.name for s in stages if not _is_true(s.condition(READY))]
        ready = Condition(
            type=READY,
            status="False" if not_ready else "True",
            reason="StagesNotReady" if not_ready else "AllStagesReady",
            message=f"not ready: {', '.join(not_ready)}" if not_ready else "",
        )
        result = PipelineStatus(
            observed_generation=ref.generation,
            conditions=set_condition(prev.conditions, ready, now),
            stages=stages,
        )
        return ReconcileResult(result.dump(), events)

    # -- one stage -----------------------------------------------------------------------

    def _stage(
        self,
        ref: PipelineRef,
        pipeline: PipelineSpec,
        stage: StageSpec,
        before: StageStatus,
        now: dt.datetime,
        events: list[Event],
    ) -> StageStatus:
        labels = (ref.namespace, ref.name, stage.name)
        name = object_name(ref.name, stage.name)
        policy = stage.scaling.policy()

        deployment = self._kube.apply(
            desired_deployment(ref.name, ref.uid, ref.namespace, pipeline, stage),
            replicas=stage.scaling.min_replicas,
        )
        service = self._kube.apply(desired_service(ref.name, ref.uid, ref.namespace, stage))
        for kind, res in (("Deployment", deployment), ("Service", service)):
            if res.action == "created":
                events.append(Event("Normal", "Created", f"{kind} {name} for stage {stage.name}"))
            elif res.action == "updated":
                events.append(
                    Event("Normal", "Updated", f"{kind} {name}: {'; '.join(res.reasons)[:500]}")
                )
        live_spec = deployment.object.get("spec") or {}
        replicas = int(live_spec.get("replicas", 1))
        ready = int((deployment.object.get("status") or {}).get("readyReplicas") or 0)

        reading, lag_state, lag_condition = self._read_lag(ref, pipeline, stage, before, now)
        if lag_condition.status == "False" and _is_true(before.condition(LAG_SOURCE)) is not False:
            events.append(
                Event("Warning", "LagSourceUnavailable", f"{stage.name}: {lag_condition.message}")
            )
        elif lag_condition.status == "True" and _is_true(before.condition(LAG_SOURCE)) is False:
            events.append(
                Event("Normal", "LagSourceAvailable", f"{stage.name}: offsets readable again")
            )

        status = before.model_copy(
            update={
                "deployment": name,
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
            previous = _sample(before.sample)
            rates, arrived = update_rates(
                Rates(before.incoming_rate, before.consumption_rate),
                previous,
                sample,
                ready,
                self._settings.rate_window_seconds,
            )
            last_scale = from_rfc3339(before.last_scale_time)
            idle_since = from_rfc3339(before.idle_since)
            decision = plan(
                policy,
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
                self._kube.scale(ref.namespace, name, desired)
                direction = "up" if desired > replicas else "down"
                self._metrics.scale_events.labels(*labels, direction).inc()
                events.append(
                    Event(
                        "Normal",
                        "ScaledUp" if direction == "up" else "ScaledDown",
                        f"{stage.name}: {replicas} -> {desired} replicas: {decision.reason}"[:1000],
                    )
                )
                update["last_scale_time"] = to_rfc3339(now)
            status = status.model_copy(update=update)
            self._metrics.lag.labels(*labels).set(reading.lag)
            self._metrics.consumption_rate.labels(*labels).set(rates.rate_per_replica or 0.0)

        stage_ready = Condition(
            type=READY,
            status="True" if ready >= desired else "False",
            reason="ScaledToZero"
            if desired == 0
            else "PodsReady"
            if ready >= desired
            else "PodsNotReady",
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

    def _failed(
        self,
        ref: PipelineRef,
        stage: str,
        before: StageStatus,
        exc: Exception,
        now: dt.datetime,
        events: list[Event],
    ) -> StageStatus:
        """The stage's status after a failed pass: Ready=False with the cause; the replicas
        and the scaling memory stay as they were. A Warning event on a new cause only."""
        if isinstance(exc, NotOwnedError):
            reason, message = "ObjectNotOwned", str(exc)
        else:
            log.error("reconciling %s/%s stage %s: %r", ref.namespace, ref.name, stage, exc)
            reason, message = "ReconcileError", _describe(exc)
        message = message[:1000]
        self._metrics.reconcile_errors.labels(ref.namespace, ref.name, "kubernetes").inc()
        old = before.condition(READY)
        if old is None or (old.reason, old.message) != (reason, message):
            events.append(Event("Warning", reason, f"{stage}: {message}"))
        condition = Condition(type=READY, status="False", reason=reason, message=message)
        return before.model_copy(
            update={"conditions": set_condition(before.conditions, condition, now)}
        )

    def _read_lag(
        self,
        ref: PipelineRef,
        pipeline: PipelineSpec,
        stage: StageSpec,
        before: StageStatus,
        now: dt.datetime,
    ) -> tuple[LagReading | None, LagSourceState, Condition]:
        """The lag, or None with the backoff state and a condition saying why not."""
        retry_at = from_rfc3339(before.lag_source.retry_at)
        if retry_at is not None and now < retry_at and before.lag_source.failures > 0:
            old = before.condition(LAG_SOURCE)
            return (
                None,
                before.lag_source,
                Condition(
                    type=LAG_SOURCE,
                    status="False",
                    reason="RetryBackoff",
                    message=(
                        f"{old.message if old else 'offset read failed'}; "
                        f"next try at {to_rfc3339(retry_at)}"
                    )[:1000],
                ),
            )
        try:
            reading = self._lag.read(
                pipeline.kafka.bootstrap_servers, stage.topics.input, stage.group
            )
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
                        f"reading group {stage.group} on {stage.topics.input} at "
                        f"{pipeline.kafka.bootstrap_servers} failed ({failures}x, retry in "
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
                message=f"{reading.partitions} partitions, lag {reading.lag}",
            ),
        )

    # -- pipeline-level ------------------------------------------------------------------

    def _remove_stages(self, ref: PipelineRef, keep: set[str], events: list[Event]) -> set[str]:
        removed: set[str] = set()
        for kind in ("Deployment", "Service"):
            for obj in self._kube.list_owned(kind, ref.namespace, ref.name, ref.uid):  # type: ignore[arg-type]
                stage = (obj["metadata"].get("labels") or {}).get(STAGE_LABEL)
                if stage is not None and stage not in keep:
                    self._kube.delete(kind, ref.namespace, obj["metadata"]["name"])  # type: ignore[arg-type]
                    events.append(
                        Event(
                            "Normal",
                            "Deleted",
                            f"{kind} {obj['metadata']['name']}: stage {stage} left the spec",
                        )
                    )
                    removed.add(stage)
        return removed

    def _invalid(
        self, ref: PipelineRef, prev: PipelineStatus, message: str, now: dt.datetime
    ) -> ReconcileResult:
        self._metrics.reconcile_errors.labels(ref.namespace, ref.name, "spec").inc()
        old = next((c for c in prev.conditions if c.type == READY), None)
        events = (
            []
            if old is not None and old.reason == "InvalidSpec" and old.message == message
            else [Event("Warning", "InvalidSpec", message[:1000])]
        )
        ready = Condition(type=READY, status="False", reason="InvalidSpec", message=message[:1000])
        status = prev.model_copy(
            update={
                "observed_generation": ref.generation,
                "conditions": set_condition(prev.conditions, ready, now),
            }
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
