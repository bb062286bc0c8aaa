"""The stage core interface: what every service core is, whichever adapter drives it.

The Kafka stage loop, the gRPC servicers, the local runner and ``run_service`` all see a
core through this Protocol, so a new stage is a new implementation of it and nothing
else changes (MLServer's ``MLModel`` plays the same part). It lives here, not in the
Kafka adapter, because the Kafka loop is only one of its callers.

One way to do each thing a core needs:

- construction: ``Core(settings, metrics)``, the registry's core factory; metrics are bound
  there, once, in every mode (a worker-only process records generation too);
- models: loaded on first use through ``services.runtime.backends.base.build_lazily``;
- ``model_version``: a property (lineage identifier of what decided);
- per-request generation limits: ``services.runtime.backends.base.merge_generation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.runtime.domain import Outcome, Sample


class StageObserver(Protocol):
    """Where a core reports work its outcomes do not show (services.runtime.metrics.
    StageMetrics): generation tokens and latency, per-step counts of a stage whose
    decisions mostly keep the sample. Bound at construction (``metrics=``), once."""

    def observe_generation(self, tokens: int, seconds: float) -> None: ...

    def observe_step(self, step: str, n_in: int, n_kept: int) -> None: ...


class StageCore(Protocol):
    """A service core as every adapter sees it."""

    @property
    def signals(self) -> Sequence[str]:
        """Score names to record in histograms."""
        ...

    @property
    def steps(self) -> Sequence[str]:
        """The steps a sample passes, in order; a drop reason starts with '<step>:'.
        Per-step retention (sluice_step_samples) is derived from them."""
        ...

    @property
    def model_version(self) -> str:
        """What decided: recorded in each sample's lineage and the run report."""
        ...

    def process(self, samples: list[Sample]) -> list[Outcome]:
        """One outcome per input sample (plus any samples the stage creates)."""
        ...
