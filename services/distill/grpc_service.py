"""gRPC adapter of the distillation core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from services.distill.core import DistillCore
from services.gen.sluice.distill.v1 import distill_pb2, distill_pb2_grpc
from services.runtime.convert import sample_from_proto, sample_to_proto, validate_samples
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration

SERVICE_NAME = distill_pb2.DESCRIPTOR.services_by_name["DistillService"].full_name

# proto field -> GenerationParams field, for the scalar options.
_SCALAR_OPTIONS = {
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "top_k": "top_logprobs",
}


def generation_overrides(options: distill_pb2.GenerationOptions) -> dict[str, Any]:
    """The fields a request set, named as GenerationParams names them."""
    out: dict[str, Any] = {
        name: getattr(options, field)
        for field, name in _SCALAR_OPTIONS.items()
        if options.HasField(field)
    }
    if options.HasField("stop"):
        out["stop"] = list(options.stop.values)
    return out


class DistillServicer(distill_pb2_grpc.DistillServiceServicer):
    def __init__(self, core: DistillCore, metrics: StageMetrics, max_samples: int = 1024) -> None:
        self.core = core
        self.metrics = metrics
        self.max_samples = max_samples

    def _distill(self, request: distill_pb2.DistillRequest) -> distill_pb2.DistillResponse:
        if not request.samples:
            raise InvalidArgument("request has no samples")
        if len(request.samples) > self.max_samples:
            raise InvalidArgument(
                f"{len(request.samples)} samples in one request, limit {self.max_samples}; "
                "use DistillStream for large jobs"
            )
        samples = [sample_from_proto(m) for m in request.samples]
        validate_samples(samples)
        outcomes = self.core.distill(samples, generation_overrides(request.generation))
        self.metrics.observe_outcomes(outcomes, self.core.signals, self.core.steps)
        resp = distill_pb2.DistillResponse(model_version=self.core.model_version)
        for o in outcomes:
            resp.results.add(sample=sample_to_proto(o.sample), kept=o.kept, drop_reason=o.reason)
        return resp

    def Distill(
        self, request: distill_pb2.DistillRequest, context: grpc.ServicerContext
    ) -> distill_pb2.DistillResponse:
        return self._distill(request)

    def DistillStream(
        self,
        request_iterator: Iterator[distill_pb2.DistillRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[distill_pb2.DistillResponse]:
        for request in request_iterator:
            yield self._distill(request)


def register(core: DistillCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = distill_pb2_grpc.add_DistillServiceServicer_to_server
    return registration(add, DistillServicer(core, metrics), SERVICE_NAME)
