"""Transport-independent domain objects that every service core works on.

Cores never see protobuf or Kafka records: adapters convert at the edge
(services.runtime.convert), so the same core serves gRPC, Kafka and local runs.
"""

from __future__ import annotations

import time
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
