"""The SluiceScaler resource as typed objects: its spec (validated) and its status.

The CRD's openAPIV3Schema (charts/sluice/crds/sluicescalers.sluice.dev.yaml) is what the API
server enforces; these models are what the operator reads. They carry the same fields and
defaults (tests/operators/test_crd.py keeps the two in step) plus the check the schema
states as a CEL rule: ``minReplicas <= maxReplicas``.

A SluiceScaler is to a stage what a KEDA ScaledObject or an HPA is to a workload: it points
at a Deployment someone else renders (``scaleTargetRef``; the chart, for Sluice stages) and
carries only how to size it: the stage kind and the stage's own config (from which the
registry names the consumer group and input topic whose lag drives it) and the policy.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from operators.planner import ScalingPolicy

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class SpecError(ValueError):
    """The resource's spec is invalid: nothing a retry can fix."""


class _Spec(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown keys are typos."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        frozen=True,
    )


class TargetRef(_Spec):
    """The workload to scale (the chart's stage Deployment): only Deployments for now."""

    api_version: Literal["apps/v1"] = "apps/v1"
    kind: Literal["Deployment"] = "Deployment"
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)


class StageRef(_Spec):
    """Which stage the target runs, and with what settings (the stage's config file)."""

    kind: str = Field(min_length=1, description="A stage kind of the registry.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The stage's settings, as in its --config file: broker, input topic, "
        "group and whatever else decides which group it commits.",
    )


class ScalingSpec(_Spec):
    min_replicas: int = Field(0, ge=0, description="0 allows scale to zero when idle.")
    max_replicas: int = Field(4, ge=1)
    drain_seconds: int = Field(300, ge=1, description="Drain the backlog within this time.")
    target_lag_per_replica: int | None = Field(
        None, ge=1, description="Optional: at most this many messages behind per replica."
    )
    warmup_seconds: int = Field(120, ge=0, description="Pod start + model load time.")
    scale_up_cooldown_seconds: int = Field(30, ge=0)
    scale_down_cooldown_seconds: int = Field(300, ge=0)
    idle_seconds: int = Field(600, ge=0, description="Lag 0, nothing arriving: then to zero.")
    tolerance_percent: int = Field(10, ge=0, le=90, description="Scale-down hysteresis band.")

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) > maxReplicas ({self.max_replicas})"
            )
        return self

    def policy(self) -> ScalingPolicy:
        return ScalingPolicy(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            drain_seconds=float(self.drain_seconds),
            target_lag_per_replica=self.target_lag_per_replica,
            warmup_seconds=float(self.warmup_seconds),
            scale_up_cooldown_seconds=float(self.scale_up_cooldown_seconds),
            scale_down_cooldown_seconds=float(self.scale_down_cooldown_seconds),
            idle_seconds=float(self.idle_seconds),
            tolerance=self.tolerance_percent / 100.0,
        )


class ScalerSpec(_Spec):
    scale_target_ref: TargetRef
    stage: StageRef
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)  # type: ignore[arg-type]


def parse_spec(spec: dict[str, Any]) -> ScalerSpec:
    """The validated spec, or SpecError saying what is wrong."""
    try:
        return ScalerSpec.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise SpecError(problems) from None


# -- status ---------------------------------------------------------------------------------


class _Status(BaseModel):
    """Status is the operator's own memory: read leniently (fields may be missing after an
    upgrade), written in camelCase."""

    model_config = ConfigDict(
        extra="ignore",
        populate_by_name=True,
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
    )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(_Status):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class LagSourceState(_Status):
    failures: int = 0
    retry_at: str | None = None


class SampleState(_Status):
    sampled_at: str
    end_offsets: int
    committed_offsets: int
    lag: int


class ScalerStatus(_Status):
    observed_generation: int | None = None
    consumer_group: str = ""
    topic: str = ""
    replicas: int = 0
    desired_replicas: int = 0
    ready_replicas: int = 0
    partitions: int | None = None
    observed_lag: int | None = None
    incoming_rate: float = 0.0
    consumption_rate: float | None = None
    last_scale_time: str | None = None
    idle_since: str | None = None
    last_decision: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    lag_source: LagSourceState = Field(default_factory=LagSourceState)
    sample: SampleState | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def parse_status(status: dict[str, Any] | None) -> ScalerStatus:
    """The previous status; an unreadable one is forgotten, not fatal (it is only memory)."""
    try:
        return ScalerStatus.model_validate(status or {})
    except ValidationError:
        return ScalerStatus()


def set_condition(conditions: list[Condition], new: Condition, now: dt.datetime) -> list[Condition]:
    """Conditions with ``new`` replacing its type; lastTransitionTime moves only on a change
    of status (the Kubernetes convention)."""
    old = next((c for c in conditions if c.type == new.type), None)
    if old is None or old.status != new.status or not old.last_transition_time:
        stamp = to_rfc3339(now)
    else:
        stamp = old.last_transition_time
    merged = new.model_copy(update={"last_transition_time": stamp})
    if old is None:
        return [*conditions, merged]
    return [merged if c.type == new.type else c for c in conditions]


def to_rfc3339(t: dt.datetime) -> str:
    # Fixed width (always microseconds), so the strings also sort in time order.
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def from_rfc3339(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s)
    except ValueError:
        return None
