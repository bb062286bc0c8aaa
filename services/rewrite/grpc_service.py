"""gRPC adapter of the rewriting core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from services.gen.sluice.rewrite.v1 import rewrite_pb2, rewrite_pb2_grpc
from services.rewrite.core import RewriteCore
from services.runtime.convert import sample_from_proto, sample_to_proto, validate_samples
from services.runtime.domain import Action
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration

SERVICE_NAME = rewrite_pb2.DESCRIPTOR.services_by_name["RewriteService"].full_name


def limits_to_dict(limits: Any) -> dict[str, Any]:
    """The fields a GenerationLimits message sets (unset optional fields are absent)."""
    return {f.name: list(v) if f.name == "stop" else v for f, v in limits.ListFields()}


class RewriteServicer(rewrite_pb2_grpc.RewriteServiceServicer):
    def __init__(self, core: RewriteCore, metrics: StageMetrics) -> None:
        self.core = core
        self.metrics = metrics

    def _rewrite(self, request: rewrite_pb2.RewriteRequest) -> rewrite_pb2.RewriteResponse:
        if not request.samples:
            raise InvalidArgument("request has no samples")
        limit = self.core.settings.max_request_samples
        if len(request.samples) > limit:
            raise InvalidArgument(
                f"{len(request.samples)} samples in one request, limit {limit}; "
                "use RewriteStream for large jobs"
            )
        samples = [sample_from_proto(m) for m in request.samples]
        validate_samples(samples)
        options = self.core.options(
            preset=request.preset,
            instruction=request.instruction,
            generation=limits_to_dict(request.generation),
            toxicity_policy=request.toxicity_policy,
        )
        outcomes = self.core.rewrite(samples, options)
        self.metrics.observe_outcomes(outcomes, self.core.signals, self.core.steps)
        resp = rewrite_pb2.RewriteResponse(model_version=self.core.model_version)
        for o in outcomes:
            event = o.sample.lineage[-1]
            changed = event.action == Action.CHANGED
            resp.results.add(
                sample=sample_to_proto(o.sample),
                kept=o.kept,
                drop_reason=o.reason,
                changed=changed,
                reject_reason="" if changed or not o.kept else event.reason,
            )
        return resp

    def Rewrite(
        self, request: rewrite_pb2.RewriteRequest, context: grpc.ServicerContext
    ) -> rewrite_pb2.RewriteResponse:
        return self._rewrite(request)

    def RewriteStream(
        self,
        request_iterator: Iterator[rewrite_pb2.RewriteRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[rewrite_pb2.RewriteResponse]:
        for request in request_iterator:
            yield self._rewrite(request)


def register(core: RewriteCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = rewrite_pb2_grpc.add_RewriteServiceServicer_to_server
    return registration(add, RewriteServicer(core, metrics), SERVICE_NAME)
