"""Stage processors for tests of the stage loop itself."""

from __future__ import annotations

from services.runtime.domain import Outcome, Sample


class KeepAll:
    """A StageCore that keeps every sample unchanged."""

    model_version = "keep-1"

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.steps = ["keep"]

    def process(self, samples: list[Sample]) -> list[Outcome]:
        return [Outcome(s, kept=True) for s in samples]
