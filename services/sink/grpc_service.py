"""The sink's gRPC side. The trainer-facing read API (protos/sluice/sink/v1) is not built
yet: ``serve`` mode runs health and reflection only, so the chart's probes work."""

from __future__ import annotations

from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register
from services.runtime.stage import StageCore


def register(core: StageCore, metrics: StageMetrics) -> Register:
    del core, metrics
    return lambda server: []
