"""One pipeline definition: an ordered list of stages with their topics (as a DataTrove
pipeline is a list of steps), read by every executor of it.

- ``sluice run --pipeline FILE`` (and ``--stages a,b``) runs it in process
  (services.local.runner), chaining stages exactly as their topics chain on Kafka;
- ``sluice pipeline render-values FILE`` renders it into the chart's ``stages`` values,
  so the same file deploys it.

A stage's input topic defaults to the previous stage's output (the first stage's: the
registry's default input, where ``sluice publish`` writes), its output and group to the
registry's defaults. A stage may name its input explicitly to read an earlier topic (two
stages reading one topic fan out, each with its own group, as on Kafka). The file::

    stages:
      - scoring                       # a kind alone: defaults
      - kind: density
        config: {mode: online}        # the stage's settings, as in its --config YAML
      - kind: distill
        topics: {input: sluice.scored} # beside density, not after it

Topics and group belong to the pipeline, not to ``config`` (as the chart owns them too):
``config.kafka`` may tune the client, not name its topics.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from services.runtime.registry import KINDS, load_stage_settings, stage
from services.runtime.settings import ServiceSettings, StrictModel

OWNED_KAFKA_KEYS = ("input_topic", "output_topic", "dlq_topic", "group_id")


class StageTopics(StrictModel):
    """Where a stage reads and writes; '' = derived (see the module docstring)."""

    input: str = Field("", description="Topic consumed; '' = the previous stage's output.")
    output: str = Field("", description="Topic the kept samples go to; '' = the registry's.")
    dlq: str = Field("", description="Dead-letter topic; '' = '<input>.dlq'.")


class PipelineStage(StrictModel):
    """One step of a pipeline: a registered stage kind, its topics and its settings."""

    kind: str = Field(description="A registered stage kind (services.runtime.registry).")
    topics: StageTopics = Field(default_factory=StageTopics)  # type: ignore[arg-type]
    group: str = Field("", description="Consumer group; '' = the registry's default.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The stage's settings, as in its --config YAML and the chart's "
        "stages.<kind>.config (topics and group excepted).",
    )

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        stage(kind)  # ConfigError naming the known kinds
        return kind

    @field_validator("config")
    @classmethod
    def _no_topics(cls, config: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(config.get("kafka") or {}) & set(OWNED_KAFKA_KEYS))
        if owned:
            raise ValueError(f"config.kafka.{owned[0]}: set the stage's topics/group instead")
        return config

    def settings(self) -> ServiceSettings:
        """The stage's settings: its config with the pipeline's topics and group."""
        kafka = {
            **(self.config.get("kafka") or {}),
            "input_topic": self.topics.input,
            "output_topic": self.topics.output,
            "dlq_topic": self.topics.dlq,
            "group_id": self.group,
        }
        return load_stage_settings(self.kind, {**self.config, "kafka": kafka})


class Pipeline(StrictModel):
    """Stages in order; after validation every topic and group is resolved."""

    stages: list[PipelineStage] = Field(
        default_factory=lambda: [PipelineStage(kind="scoring")],
        min_length=1,
        description=f"Stages in order; kinds: {', '.join(KINDS)}. A kind alone is a stage "
        "with defaults.",
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _kinds_alone(cls, stages: Any) -> Any:
        if isinstance(stages, str):  # "scoring,density"
            stages = [s.strip() for s in stages.split(",") if s.strip()]
        if isinstance(stages, list):
            return [{"kind": s} if isinstance(s, str) else s for s in stages]
        return stages

    @model_validator(mode="after")
    def _chain(self) -> Pipeline:
        """Fill in derived topics and groups, then check that the chain holds: each input is
        the source or an earlier stage's output, no two stages share a kind (the chart
        deploys one per kind) and no output feeds back into the pipeline."""
        kinds = [s.kind for s in self.stages]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"a stage kind may appear once per pipeline, repeated: {repeated}")
        produced: list[str] = []
        for i, s in enumerate(self.stages):
            spec = stage(s.kind)
            t = s.topics
            t.input = t.input or (self.stages[i - 1].topics.output if i else spec.topics.input)
            t.output = t.output or spec.topics.output
            s.group = s.group or spec.topics.group
            if i and t.input not in produced:
                raise ValueError(
                    f"stage {s.kind} reads {t.input!r}, which no stage before it writes "
                    f"(written so far: {', '.join(produced)})"
                )
            if t.output == self.source or t.output in produced or t.output == t.input:
                raise ValueError(f"stage {s.kind} writes {t.output!r}, a topic already in use")
            produced.append(t.output)
        return self

    @property
    def source(self) -> str:
        """The topic the pipeline's input is published to."""
        return self.stages[0].topics.input

    @property
    def sinks(self) -> list[str]:
        """Outputs no stage of the pipeline reads: what the pipeline delivers."""
        read = {s.topics.input for s in self.stages}
        return [s.topics.output for s in self.stages if s.topics.output not in read]

    def to_chart_values(self) -> dict[str, Any]:
        """The chart's ``stages`` values for this pipeline: every registered kind, enabled
        exactly when the pipeline runs it, with the pipeline's topics, group and config."""
        by_kind = {s.kind: s for s in self.stages}
        values: dict[str, Any] = {}
        for kind in KINDS:
            s = by_kind.get(kind)
            if s is None:
                values[kind] = {"enabled": False}
                continue
            values[kind] = {
                "enabled": True,
                "topics": {"input": s.topics.input, "output": s.topics.output, "dlq": s.topics.dlq},
                "group": s.group,
                "config": s.config,
            }
        return {"stages": values}
