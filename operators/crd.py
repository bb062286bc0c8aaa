"""The SluicePipeline resource as typed objects: its spec (validated) and its status.

The CRD's openAPIV3Schema (charts/sluice/crds/sluicepipelines.sluice.dev.yaml) is what the API
server enforces; these models are what the operator reads. They carry the same fields and
defaults (tests/operators/test_crd.py keeps the two in step) plus the checks a schema cannot
express everywhere: ``minReplicas <= maxReplicas``, unique stage names and consumer groups,
object names within 63 characters, no user env var overriding the ones the operator owns.

Why one resource with a list of stages (not one resource per stage): a pipeline is what a
platform team deploys and reasons about; its stages share a broker and chain topics
(output of one, input of the next), which one object can validate and one
``kubectl get sluicepipelines`` can show; and scaling state per stage sits side by side in
one status. Every stage is still planned on its own.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from operators.planner import ScalingPolicy

# Services that exist in the image (one package per stage under services/).
StageKind = Literal["scoring", "density", "rewrite", "synth", "distill"]

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
TOPIC = r"^[a-zA-Z0-9._-]{1,249}$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[munk]|e[0-9]+)?$"
BOOTSTRAP = r"^[^,\s]+:[0-9]+(,[^,\s]+:[0-9]+)*$"


# Env vars the operator owns on every stage container: fixed names, and the service's own
# settings (prefixed SLUICE_<KIND>_) for the broker, topics, group and ports.
FIXED_ENV = ("SLUICE_SERVICE", "HOME", "XDG_CACHE_HOME")
SETTINGS_ENV = (
    "KAFKA__BOOTSTRAP_SERVERS",
    "KAFKA__INPUT_TOPIC",
    "KAFKA__OUTPUT_TOPIC",
    "KAFKA__DLQ_TOPIC",
    "KAFKA__GROUP_ID",
    "GRPC__PORT",
    "METRICS__PORT",
    "METRICS__ENABLED",
)


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


class KafkaSpec(_Spec):
    bootstrap_servers: str = Field(pattern=BOOTSTRAP, description="host:port[,host:port...]")


class TopicsSpec(_Spec):
    input: str = Field(pattern=TOPIC, description="Topic consumed; its lag drives scaling.")
    output: str = Field(pattern=TOPIC, description="Topic produced to.")
    dlq: str = Field("", pattern=r"^$|" + TOPIC, description="'' = '<input>.dlq'.")


Quantity = Annotated[str, StringConstraints(pattern=QUANTITY)]


class ResourcesSpec(_Spec):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class EnvVarSpec(_Spec):
    """A Kubernetes EnvVar: a literal value or a reference (valueFrom)."""

    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict[str, Any] | None = None


class ImagePullSecretSpec(_Spec):
    name: str = Field(min_length=1)


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


class StageSpec(_Spec):
    name: str = Field(pattern=DNS_LABEL, max_length=30)
    kind: StageKind
    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    topics: TopicsSpec
    group: str = Field(min_length=1, max_length=255)
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    env: list[EnvVarSpec] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    model_cache_size_limit: str = Field("4Gi", pattern=QUANTITY)
    termination_grace_period_seconds: int = Field(60, ge=0)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)  # type: ignore[arg-type]

    @property
    def env_prefix(self) -> str:
        """The service's settings prefix: SLUICE_SCORING_ for kind scoring."""
        return f"SLUICE_{self.kind.upper()}_"

    @property
    def owned_env_names(self) -> set[str]:
        """Env vars the operator sets on this stage's container (users may set any other)."""
        return set(FIXED_ENV) | {self.env_prefix + s for s in SETTINGS_ENV}


class PipelineSpec(_Spec):
    kafka: KafkaSpec
    image_pull_secrets: list[ImagePullSecretSpec] = Field(default_factory=list)
    stages: list[StageSpec] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique(self) -> PipelineSpec:
        for attr in ("name", "group"):
            values = [getattr(s, attr) for s in self.stages]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"stage {attr}s must be unique, repeated: {dupes}")
        return self


def object_name(pipeline: str, stage: str) -> str:
    """``<pipeline>-<stage>``: the name of a stage's Deployment and Service."""
    return f"{pipeline}-{stage}"


def parse_spec(pipeline: str, spec: dict[str, Any]) -> PipelineSpec:
    """The validated spec of pipeline ``pipeline``, or SpecError saying what is wrong."""
    try:
        parsed = PipelineSpec.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise SpecError(problems) from None
    for stage in parsed.stages:
        name = object_name(pipeline, stage.name)
        if len(name) > 63:
            raise SpecError(f"stage {stage.name}: object name {name!r} is over 63 characters")
        clash = sorted({e.name for e in stage.env} & stage.owned_env_names)
        if clash:
            raise SpecError(f"stage {stage.name}: env sets operator-owned variables {clash}")
    return parsed


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


class StageStatus(_Status):
    name: str
    deployment: str = ""
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


class PipelineStatus(_Status):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    stages: list[StageStatus] = Field(default_factory=list)

    def stage(self, name: str) -> StageStatus | None:
        return next((s for s in self.stages if s.name == name), None)


def parse_status(status: dict[str, Any] | None) -> PipelineStatus:
    """The previous status; an unreadable one is forgotten, not fatal (it is only memory)."""
    try:
        return PipelineStatus.model_validate(status or {})
    except ValidationError:
        return PipelineStatus()


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
