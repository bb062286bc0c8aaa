"""Transport-independent domain objects that every service core works on.

Cores never see protobuf or Kafka records: adapters convert at the edge
(services.runtime.convert), so the same core serves gRPC, Kafka and local runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum


class Action(IntEnum):
    """What a stage did with a sample (mirrors sluice.common.v1.Action)."""

    KEPT = 1
    DROPPED = 2
    CHANGED = 3
    CREATED = 4


@dataclass(slots=True)
class LineageEvent:
    """One stage decision in a sample's history."""

    stage: str
    action: Action
    reason: str = ""
    model_version: str = ""
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    parent_id: str = ""


@dataclass(slots=True)
class Sample:
    """A document or an SFT (prompt, response) pair, with scores and lineage."""

    id: str
    text: str = ""
    prompt: str = ""
    response: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    lineage: list[LineageEvent] = field(default_factory=list)
    embedding: list[float] | None = None
    """A precomputed embedding of ``content`` (float32 on the wire), or None: stages
    that need one (density) embed the text themselves."""

    @property
    def content(self) -> str:
        """The text a quality signal looks at: the document, or prompt + response."""
        if self.text:
            return self.text
        return f"{self.prompt}\n\n{self.response}".strip()


@dataclass(slots=True)
class Outcome:
    """A stage's decision about one sample. ``reason`` is ``"<step>:<why>"`` when dropped."""

    sample: Sample
    kept: bool
    reason: str = ""

    @property
    def step(self) -> str:
        """The step that dropped the sample (the part of ``reason`` before ':')."""
        return self.reason.split(":", 1)[0] if self.reason else ""


@dataclass(frozen=True, slots=True)
class StepCount:
    """Samples entering a step of a stage and kept by it (derived from outcomes)."""

    step: str
    samples_in: int
    samples_kept: int


def step_counts(outcomes: Sequence[Outcome], steps: Sequence[str]) -> list[StepCount]:
    """Per-step retention, derived from drop reasons ('<step>:<rule>'; steps run in order)."""
    alive = len(outcomes)
    dropped_by = {s: 0 for s in steps}
    for o in outcomes:
        if not o.kept and o.step in dropped_by:
            dropped_by[o.step] += 1
    out = []
    for s in steps:
        kept = alive - dropped_by[s]
        out.append(StepCount(s, alive, kept))
        alive = kept
    return out
