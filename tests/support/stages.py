"""Stage processors and stand-in Kafka records for tests of the stage loop itself."""

from __future__ import annotations

from dataclasses import dataclass

from kafka.structs import TopicPartition

from services.runtime.codec import BatchCodec
from services.runtime.domain import Outcome, Sample


class KeepAll:
    """A StageCore that keeps every sample unchanged."""

    model_version = "keep-1"

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.steps = ["keep"]

    def process(self, samples: list[Sample]) -> list[Outcome]:
        return [Outcome(s, kept=True) for s in samples]


@dataclass
class Rec:
    """A consumer record as the stage loop reads it."""

    topic: str
    partition: int
    offset: int
    value: bytes
    headers: list[tuple[str, bytes]]
    key: bytes | None = None


def records(tp: TopicPartition, offsets: range) -> list[Rec]:
    """One record per offset of ``tp``, each a batch of one sample ``<partition>-<offset>``."""
    out = []
    for off in offsets:
        value, headers = BatchCodec().encode([Sample(id=f"{tp.partition}-{off}", text="x")], "t")
        out.append(Rec(tp.topic, tp.partition, off, value, headers))
    return out
