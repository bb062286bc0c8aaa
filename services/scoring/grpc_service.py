"""gRPC adapter of the scoring core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services.gen.sluice.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from services.runtime.convert import (
    check_response_room,
    sample_from_proto,
    sample_to_proto,
    validate_samples,
)
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration
from services.scoring.core import ScoringCore

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, core: ScoringCore, metrics: StageMetrics, max_samples: int = 4096) -> None:
        self.core = core
        self.metrics = metrics
        self.max_samples = max_samples

    def _score(self, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        if not request.samples:
            raise InvalidArgument("request has no samples")
        if len(request.samples) > self.max_samples:
            raise InvalidArgument(
                f"{len(request.samples)} samples in one request, limit {self.max_samples}; "
                "use ScoreStream for large jobs"
            )
        check_response_room(request.samples, self.core.settings.grpc.max_message_bytes)
        samples = [sample_from_proto(m) for m in request.samples]
        validate_samples(samples)
        steps = self.core.resolve_steps(list(request.signals))
        outcomes = self.core.score(samples, steps, apply_policy=request.apply_policy)
        self.metrics.observe_outcomes(outcomes, [s for s in steps if s != "heuristics"], steps)
        resp = scoring_pb2.ScoreResponse(model_version=self.core.model_version)
        for o in outcomes:
            resp.results.add(sample=sample_to_proto(o.sample), kept=o.kept, drop_reason=o.reason)
        return resp

    def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.ScoreResponse:
        return self._score(request)

    def ScoreStream(
        self, request_iterator: Iterator[scoring_pb2.ScoreRequest], context: grpc.ServicerContext
    ) -> Iterator[scoring_pb2.ScoreResponse]:
        for request in request_iterator:
            yield self._score(request)


def register(core: ScoringCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = scoring_pb2_grpc.add_ScoringServiceServicer_to_server
    return registration(add, ScoringServicer(core, metrics), SERVICE_NAME)
