"""gRPC adapter of the dedup core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.dedup.core import DedupCore, Verdict
from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.dedup.v1 import dedup_pb2, dedup_pb2_grpc
from services.runtime.convert import (
    check_response_room,
    sample_from_proto,
    sample_to_proto,
    validate_samples,
)
from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration

SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].full_name


def _verdict(v: Verdict) -> dedup_pb2.Verdict:
    return dedup_pb2.Verdict(
        id=v.sample_id,
        duplicate=v.duplicate,
        level=v.level,
        duplicate_of=v.duplicate_of,
        similarity=v.similarity,
    )


class DedupServicer(dedup_pb2_grpc.DedupServiceServicer):
    def __init__(self, core: DedupCore, metrics: StageMetrics) -> None:
        self.core = core
        self.metrics = metrics

    def _samples(self, msgs: Sequence[sample_pb2.Sample]) -> list[Sample]:
        if not msgs:
            raise InvalidArgument("request has no samples")
        limit = self.core.settings.max_request_samples
        if len(msgs) > limit:
            raise InvalidArgument(f"{len(msgs)} samples in one request, limit {limit}")
        samples = [sample_from_proto(m) for m in msgs]
        validate_samples(samples)
        semantic_only = self.core.levels == ["semantic"]
        for s in samples:
            if not s.content.strip() and not semantic_only:
                raise InvalidArgument(
                    f"sample {s.id!r} has no text (an embedding alone is "
                    "enough only when semantic is the one level)"
                )
        return samples

    def Check(
        self, request: dedup_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> dedup_pb2.CheckResponse:
        verdicts = self.core.check(self._samples(request.samples))
        return dedup_pb2.CheckResponse(
            verdicts=[_verdict(v) for v in verdicts], model_version=self.core.model_version
        )

    def Dedup(
        self, request: dedup_pb2.DedupRequest, context: grpc.ServicerContext
    ) -> dedup_pb2.DedupResponse:
        check_response_room(request.samples, self.core.settings.grpc.max_message_bytes)
        samples = self._samples(request.samples)
        outcomes = self.core.process(samples)
        self.metrics.observe_outcomes(outcomes, self.core.signals, self.core.steps)
        resp = dedup_pb2.DedupResponse(model_version=self.core.model_version)
        for o in outcomes:
            event = o.sample.lineage[-1]
            level = o.reason.split(":", 1)[1] if o.reason else ""
            resp.results.add(
                sample=sample_to_proto(o.sample),
                kept=o.kept,
                drop_reason=o.reason,
                verdict=dedup_pb2.Verdict(
                    id=o.sample.id,
                    duplicate=not o.kept,
                    level=level,
                    duplicate_of=event.parent_id,
                    similarity=o.sample.scores.get("dedup_similarity", 0.0) if level else 0.0,
                ),
            )
        return resp


def register(core: DedupCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = dedup_pb2_grpc.add_DedupServiceServicer_to_server
    return registration(add, DedupServicer(core, metrics), SERVICE_NAME)
